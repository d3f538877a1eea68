"""Every bad input ends in one line on stderr, a non-zero exit code and no traceback."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tta.data import synthetic as generate
from tta.data.datasets import load_dataset
from tta.cli import main
from tta.method import REGISTRY, MethodError, discover, make_config
from tta.run.runner import read_results
from tta.data.datasets import dataset_names
from conftest import GOOD, write_task


def invoke(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output.strip()


def assert_one_line_error(code, output, *needles):
    assert code != 0
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("error")]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], output


@pytest.fixture
def bad_files(tmp_path):
    def make(name, content):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)
    return make


def test_malformed_json(bad_files):
    path = bad_files("broken.json", '{"train": [')
    assert_one_line_error(*invoke("run", "--method", "copy_input", "--dataset", path), "broken.json", "not valid JSON")


def test_wrong_colour(bad_files):
    data = json.loads(json.dumps(GOOD))
    data["train"][0]["input"][0][0] = 11
    path = bad_files("colour.json", data)
    assert_one_line_error(*invoke("run", "--method", "copy_input", "--dataset", path), "colour.json", "outside the colours")


def test_ragged_and_oversized(bad_files):
    data = json.loads(json.dumps(GOOD))
    data["test"][0]["input"] = [[1, 2], [3]]
    assert_one_line_error(*invoke("run", "--method", "copy_input", "--dataset", bad_files("ragged.json", data)), "ragged")
    data["test"][0]["input"] = [[1] * 31]
    assert_one_line_error(*invoke("run", "--method", "copy_input", "--dataset", bad_files("big.json", data)), "more than 30")


def test_unknown_method_bad_flag_bad_setting_missing_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # runs/ would land here
    assert_one_line_error(*invoke("run", "--method", "nope"), "unknown method")
    assert_one_line_error(*invoke("run", "--method", "icl", "--no-such-flag"), "--no-such-flag")
    assert_one_line_error(*invoke("run", "--method", "icl", "--set", "bogus=1"), "bogus")
    assert_one_line_error(*invoke("run", "--method", "icl", "--limit", "1", "--model", str(tmp_path / "none")), "none")
    assert not (tmp_path / "runs").exists()   # a run that could not start leaves no directory behind
    assert_one_line_error(*invoke("run", "--method", "icl", "--budget-flops", "1", "--budget-seconds", "1"), "not both")
    assert_one_line_error(*invoke("compare", str(tmp_path)), str(tmp_path))


def test_a_directory_with_a_bad_task_runs_the_rest(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks / "good.json", GOOD)
    (tasks / "bad.json").write_text("[1, 2")
    code, output = invoke("run", "--method", "copy_input", "--dataset", str(tasks), "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0 and "2 tasks" in output and "1 failed" in output
    records = {r["task_id"]: r for r in read_results(tmp_path / "r" / "results.jsonl")}
    assert sorted(records) == ["bad", "good"]
    assert "bad.json" in records["bad"]["error"] and "not valid JSON" in records["bad"]["error"]
    assert records["good"]["error"] is None and records["good"]["attempts"][0][0] == GOOD["test"][0]["input"]
    code, output = invoke("report", str(tmp_path / "r"))
    assert code == 0 and "bad" in output


def method_listing(output: str) -> dict[str, list[str]]:
    """`tta methods` output as {method: its setting lines}; a method listed twice is an error.
    The two-space line under a method's name (what a bigger budget buys) is checked apart."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("    "):
            current.append(line)
        elif line.startswith("  a bigger budget buys: "):
            continue
        else:
            name = line.split(":", 1)[0]
            assert name not in blocks, f"{name} listed twice"
            current = blocks[name] = []
    return blocks


def test_methods_lists_every_registered_method_with_each_settings_default():
    code, output = invoke("methods")
    assert code == 0
    discover()
    blocks = method_listing(output)
    assert list(blocks) == sorted(REGISTRY) and {"icl", "ttt_lora", "copy_input", "common_output"} <= set(blocks)
    for name, cls in REGISTRY.items():
        fields = dataclasses.fields(cls.Config)
        assert len(blocks[name]) == len(fields), name
        for line, f in zip(blocks[name], fields):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert line.startswith(f"    {f.name} (") and f") = {default!r}" in line, (name, line)
            # The listed setting is one --set takes, and its default given back as text reads as itself.
            text = json.dumps(default) if isinstance(default, (list, dict)) else str(default)
            assert getattr(make_config(cls, [f"{f.name}={text}"]), f.name) == default, (name, f.name)
    assert any(line.startswith("    lr (float) = 0.003") for line in blocks["ttt_lora"])   # its own default, not the shared 8e-4
    code, named = invoke("methods", "ttt_full", "icl")   # named ones only, in the order given
    assert code == 0 and list(method_listing(named)) == ["ttt_full", "icl"]
    assert method_listing(named)["icl"] == blocks["icl"]
    assert_one_line_error(*invoke("methods", "icll"), "unknown method 'icll'")
    # every built-in method says how it spends a bigger budget, right under its name
    for name in ("icl", "ttt_lora", "less", "sampling"):
        assert re.search(rf"^{name}: .*\n  a bigger budget buys: \S", output, re.M), name


