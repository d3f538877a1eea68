import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tta.data import contamination
from tta.data import synthetic as generate
from tta.cli import main
from tta.model.loading import load_model
from tta.training.pretrain import PretrainConfig, learning_rate, load_training_tasks, pretrain
from tta.data.tasks import TaskError
from tta.data.datasets import load_dataset, select


def test_arc2_train_is_refused_as_pretraining_data_for_arc1_eval():
    config = PretrainConfig(data=["arc2-train"], exclude=["arc1-eval"])
    with pytest.raises(contamination.ContaminationError, match=r"arc1-eval: 37\d of 400 tasks"):
        load_training_tasks(config)


def test_drop_overlap_removes_every_overlapping_task():
    config = PretrainConfig(data=["arc2-train"], exclude=["arc1-eval"], drop_overlap=True)
    tasks, fingerprint = load_training_tasks(config, log=lambda _: None)
    assert 600 <= len(tasks) < 1000
    assert contamination.overlap(fingerprint, load_dataset("arc1-eval").tasks) == []


def test_content_match_under_another_id_is_found():
    train = load_dataset("arc1-train")
    same_puzzle_renamed = [t.__class__("renamed", t.train, t.test) for t in train.tasks[:1]]
    assert contamination.overlap(contamination.fingerprint(train.tasks), same_puzzle_renamed) == ["renamed"]


def test_short_pretraining_lowers_the_loss_loads_and_resumes(tmp_path):
    out = tmp_path / "model"
    config = PretrainConfig(data=["gen-train"], exclude=["gen-eval"], size="tiny", steps=24, lr=5e-3,
                            tokens_per_batch=2048, max_len=512, log_every=4, checkpoint_minutes=100)
    state = pretrain(config, out, device="cpu", log=lambda _: None)
    curve = [p["loss"] for p in state["curve"]]
    assert state["step"] == 24 and curve[-1] < curve[0]
    lm = load_model(str(out), device="cpu")
    assert lm.format.name == "compact" and (out / "README.md").read_text().count("24 steps") == 1
    assert lm.format.grid_positions   # the checkpoint's config says how it numbers tokens
    # the model remembers what it saw: evaluating it on its training tasks is refused
    seen = select(load_dataset("gen-train"), limit=3)
    with pytest.raises(contamination.ContaminationError, match="--force"):
        contamination.check_model_data(lm, str(out), seen)
    contamination.check_model_data(lm, str(out), select(load_dataset("gen-eval"), limit=3))
    # resume: a longer run continues from step 24 instead of starting again
    config.steps = 30
    logs = []
    state = pretrain(config, out, device="cpu", log=logs.append)
    assert state["step"] == 30 and any("resuming" in line and "step 24" in line for line in logs)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 30


def test_worker_processes_draw_the_batches_the_loop_would_draw(tmp_path):
    # a GPU run draws batches in worker processes; it must train on exactly the same stream
    losses = {}
    for workers in (0, 2):
        config = PretrainConfig(data=["gen-train"], exclude=["gen-eval"], size="tiny", steps=6,
                                tokens_per_batch=2048, max_len=512, log_every=2, workers=workers)
        state = pretrain(config, tmp_path / f"w{workers}", device="cpu", log=lambda _: None)
        losses[workers] = [p["loss"] for p in state["curve"]]
    assert len(losses[0]) == 3 and losses[0] == losses[2]


def _grid(seed: int, size: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 10, (size, size)).tolist()


def _pair(seed: int) -> dict:
    return {"input": _grid(seed), "output": _grid(seed + 1000)}


def _write_tasks(folder, tasks: dict):
    folder.mkdir()
    for task_id, (train_seeds, test_seed) in tasks.items():
        data = {"train": [_pair(s) for s in train_seeds], "test": [_pair(test_seed)]}
        (folder / f"{task_id}.json").write_text(json.dumps(data))
    return str(folder)


def test_drop_overlap_also_drops_tasks_that_cover_an_evaluated_task_piecewise(tmp_path):
    # The evaluated task's demonstrations 1 and 2 each appear in a different training task:
    # neither training task overlaps it alone, together they hold two of its pairs.
    evaluated = _write_tasks(tmp_path / "eval", {"e": ([1, 2, 3], 4)})
    training = _write_tasks(tmp_path / "train", {"a": ([1, 10, 11], 12), "b": ([2, 20, 21], 22),
                                                 "c": ([30, 31, 32], 33)})
    with pytest.raises(contamination.ContaminationError, match="1 of 1 tasks"):
        load_training_tasks(PretrainConfig(data=[training], exclude=[evaluated]))
    logs = []
    tasks, fingerprint = load_training_tasks(PretrainConfig(data=[training], exclude=[evaluated], drop_overlap=True),
                                             log=logs.append)
    assert [t.id for t in tasks] == ["c"] and "dropped 2 training tasks" in logs[0]


