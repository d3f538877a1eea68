import json

import pytest

from tta import contamination
from tta.models import load_model
from tta.pretrain import PretrainConfig, load_training_tasks, pretrain
from tta.tasks import load_dataset, select


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
