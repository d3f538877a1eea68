import math
import time

import pytest
import numpy as np
import torch

from methods.ttt_lora import TTTConfig, TTTLoRA
from tta.budget import Budget, Meter
from tta.training.examples import leave_one_out_examples, leave_out_splits
from tta.inference.decoding import score_answers
from tta.model.loading import load_model
from conftest import flip_task


def test_leave_one_out_data_is_distinct_capped_and_holds_out_the_query():
    from tta.model.encoding import CompactFormat, make_grid_tokenizer
    fmt = CompactFormat(make_grid_tokenizer())
    task = flip_task(n_train=4)
    assert len(leave_out_splits(task, 1)) == 4
    for left_out, context, query in leave_out_splits(task, 1):
        assert len(context) == 3 and query is task.train[left_out[0]]
    examples = leave_one_out_examples(task, fmt, np.random.default_rng(0), max_examples=40)
    assert len(examples) == 40
    assert len({tuple(e.encoded.input_ids) for e in examples}) == 40
    small = leave_one_out_examples(flip_task(n_train=2, size=2), fmt, np.random.default_rng(0), max_examples=1000)
    assert 0 < len(small) < 1000   # leave-two-out added, still finite and distinct


def test_shorten_to_fit_trains_a_task_too_long_for_leave_one_out_on_shorter_contexts():
    from tta.model.encoding import CompactFormat, make_grid_tokenizer
    fmt = CompactFormat(make_grid_tokenizer())
    task = flip_task(n_train=4, size=6)
    pair_alone = len(fmt.encode([], task.train[0].input, task.train[0].output))
    two_pairs = len(fmt.encode([task.train[1]], task.train[0].input, task.train[0].output))
    max_len = (pair_alone + two_pairs) // 2        # one pair fits, no pair with a demonstration before it
    assert leave_one_out_examples(task, fmt, np.random.default_rng(0), 50, max_len=max_len) == []
    shortened = leave_one_out_examples(task, fmt, np.random.default_rng(0), 50, max_len=max_len, shorten_to_fit=True)
    assert shortened and all(len(e.encoded) <= max_len for e in shortened)
    assert {len(e.held_out) for e in shortened} == {4}                 # every demonstration out: the pair alone
    assert len({e.held_out[0] for e in shortened}) == 4                # each demonstration is a query
    # Where leave-one-out fits, the setting changes nothing (same draws, same sequences).
    fits = [e.encoded.input_ids for e in leave_one_out_examples(task, fmt, np.random.default_rng(1), 20)]
    same = [e.encoded.input_ids for e in leave_one_out_examples(task, fmt, np.random.default_rng(1), 20, shorten_to_fit=True)]
    assert fits == same


def test_ttt_lowers_the_true_answer_nll_and_reset_restores_the_base():
    lm = load_model("random:tiny", device="cpu")
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    task = flip_task(n_train=3, size=3)
    prompt = lm.format.encode(list(task.train), task.test[0].input).input_ids
    answer = lm.format.answer_ids(task.test[0].output)
    before = score_answers(lm, [prompt], [answer])[0].mean_nll
    method = TTTLoRA(TTTConfig(max_examples=24, epochs=3, lr=3e-3, rank=8, alpha=16), lm)
    meter = Meter()
    meter.attach(lm.model)
    record = method.adapt(task, meter.handle(lm.model), seed=0)
    after = score_answers(lm, [prompt], [answer])[0].mean_nll
    method.reset()
    meter.detach()
    assert record["steps"] == record["planned_steps"] == 36
    assert record["last_loss"] < record["first_loss"]
    assert after < before
    restored = lm.model.state_dict()
    assert restored.keys() == base.keys()
    assert all(torch.equal(restored[k], base[k]) for k in base)
    assert not any(p.requires_grad for p in lm.model.parameters())


