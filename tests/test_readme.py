"""Every `tta` command the README shows works as written, on a fresh checkout, at tiny scale.

The commands are read from the README itself (its bash blocks), so a command added there is
tested here; only their scale is changed: one task instead of 20, a random tiny model, a small
budget, one pretraining step.  They run in order in an empty directory, as a new user would type
them (`tta compare` and `tta show` use the runs made by the lines before them).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from tta.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """The `tta ...` commands of the README's bash blocks, comments removed; of the install line,
    the command it ends with."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    lines = [line.rsplit("&& ", 1)[-1] for line in lines]
    return [line for line in lines if line.startswith("tta ")]


def at_tiny_scale(command: str) -> list[str]:
    args = shlex.split(command)[1:]
    swap = {"--limit": "1", "--sample": "1", "--budget-flops": "2e8", "--minutes": None}
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in swap:
            skip = True
            if swap[arg] is not None:
                out += [arg, swap[arg]]
            continue
        out.append(arg)
    if out[0] == "run":
        out += ["--model", "random:tiny", "--quiet"] + ([] if "--budget-flops" in out else ["--budget-flops", "2e8"])
    if out[0] == "pretrain":
        out += ["--steps", "1", "--size", "tiny", "--data", "gen-train", "--exclude", "gen-eval"]
    return out


def test_the_readme_shows_the_commands_a_user_needs():
    commands = readme_commands()
    assert commands[0] == "tta run --method ttt_lora --limit 5"   # the first line's main job
    for verb in ("run", "compare", "report", "show", "methods", "datasets", "pretrain"):
        assert any(c.split()[1] == verb for c in commands), verb


def test_every_readme_command_works_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in readme_commands():
        args = at_tiny_scale(command)
        result = runner.invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, f"{command}\n-> tta {' '.join(args)}\n{result.output}"
    assert {"icl", "ttt"} <= {p.name for p in Path("runs").iterdir()}
    assert list(Path("reports").glob("compare-*.md")) and list(Path("pictures").glob("*.png"))