def test_a_bad_setting_exits_non_zero_with_one_line_on_stderr_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for setting, needles in [("ordrs=2", ("ordrs", "orders")),          # unknown key: the real ones listed
                             ("orders=two", ("orders", "two")),          # a value of the wrong type
                             ("orders", ("orders", "key=value"))]:       # no value at all
        result = CliRunner().invoke(main, ["run", "--method", "icl", "--set", setting])
        assert result.exit_code == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error") and "Traceback" not in result.stderr, result.stderr
        assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "runs").exists()


def test_datasets_lists_every_dataset_with_its_counts():
    code, output = invoke("datasets")
    assert code == 0
    rows = {m[1]: m.groups()[1:] for m in re.finditer(r"^(\S+)\s+(\d+) tasks(?:\s+(\d+) test outputs)?(.*)$",
                                                       output, re.M)}
    assert list(rows) == dataset_names()
    for name in generate.DATASETS:
        assert int(rows[name][0]) == generate.size(name), name
    # The generated sets are counted without generating them: the counts are those of the tasks.
    generated = load_dataset("gen-eval").tasks
    assert rows["gen-eval"][:2] == (str(len(generated)), str(sum(len(t.test) for t in generated))) == ("200", "200")
    assert rows["gen-train"][:2] == (str(generate.size("gen-train")),) * 2
    assert rows["gen-train-large"][1] is None and "generated when first used" in rows["gen-train-large"][2]
    assert rows["arc1-eval"][:2] == ("400", "419") and rows["arc1-heldout"][0] == "40"
    assert output.splitlines()[-1].startswith("or a PATH")


def test_a_plugins_settings_of_every_common_type_take_text_and_resume(tmp_path, monkeypatch):
    """A plugin's config may hold optional numbers, tuples and paths.  Fails if `--set x=none`
    cannot clear an Optional (it took only JSON `null`), if `n=4.5` is truncated or `n=abc` gives
    Python's message, if a tuple becomes a list or untyped items stay text, and if a tuple or
    path setting breaks the run: a tuple read back from the manifest as a list made every resume
    a 'different config'; a path gave a TypeError traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "typed.py").write_text(
        "from dataclasses import dataclass\nfrom pathlib import Path\nfrom typing import Optional\n"
        "from tta.method import Method\n\n"
        "@dataclass\nclass TypedConfig:\n"
        "    n: int = 3\n    cap: Optional[float] = 0.5\n    cap2: 'float | None' = None\n"
        "    pair: tuple = (1, 2)\n    where: Path = Path('/tmp')\n\n"
        "class Typed(Method):\n    Config = TypedConfig\n    needs_model = False\n\n"
        "    def predict(self, task, budget, seed):\n"
        "        return [[p.input, None] for p in task.test], {}\n")
    from tta.method import get_method
    cls = get_method(f"{tmp_path / 'typed.py'}:Typed")
    config = make_config(cls, ["n=1e2", "cap=none", "cap2=0.25", "pair=5,6", "where=/data"])
    assert (config.n, config.cap, config.cap2, config.pair, config.where) == (100, None, 0.25, (5, 6), Path("/data"))
    assert make_config(cls, ["cap=null"]).cap is None and make_config(cls, ["pair=[3, 4]"]).pair == (3, 4)
    for setting, message in [("n=4.5", "n takes a whole number, not '4.5'"),
                             ("n=abc", "n takes a whole number, not 'abc'"),
                             ("cap=abc", "cap takes a number, not 'abc'")]:
        with pytest.raises(MethodError, match=re.escape(message)):
            make_config(cls, [setting])
    # An experiment file's values come typed from TOML: checked against the setting's type too
    # (k = 2.5 or k = true for a whole-number setting ran as given).
    typed = make_config(cls, {"n": 4.0, "cap": 1, "cap2": None, "pair": [7, 8]})
    assert (typed.n, typed.cap, typed.cap2, typed.pair) == (4, 1.0, None, (7, 8)) and isinstance(typed.cap, float)
    for value, message in [(2.5, "n takes a whole number, not 2.5"), (True, "n takes a whole number, not True"),
                           ([1], "n takes a whole number, not [1]")]:
        with pytest.raises(MethodError, match=re.escape(message)):
            make_config(cls, {"n": value})
    with pytest.raises(MethodError, match=re.escape("cap takes a number, not 'high'")):   # text: read as --set reads it
        make_config(cls, {"cap": "high"})
    (tmp_path / "tasks").mkdir()
    for name in ("a", "b"):
        write_task(tmp_path / "tasks" / f"{name}.json", GOOD)
    run = ["run", "--method", f"{tmp_path / 'typed.py'}:Typed", "--dataset", str(tmp_path / "tasks"),
           "--out", str(tmp_path / "r"), "--quiet", "--set", "pair=5,6", "--set", "where=/data"]
    first = CliRunner().invoke(main, run)
    assert first.exit_code == 0, first.output
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["config"]["pair"] == [5, 6] and manifest["config"]["where"] == "/data"
    results = tmp_path / "r" / "results.jsonl"
    results.write_text(results.read_text().splitlines()[0] + "\n")   # as if stopped after its first task
    resumed = CliRunner().invoke(main, run)
    assert resumed.exit_code == 0, resumed.output
    assert [json.loads(line)["task_id"] for line in results.read_text().splitlines()] == ["a", "b"]