def _adapt_and_predict(method, task, cap: float):
    """(adapt's record, predict's info, the meter, FLOPs spent when adapt returned) of one task
    under a meter capped at `cap` FLOPs."""
    meter = Meter(Budget(flops=cap))
    meter.attach(method.lm.model)
    budget = meter.handle(method.lm.model)
    try:
        record = method.adapt(task, budget, seed=0)
        after_training = meter.flops
        _, info = method.predict(task, budget, seed=0)
        method.reset()
    finally:
        meter.detach()
    return record, info, meter, after_training


def test_ttt_plans_its_schedule_to_the_budget_and_keeps_prediction_paid():
    """A cap too small for the epochs asked: the schedule is laid over the steps the budget pays
    for (all of them run, none cut off), the configured views are still decoded, and the task
    spends at most the cap -- and most of it, since prediction fills the rest with views."""
    lm = load_model("random:tiny", device="cpu")
    task = flip_task()
    method = TTTLoRA(TTTConfig(max_examples=24, rank=4, alpha=8, max_views=64), lm)
    cap = 3e8   # the 12 configured views cost ~0.9e8 here, a training step ~0.5e8
    record, info, meter, after_training = _adapt_and_predict(method, task, cap)
    assert 0 < record["planned_steps"] < record["wanted_steps"]
    assert record["steps"] == record["planned_steps"] and record["stopped_by_budget"]
    assert info["views"] >= info["configured_views"] == 12
    assert after_training < meter.flops <= cap
    assert meter.flops >= 0.8 * cap
    assert meter.stopped_by_budget()


def test_a_bigger_budget_buys_more_training_then_more_views():
    lm = load_model("random:tiny", device="cpu")
    task = flip_task()
    spent = {}
    for cap in (2e8, 3e9):   # 3e9 pays for every wanted step (~1.1e9) and views besides
        method = TTTLoRA(TTTConfig(max_examples=24, rank=4, alpha=8, max_views=64), lm)
        record, info, meter, _ = _adapt_and_predict(method, task, cap)
        spent[cap] = (record["steps"], info["views"], meter.flops)
        reasons = meter.out_of_work
    (small_steps, small_views, small_flops), (big_steps, big_views, big_flops) = spent[2e8], spent[3e9]
    assert big_steps > small_steps
    assert big_steps == 24 and big_views > small_views and big_flops > 5 * small_flops
    # 3e9 is more than 24 steps and 64 views per test input cost: the ceiling is named
    assert big_views == 64 and reasons.startswith("max_views reached")


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_members_train_from_the_base_model_on_equal_shares_and_vote_over_all_views(adapter, monkeypatch):
    """Fails if a second member starts from the first one's weights instead of the base model, if a
    member takes more than its share of the cap (the last one would be starved), if the vote sees
    only one member's views, or if reset leaves a member's weights behind."""
    import methods.ttt_lora as ttt
    lm = load_model("random:tiny", device="cpu")
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    starts, voted_on = [], []

    def base_weights_now():
        # A LoRA wraps each target as `<name>.base_layer` (its own matrices start at B = 0).
        now = {k.replace(".base_layer", ""): v for k, v in lm.model.state_dict().items() if "lora_" not in k}
        return all(torch.equal(now[k], base[k]) for k in base)

    def train_adapter(lm_, examples, budget, settings, seed, held_out=None):
        starts.append(base_weights_now())
        return real_train(lm_, examples, budget, settings, seed, held_out)

    def vote_per_test(per_test, how, top):
        voted_on.append([len(preds) for preds in per_test])
        return real_vote(per_test, how, top)

    real_train, real_vote = ttt.train_adapter, ttt.vote_per_test
    monkeypatch.setattr(ttt, "train_adapter", train_adapter)
    monkeypatch.setattr(ttt, "vote_per_test", vote_per_test)
    task = flip_task()
    cap = 1.2e9
    method = TTTLoRA(TTTConfig(adapter=adapter, max_examples=24, rank=4, alpha=8, max_views=64, members=2), lm)
    record, info, meter, _ = _adapt_and_predict(method, task, cap)
    first, second = record["members"]
    assert starts == [True, True]
    assert first["steps"] > 0 and second["steps"] > 0
    assert 0.4 * cap <= first["flops"] <= 0.5 * cap and second["flops"] >= 0.4 * cap   # equal shares
    assert info["members"] == 2 and info["configured_views"] == 2 * 12
    assert voted_on == [[info["views"]]] and info["views"] > info["configured_views"]
    assert 0.8 * cap <= meter.flops <= cap
    single = TTTLoRA(TTTConfig(adapter=adapter, max_examples=24, rank=4, alpha=8, max_views=64), lm)
    alone, _, _, _ = _adapt_and_predict(single, task, cap)
    assert alone["steps"] > first["steps"] + 1   # one member alone trains on the whole cap
    assert base_weights_now() and method.pooled is None


