"""Pictures of tasks and attempts (tta/reporting/show.py)."""
import json

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from tta.reporting.show import PALETTE, ShowError, attempt_mark, show_runs
from conftest import write_task

TASK = {"train": [{"input": [[1, 1], [1, 1]], "output": [[2, 2], [2, 2]]}],
        "test": [{"input": [[1, 1], [1, 1]], "output": [[2, 2], [2, 2]]}]}


def fake_run(root, name, dataset, attempts):
    run = root / name
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"method": "m", "dataset": str(dataset), "task_ids": ["t"]}))
    (run / "results.jsonl").write_text(json.dumps({"task_id": "t", "attempts": attempts}) + "\n")
    return run


def test_attempt_marks():
    truth = np.array([[2, 2]])
    assert attempt_mark([[2, 2]], truth) == "✓"
    assert attempt_mark([[2], [2]], truth) == "✗"          # right cells, wrong shape
    assert attempt_mark([[2, 3]], truth) == "✗"
    assert attempt_mark(None, truth) == "" and attempt_mark([[2, 2]], None) == ""


def test_a_picture_shows_the_grids_in_arc_colours(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_task(data / "t.json", TASK)
    right = fake_run(tmp_path, "right", data, [[[[2, 2], [2, 2]], None]])
    wrong = fake_run(tmp_path, "wrong", data, [[[[3, 3], [3, 3]], None]])
    [png] = show_runs([right, wrong], ["t"], tmp_path / "pics")
    pixels = imread(png)[..., :3]
    for colour in (1, 2, 3):   # the inputs (blue), the true output and right attempt (red), the wrong one (green)
        assert np.isclose(pixels, to_rgb(PALETTE[colour]), atol=0.02).all(axis=-1).sum() > 50, colour
    assert not np.isclose(pixels, to_rgb(PALETTE[4]), atol=0.02).all(axis=-1).any()   # no yellow anywhere


def test_show_refuses_what_it_cannot_draw(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_task(data / "t.json", TASK)
    run = fake_run(tmp_path, "r", data, [[None, None]])
    with pytest.raises(ShowError, match="no result for task nope"):
        show_runs([run], ["nope"], tmp_path / "pics")
    with pytest.raises(ShowError, match="not a run directory"):
        show_runs([tmp_path / "data"], None, tmp_path / "pics")
    other = fake_run(tmp_path, "other", "gen-eval", [[None, None]])
    with pytest.raises(ShowError, match="different datasets"):
        show_runs([run, other], ["t"], tmp_path / "pics")
    (tmp_path / "notes.txt").write_text("mine")   # --out naming a file: one line, the file kept (was FileExistsError)
    with pytest.raises(ShowError, match="notes.txt: is a file; --out names the folder for the pictures"):
        show_runs([run], ["t"], tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_task_whose_file_does_not_load_is_left_out_with_one_line(tmp_path):
    """A run records a task whose file is broken as failed.  Fails if drawing the run's tasks
    stops with a KeyError on it (as it did) instead of drawing the others and naming it."""
    data = tmp_path / "data"
    data.mkdir()
    write_task(data / "t.json", TASK)
    (data / "broken.json").write_text("{not json")
    run = fake_run(tmp_path, "r", data, [[None, None]])
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "task_ids": ["broken", "t"]}))
    with (run / "results.jsonl").open("a") as f:
        f.write(json.dumps({"task_id": "broken", "attempts": [], "error": "not valid JSON"}) + "\n")
    said = []
    [png] = show_runs([run], None, tmp_path / "pics", say=said.append)
    assert png.name == "t.png"
    assert len(said) == 1 and said[0].startswith("task broken: not drawn, its file does not load (")