def test_a_dataset_weight_repeats_its_tasks_and_a_bad_weight_is_one_line(tmp_path):
    once, _ = load_training_tasks(PretrainConfig(data=["gen-train"], exclude=[]))
    thrice, _ = load_training_tasks(PretrainConfig(data=["gen-train*3"], exclude=[]))
    assert len(thrice) == 3 * len(once) and {t.id for t in thrice} == {t.id for t in once}
    with pytest.raises(TaskError, match=r"gen-train\*x: the weight"):
        load_training_tasks(PretrainConfig(data=["gen-train*x"], exclude=[]))
    result = CliRunner().invoke(main, ["pretrain", "--steps", "1", "--data", "gen-train*0", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "gen-train*0: the weight" in result.output and "Traceback" not in result.output


def test_gen_train_large_has_more_seeds_of_the_same_rules_and_none_of_the_eval_seeds():
    large, small = generate.DATASETS["gen-train-large"](), generate.DATASETS["gen-train"]()
    assert generate.size("gen-train-large") == len(large) == 41_000 and set(small) < set(large)
    assert {name for name, _ in large} == {name for name, _ in small}
    assert max(seed for _, seed in large) < generate.EVAL_SEED_START


def test_a_loss_gone_nan_rolls_back_to_the_last_good_weights_with_half_the_learning_rate(tmp_path, monkeypatch):
    """Fails if a diverging step ends the run (a one-shot GPU run would keep only its last
    checkpoint), if the weights it broke survive the rollback, or if the run goes on at the
    learning rate that diverged."""
    import tta.training.pretrain as pretraining
    real_step, calls = pretraining.training_step, []

    def diverging_step(model, optimizer, batch, clip_norm):
        calls.append(1)
        loss = real_step(model, optimizer, batch, clip_norm=clip_norm)
        if len(calls) == 7:   # inside the second logged window: the weights go bad as in a real blow-up
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            return torch.tensor(float("nan"))
        return loss

    monkeypatch.setattr(pretraining, "training_step", diverging_step)
    config = PretrainConfig(data=["gen-train"], exclude=["gen-eval"], size="tiny", steps=12, lr=5e-3,
                            tokens_per_batch=2048, max_len=512, log_every=4, checkpoint_minutes=100)
    logs = []
    state = pretrain(config, tmp_path / "model", device="cpu", log=logs.append)
    assert state["step"] == 12 and len(calls) == 12 + 4   # steps 5-8 ran twice
    assert state["rollbacks"] == [{"loss": "nan", "at_step": 8, "back_to_step": 4, "lr_scale": 0.5}]
    assert all(math.isfinite(p["loss"]) for p in state["curve"]) and [p["step"] for p in state["curve"]] == [4, 8, 12]
    after = state["curve"][1]   # logged at step 8 on the second try, at half the schedule's rate
    assert after["lr"] == pytest.approx(0.5 * learning_rate(config, 7 / 12))
    model = load_model(str(tmp_path / "model"), device="cpu").model
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any("back to step 4" in line for line in logs)


def test_init_continues_from_a_models_weights_and_remembers_what_both_runs_saw(tmp_path):
    """Fails if --init starts from random weights, or if the continued model forgets the init
    model's training tasks (then `tta run` would let it be evaluated on them)."""
    first = tmp_path / "first"
    pretrain(PretrainConfig(data=["gen-train"], exclude=["gen-eval"], size="tiny", steps=24, lr=5e-3,
                            tokens_per_batch=2048, max_len=512, log_every=4), first, device="cpu", log=lambda _: None)
    # lr 0: the continued model must be the init model, weight for weight
    still = tmp_path / "still"
    pretrain(PretrainConfig(data=["arc1-train"], exclude=[], init=str(first), steps=2, lr=0.0,
                            tokens_per_batch=2048, max_len=512, log_every=1), still, device="cpu", log=lambda _: None)
    before, after = load_model(str(first), device="cpu").model, load_model(str(still), device="cpu").model
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    # a trained continuation starts where the init model ended, far below a random model's loss
    onward = tmp_path / "onward"
    config = PretrainConfig(data=["gen-train"], exclude=["gen-eval"], init=str(first), steps=4, lr=1e-3,
                            tokens_per_batch=2048, max_len=512, log_every=4, seed=1)
    scratch = PretrainConfig(**{**config.__dict__, "init": None, "size": "tiny"})
    continued = pretrain(config, onward, device="cpu", log=lambda _: None)["curve"][0]["loss"]
    from_random = pretrain(scratch, tmp_path / "scratch", device="cpu", log=lambda _: None)["curve"][0]["loss"]
    assert continued < from_random - 0.5
    # the record of what it saw is both runs': the init's gen-train tasks are still refused
    lm = load_model(str(still), device="cpu")
    with pytest.raises(contamination.ContaminationError, match="--force"):
        contamination.check_model_data(lm, str(still), select(load_dataset("gen-train"), limit=3))
    with pytest.raises(contamination.ContaminationError, match="--force"):
        contamination.check_model_data(lm, str(still), select(load_dataset("arc1-train"), limit=3))
    card = (still / "README.md").read_text()
    assert f"--init {first}" in card and "10,170" not in card and "from arc1-train, and before it, for the init model, gen-train " in card
    result = CliRunner().invoke(main, ["pretrain", "--steps", "1", "--init", str(tmp_path / "nothing"),
                                       "--out", str(tmp_path / "m")])
    assert result.exit_code != 0 and "--init" in result.output and "Traceback" not in result.output