def test_a_merged_lora_runs_as_the_base_model_and_comes_back_unmerged(tiny):
    """Fails if prediction inside `merged` gives other logits than the unmerged adapter, if the
    meter still charges the LoRA matrices while merged, or if unmerging leaves the base weights
    changed by as much as a rounding error (the next task would start from other weights)."""
    import torch
    from tta.budget import model_shape
    from tta.training.finetune import attach_lora, detach_lora, merged

    base = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    adapter = attach_lora(tiny, rank=4, alpha=4, targets=["q_proj", "v_proj"], seed=0)
    try:
        with torch.no_grad():
            for name, p in adapter.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)   # a trained adapter: B is no longer zero
        ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
        with torch.no_grad():
            unmerged_logits = tiny.model(input_ids=ids).logits
        with_lora = model_shape(tiny.model).n_params
        with merged(adapter):
            with torch.no_grad():
                merged_logits = tiny.model(input_ids=ids).logits
            merged_n = model_shape(tiny.model).n_params
        assert torch.allclose(merged_logits, unmerged_logits, atol=1e-4)
        assert merged_n < with_lora
        assert model_shape(tiny.model).n_params == with_lora
        assert any(p.requires_grad for n, p in adapter.named_parameters() if "lora_" in n)
    finally:
        detach_lora(tiny, adapter)
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, base[k]), k


def test_causal_training_attention_gives_the_masked_batch_loss_and_gradients(tiny):
    """Fails if the unmasked causal kernel used for right-padded training batches lets real
    tokens see padding, or loses the grid position ids (the loss would differ from the one
    transformers computes with the mask)."""
    import numpy as np
    import torch
    from tta.data.datasets import load_dataset
    from tta.training.examples import leave_one_out_examples
    from tta.model.loading import autocast
    from tta.training import step

    task = load_dataset("gen-eval").tasks[3]
    examples = [e.encoded for e in leave_one_out_examples(task, tiny.format, np.random.default_rng(0), 3)]
    assert len({len(e) for e in examples}) > 1   # unequal lengths: the batch has padding
    tensors = step.padded(tiny, examples)
    params = [p for p in tiny.model.parameters()][:3]
    for p in params:
        p.requires_grad_(True)
    try:
        def loss_and_grads(causal: bool):
            for p in params:
                p.grad = None
            config = tiny.model.config
            saved = config._attn_implementation
            config._attn_implementation = "sdpa"
            if causal:
                loss = step.batch_loss(tiny.model, *tensors)
            else:
                ids, mask, positions, labels = tensors
                with autocast(tiny.device):
                    loss = tiny.model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
            loss.backward()
            config._attn_implementation = saved
            return float(loss.detach()), [p.grad.clone() for p in params]

        masked_loss, masked_grads = loss_and_grads(causal=False)
        causal_loss, causal_grads = loss_and_grads(causal=True)
    finally:
        for p in params:
            p.requires_grad_(False)
    # both under bf16 autocast: equal up to the kernels' rounding
    assert abs(causal_loss - masked_loss) < 2e-3 * abs(masked_loss)
    for a, b in zip(causal_grads, masked_grads):
        assert torch.allclose(a, b, atol=2e-2 * b.abs().max().item() + 1e-6)
    assert tiny.model.config._attn_implementation == "sdpa"


