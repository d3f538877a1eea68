"""A refusal for overlap names the training task that matched and the dataset it came from."""
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from tta.data import contamination
from tta.model.loading import DEFAULT_MODEL_DIR
from tta.training.pretrain import PretrainConfig, load_training_tasks, record_training_data
from tta.data.tasks import Pair, Task
from tta.data.datasets import Dataset, load_dataset


def grid(seed, size=3):
    return np.random.default_rng(seed).integers(0, 10, (size, size)).astype(np.int8)


def pair(seed):
    return Pair(grid(seed), grid(seed + 1000))


def write_tasks(folder, tasks):
    folder.mkdir()
    for task_id, (train_seeds, test_seed) in tasks.items():
        data = {"train": [{"input": pair(s).input.tolist(), "output": pair(s).output.tolist()} for s in train_seeds],
                "test": [{"input": pair(test_seed).input.tolist(), "output": pair(test_seed).output.tolist()}]}
        (folder / f"{task_id}.json").write_text(json.dumps(data))
    return str(folder)


def fake_model(folder):
    return SimpleNamespace(model=SimpleNamespace(name_or_path=str(folder)))


def test_pretraining_refusal_names_the_matching_training_task_and_its_dataset(tmp_path):
    evaluated = write_tasks(tmp_path / "eval", {"e_test": ([1, 2, 3], 4), "e_demos": ([5, 6, 7], 8)})
    training = write_tasks(tmp_path / "train", {"holds_test": ([10, 11], 4),      # e_test's test input
                                                "holds_demos": ([5, 6, 20], 21),  # two of e_demos' pairs
                                                "clean": ([30, 31], 32)})
    other = write_tasks(tmp_path / "other", {"clean2": ([40, 41], 42)})
    with pytest.raises(contamination.ContaminationError) as e:
        load_training_tasks(PretrainConfig(data=[other, training], exclude=[evaluated]))
    message = str(e.value)
    assert "\n" not in message and "2 of 2 tasks" in message
    assert f"e_test matches holds_test of {training} (same test input)" in message
    assert f"e_demos matches holds_demos of {training} (2 demonstration pairs in common)" in message
    assert "clean" not in message


def test_a_model_refusal_names_the_training_task_from_training_data_json(tmp_path):
    seen = [Task("seen_task", (pair(1), pair(2)), (pair(3),)), Task("other", (pair(4), pair(5)), (pair(6),))]
    record_training_data(tmp_path / "training_data.json", ["mydata*3"],
                         contamination.fingerprint(seen, {"seen_task": "mydata", "other": "mydata"}))
    record = json.loads((tmp_path / "training_data.json").read_text())
    assert record["datasets"] == ["mydata*3"] and len(record["owner"]) == len(record["hashes"])
    renamed = Dataset("mine", [Task("flip", seen[0].train, seen[0].test)])
    with pytest.raises(contamination.ContaminationError,
                       match=r"^mine: 1 of 1 tasks .*: flip matches seen_task of mydata \(same test input\); pass --force"):
        contamination.check_model_data(fake_model(tmp_path), "m", renamed)
    # a resumed pretraining run adds to the record and keeps the names of both
    record_training_data(tmp_path / "training_data.json", ["more"],
                         contamination.fingerprint([Task("late", (pair(7), pair(8)), (pair(9),))], {"late": "more"}))
    late = Dataset("mine", [Task("x", (pair(7), pair(8)), (pair(10),))])
    with pytest.raises(contamination.ContaminationError, match=r"x matches late of more \(2 demonstration pairs"):
        contamination.check_model_data(fake_model(tmp_path), "m", late)
    with pytest.raises(contamination.ContaminationError, match=r"flip matches seen_task of mydata"):
        contamination.check_model_data(fake_model(tmp_path), "m", renamed)


def test_an_old_training_data_json_without_owners_still_refuses_and_says_so(tmp_path):
    seen = [Task("seen_task", (pair(1), pair(2)), (pair(3),))]
    fp = contamination.fingerprint(seen)
    (tmp_path / "training_data.json").write_text(json.dumps({"datasets": ["d"], "ids": fp["ids"], "hashes": fp["hashes"]}))
    with pytest.raises(contamination.ContaminationError, match=r"flip matches a training task \(training_data.json predates"):
        contamination.check_model_data(fake_model(tmp_path), "m", Dataset("mine", [Task("flip", seen[0].train, seen[0].test)]))


def test_the_shipped_model_names_the_arc1_train_task_a_renamed_copy_came_from():
    record = json.loads((DEFAULT_MODEL_DIR / "training_data.json").read_text())
    assert len(record["owner"]) == len(record["hashes"]) and len(record["origin"]) == len(record["ids"])
    arc1 = load_dataset("arc1-train")
    original = next(t for t in arc1.tasks if t.id in set(record["ids"]))
    copy = Dataset("hand-written", [Task("my_copy", original.train, original.test)])
    with pytest.raises(contamination.ContaminationError) as e:
        contamination.check_model_data(fake_model(DEFAULT_MODEL_DIR), "default", copy)
    named = re.search(r"my_copy matches (\S+) of arc1-train \(same test input\)", str(e.value))
    assert named, str(e.value)
    matched = next(t for t in arc1.tasks if t.id == named.group(1))
    assert contamination.test_input_hash(matched) == contamination.test_input_hash(original)
