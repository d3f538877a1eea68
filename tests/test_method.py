"""The plugin contract: a method installed as a package is found through the `tta.methods`
entry-point group -- listed by `tta methods`, run by name by `tta run` and `tta experiment` --
with no flag and no edit to tta; a broken entry point spoils only its own name."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import GOOD, write_task

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    from tta.method import Method, register, setting


    @dataclass
    class MineConfig:
        answer: str = setting("last", "which demonstration output to answer with: first or last")


    @register("mine")
    class Mine(Method):
        """Answers with a demonstration's output."""
        Config = MineConfig
        needs_model = False

        def predict(self, task, budget, seed):
            pick = task.train[-1] if self.config.answer == "last" else task.train[0]
            return [[pick.output, None] for _ in task.test], {"picked": self.config.answer}
''')


def install_fake_package(site: Path, entry_points: str) -> None:
    """What `pip install` of a package with entry points leaves on sys.path: the module and a
    dist-info folder whose entry_points.txt importlib.metadata reads."""
    (site / "mine_pkg").mkdir(parents=True)
    (site / "mine_pkg" / "__init__.py").write_text("")
    (site / "mine_pkg" / "methods.py").write_text(PLUGIN)
    info = site / "mine_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mine-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def one_task_dir(tmp_path: Path) -> Path:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks / "t.json", GOOD)
    return tasks


def tta(*args, cwd: Path, site: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "tta.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_an_installed_package_method_is_listed_and_runs_by_name(tmp_path):
    site = tmp_path / "site"
    install_fake_package(site, "[tta.methods]\nmine = mine_pkg.methods:Mine\n")
    tasks = one_task_dir(tmp_path)

    listed = tta("methods", cwd=tmp_path, site=site)
    assert listed.returncode == 0, listed.stderr
    assert "mine:" in listed.stdout and "answer (str) = 'last'" in listed.stdout
    assert "icl:" in listed.stdout and "ttt_lora:" in listed.stdout   # the built-ins, through the same group

    ran = tta("run", "--method", "mine", "--set", "answer=first", "--dataset", tasks, "--out", "r", "--quiet",
              cwd=tmp_path, site=site)
    assert ran.returncode == 0, ran.stderr
    [record] = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert record["method"] == "mine" and record["error"] is None
    assert record["attempts"][0][0] == GOOD["train"][0]["output"]

    (tmp_path / "plan.toml").write_text(f'name = "p"\ndataset = "{tasks}"\nbudgets = ["none"]\n[methods.mine]\nanswer = "last"\n')
    grid = tta("experiment", "plan.toml", "--quiet", cwd=tmp_path, site=site)
    assert grid.returncode == 0, grid.stderr
    [cell] = [d for d in (tmp_path / "runs" / "p").iterdir() if d.is_dir()]
    assert ":" not in cell.name and json.loads((cell / "manifest.json").read_text())["method"] == "mine"


def test_a_broken_entry_point_fails_only_when_named(tmp_path):
    site = tmp_path / "site"
    install_fake_package(site, "[tta.methods]\nbroken = mine_pkg.nowhere:Nothing\n")
    tasks = one_task_dir(tmp_path)
    fine = tta("run", "--method", "copy_input", "--dataset", tasks, "--out", "ok", "--quiet", cwd=tmp_path, site=site)
    assert fine.returncode == 0, fine.stderr
    broken = tta("run", "--method", "broken", "--dataset", tasks, "--out", "b", "--quiet", cwd=tmp_path, site=site)
    assert broken.returncode != 0
    [line] = broken.stderr.strip().splitlines()
    assert "broken = mine_pkg.nowhere:Nothing" in line and "Traceback" not in broken.stderr


def test_run_directories_name_a_module_or_file_method_without_a_colon():
    """`tta run` and `tta experiment` name directories the same way; a colon breaks paths on
    some filesystems and in shell globs."""
    from pathlib import Path
    from tta.budget import Budget
    from tta.experiment import Cell
    from tta.run.solve import default_out, method_label
    assert method_label("icl") == "icl"
    assert method_label("my_pkg.mod:Mine") == "my_pkg.mod.Mine"
    assert method_label("plugins/last_output.py:LastOutput") == "last_output.LastOutput"
    assert default_out("plugins/x.py:X", "arc1-eval") == Path("runs") / "x.X-arc1-eval"
    cell = Cell(method="plugins/x.py:X", settings={}, budget=Budget(flops=1e12), seed=0)
    assert cell.directory(Path("r")) == Path("r") / "x.X-f1e12-seed0"


def test_a_subclass_of_a_built_in_method_loaded_by_path_keeps_its_own_name(tmp_path):
    """A researcher's variant of ttt_lora is another method.  Fails if it inherits the name
    `ttt_lora`: its runs were then recorded as ttt_lora, a ttt_lora run directory resumed with
    it, and a comparison took it for the paper's method."""
    from tta.method import get_method
    (tmp_path / "variant.py").write_text("from methods.ttt_lora import TTTLoRA\n\n\nclass MyTTT(TTTLoRA):\n    pass\n")
    variant = get_method(f"{tmp_path / 'variant.py'}:MyTTT")
    assert variant.name == "MyTTT" and get_method("ttt_lora").name == "ttt_lora"
    (tmp_path / "registered.py").write_text(
        "from methods.ttt_lora import TTTLoRA\nfrom tta.method import register\n\n\n"
        "@register('my_ttt')\nclass Registered(TTTLoRA):\n    pass\n")
    assert get_method(f"{tmp_path / 'registered.py'}:Registered").name == "my_ttt"