def test_length_grouped_batches_pair_similar_lengths_in_random_order_and_see_every_example():
    """Fails if grouping drops or repeats an example in an epoch, leaves batches padded as
    random pairs are, or hands the batches over sorted by length (the schedule would meet the
    short examples first and the long ones last)."""
    from tta.training.finetune import batches
    lengths = [int(x) for x in np.random.default_rng(0).integers(50, 900, size=41)]
    examples = [list(range(n)) for n in lengths]
    padded = lambda plan: sum(max(len(e) for e in batch) * len(batch) for batch in plan)   # noqa: E731
    grouped = batches(examples, 2, epochs=3, seed=1, group_by_length=True)
    assert len(grouped) == 3 * 21
    for epoch in range(3):
        seen = sorted(len(e) for batch in grouped[21 * epoch:21 * (epoch + 1)] for e in batch)
        assert seen == sorted(lengths)
    ordered = sorted(lengths)
    tightest = 3 * sum(max(ordered[i:i + 2]) * len(ordered[i:i + 2]) for i in range(0, 41, 2))
    assert padded(grouped) == tightest < padded(batches(examples, 2, epochs=3, seed=1))
    longest = [max(len(e) for e in batch) for batch in grouped[:21]]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    assert batches(examples, 2, 3, seed=1, group_by_length=True) == grouped


def test_a_held_out_demonstration_is_kept_out_of_training_and_scored_under_each_view():
    """Fails if the held-out demonstration stays in the training task, if its scoring prompt
    leaks its own output, or if a task too small to spare one is split."""
    from tta.data.augment import IDENTITY, TRANSPOSE
    from tta.training.examples import held_out_demonstration
    lm = load_model("random:tiny", device="cpu")
    task = flip_task(n_train=4)
    rest, prompts, answers = held_out_demonstration(task, np.random.default_rng(3), lm.format)
    held = [p for p in task.train if not any(np.array_equal(p.input, q.input) for q in rest.train)]
    assert len(rest.train) == 3 and len(held) == 1 and rest.test == task.test
    for view, prompt, answer in zip((IDENTITY, TRANSPOSE), prompts, answers):
        assert answer == lm.format.answer_ids(view.forward(held[0].output))
        assert prompt == lm.format.encode([type(p)(view.forward(p.input), view.forward(p.output)) for p in rest.train],
                                          view.forward(held[0].input)).input_ids
    assert held_out_demonstration(flip_task(n_train=2), np.random.default_rng(3), lm.format) is None


def test_training_with_a_held_out_check_keeps_the_weights_that_scored_best():
    """Fails if the weights left after training are not the ones of the best scoring (the final
    ones, or a stale copy), if the scorings are not where the plan puts them, or if they escape
    the budget (the meter must charge each as a forward)."""
    from tta.training.examples import held_out_demonstration
    from tta.training.finetune import HeldOutCheck, attach_lora, detach_lora, train
    lm = load_model("random:tiny", device="cpu")
    task = flip_task(n_train=4)
    rest, prompts, answers = held_out_demonstration(task, np.random.default_rng(0), lm.format)
    examples = [e.encoded for e in leave_one_out_examples(rest, lm.format, np.random.default_rng(0), 16)]

    class Scripted(HeldOutCheck):
        """Real scorings (they are charged), but the scores a test chooses; the weights seen at each."""
        def __init__(self, scores):
            super().__init__(prompts, answers, checks=4)
            self.scores, self.seen = list(scores), []

        def nll(self, lm):
            super().nll(lm)
            self.seen.append({n: p.detach().clone() for n, p in lm.model.named_parameters() if p.requires_grad})
            return self.scores.pop(0)

    for scores, best in (([2.0, 1.5, 1.0, 1.2, 1.3], 2), ([1.0, 2.0, 3.0, 4.0, 5.0], 0), ([3.0, 2.0, 1.0, 0.9, 0.5], 4)):
        adapter = attach_lora(lm, 4, 8, ["q_proj", "v_proj"])
        meter = Meter(Budget(flops=1e12))
        meter.attach(lm.model)
        budget = meter.handle(lm.model)
        held_out = Scripted(scores)
        report = train(lm, examples, budget, lr=3e-3, epochs=2, batch_size=2, held_out=held_out)
        spent = meter.flops
        meter.detach()
        try:
            assert [step for step, _ in report.checked] == [0, 4, 8, 12, 16] and report.steps == 16
            assert report.kept_step == 4 * best
            now = {n: p for n, p in lm.model.named_parameters() if p.requires_grad}
            assert all(torch.equal(now[n], held_out.seen[best][n]) for n in now)
            assert not all(torch.equal(held_out.seen[-1][n], held_out.seen[0][n]) for n in now)   # training moved them
            training = 2 * sum(budget.training_cost([len(e) for e in batch], lm.model)
                               for batch in [examples[i:i + 2] for i in range(0, 16, 2)])
            assert spent == pytest.approx(training + held_out.cost(budget), rel=0.02)
        finally:
            detach_lora(lm, adapter)


def test_select_on_demo_pays_its_scorings_and_still_decodes_the_configured_views():
    """Fails if the method forgets to keep the scorings' cost back (training planned to the whole
    budget would leave prediction unpaid or overspend the cap), or trains on the held-out
    demonstration."""
    lm = load_model("random:tiny", device="cpu")
    task = flip_task(n_train=4)
    cap = 4e8
    method = TTTLoRA(TTTConfig(max_examples=24, rank=4, alpha=8, max_views=64, select_on_demo=True, checks=3), lm)
    record, info, meter, _ = _adapt_and_predict(method, task, cap)
    assert record["held_out_demo"] and 0 < record["planned_steps"] < record["wanted_steps"]
    assert [step for step, _ in record["held_out_nll"]][-1] == record["steps"] == record["planned_steps"]
    assert record["kept_step"] in [step for step, _ in record["held_out_nll"]]
    # 3 of the 4 demonstrations, each the query of its leave-one-out copies: 3 x 8 transforms at most
    assert record["train_examples"] <= 24
    assert info["views"] >= info["configured_views"] == 12
    assert meter.flops <= cap


def test_augment_passes_tops_up_a_small_task_and_keeps_the_first_pass():
    from tta.model.encoding import CompactFormat, make_grid_tokenizer
    fmt = CompactFormat(make_grid_tokenizer())
    task = flip_task(n_train=3, size=3)
    one = leave_one_out_examples(task, fmt, np.random.default_rng(0), max_examples=1000)
    two = leave_one_out_examples(task, fmt, np.random.default_rng(0), max_examples=1000, passes=2)
    assert 0 < len(one) < len(two) <= 2 * len(one)        # the pairs ran out; a second pass adds copies
    assert [e.encoded.input_ids for e in two[:len(one)]] == [e.encoded.input_ids for e in one]
    assert len({tuple(e.encoded.input_ids) for e in two}) == len(two)     # copies are distinct sequences
    assert {e.held_out for e in two[len(one):]} <= {e.held_out for e in one}   # the same splits again
    # At the cap, later passes never run: the same sequences and the same random state after.
    rng_one, rng_three = np.random.default_rng(5), np.random.default_rng(5)
    capped = leave_one_out_examples(task, fmt, rng_one, max_examples=10)
    same = leave_one_out_examples(task, fmt, rng_three, max_examples=10, passes=3)
    assert [e.encoded.input_ids for e in capped] == [e.encoded.input_ids for e in same]
    assert rng_one.integers(1 << 30) == rng_three.integers(1 << 30)


def test_under_a_seconds_cap_the_schedule_is_laid_over_the_steps_the_time_pays_for(monkeypatch):
    """A seconds cap cannot price steps beforehand: an early step is timed and the cosine laid
    over the steps the phase's seconds then pay for.  Fails if the schedule stays laid over the
    wanted steps (training then ends near its peak learning rate, as it did: a 5-s cap ran 8 of
    250 planned steps) or if the re-plan ignores the time this phase keeps for later."""
    from tta.training import finetune
    lm = load_model("random:tiny", device="cpu")
    examples = [e.encoded for e in leave_one_out_examples(flip_task(), lm.format, np.random.default_rng(0), 24)]
    tokens_per_second = 2000.0   # a scripted speed: each step sleeps for its tokens
    lrs = []

    def scripted_step(model, optimizer, batch, schedule):
        lrs.append(optimizer.param_groups[0]["lr"])
        time.sleep(int(batch[1].sum()) / tokens_per_second)   # (ids, mask, positions, labels)
        optimizer.step()
        schedule.step()
        return torch.tensor(0.0)

    monkeypatch.setattr(finetune, "training_step", scripted_step)
    adapter = finetune.attach_lora(lm, 4, 8, ["q_proj", "v_proj"])
    try:
        meter = Meter(Budget(seconds=2.0))
        budget = meter.handle(lm.model).holding_back(share_of_rest=0.5)   # ~1 s for training
        report = finetune.train(lm, examples, budget, lr=1e-3, epochs=10, batch_size=2)
    finally:
        finetune.detach_lora(lm, adapter)
    seconds_per_step = sum(len(e) for e in examples) / len(examples) * 2 / tokens_per_second
    assert report.wanted_steps == 120
    assert 0.5 / seconds_per_step < report.planned_steps < 1.1 / seconds_per_step + 1
    assert report.steps >= report.planned_steps - 1   # the clock may stop the last step on a loaded machine
    n, warmup = report.planned_steps, math.ceil(0.1 * report.planned_steps)
    expected = [1e-3 * (k / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (n - warmup))))
                for k in range(n)]
    assert lrs[0] == 0 and lrs[2:] == pytest.approx(expected[2:len(lrs)], abs=1e-9)   # re-planned after 2 steps
    assert lrs[-1] < 0.1 * 1e-3   # the cosine ran its course


def test_holding_back_a_share_of_the_seconds_left_nests():
    """`share_of_rest` keeps a share of the phase's remaining seconds: a member's half of the
    task, then half of that for its views, leaves its training a quarter of the cap."""
    meter = Meter(Budget(seconds=100.0))
    meter._started = time.perf_counter() - 20   # 20 s spent
    budget = meter.handle()
    assert budget.seconds_left() == pytest.approx(80, abs=0.5)
    member = budget.holding_back(share=0.5)   # ends at 50 s
    training = member.holding_back(share_of_rest=0.5)   # ends half-way from 20 s to 50 s
    assert member.seconds_left() == pytest.approx(30, abs=0.5)
    assert training.seconds_left() == pytest.approx(15, abs=0.5)
    assert meter.handle().holding_back(share_of_rest=1.0).seconds_left() == pytest.approx(0, abs=0.5)
    assert Meter(Budget(flops=1e9)).handle().holding_back(share_of_rest=0.5).seconds_left() == float("inf")


def test_under_a_seconds_cap_ttt_keeps_half_the_time_for_its_views():
    """Fails if training runs to the seconds cap: ttt_lora at --budget-seconds 30 trained until
    the cap and decoded no valid answer on 4 of 4 development tasks."""
    lm = load_model("random:tiny", device="cpu")
    method = TTTLoRA(TTTConfig(max_examples=24, rank=4, alpha=8, epochs=200, max_views=64), lm)
    cap = 3.0
    meter = Meter(Budget(seconds=cap))
    meter.attach(lm.model)
    budget = meter.handle(lm.model)
    try:
        record = method.adapt(flip_task(), budget, seed=0)
        trained_for = meter.seconds
        _, info = method.predict(flip_task(), budget, seed=0)
        method.reset()
    finally:
        meter.detach()
    assert record["planned_steps"] < record["wanted_steps"] == 2400
    assert cap * 0.3 < trained_for < cap * 0.5 + 0.5
    assert info["views"] > info["configured_views"] == 12   # the rest of the time bought more views
