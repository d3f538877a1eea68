"""The package's layering: no import cycles, and no module imports one above it.

Every import counts, including those inside functions (a lazy import is still a dependency),
read from the source with `ast`, so the test needs no model and runs in a second."""
import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first.  A module may import its own level and any level below it, never above.
LEVELS = [
    ("tta.settings", "tta.threads", "tta.budget", "tta.scoring"),   # no project imports
    ("tta.data",),                                                # tasks, datasets, generator, augment
    ("tta.model",),                                               # encoding, loading, batching, attention, cache
    ("tta.inference",),                                           # decoding, search, views, vote
    ("tta.training",),                                            # examples, one step, adapters, pretraining
    ("tta.method",),                                              # the method contract and registry
    ("methods",),                                                 # built-in methods (plugins)
    ("tta.run",),                                                 # records, one task, the loop, Ray
    ("tta.reporting",),                                           # tables, statistics, reports, pictures
    ("tta.experiment", "tta.cli", "tta"),                         # orchestration and the command line
]


def level_of(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LEVELS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{module} is in no level of the layout; add it to LEVELS"
    return best


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in ("tta", "methods"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(path: Path, modules: dict) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_no_module_imports_a_module_above_it():
    upward = [f"{m} (level {level_of(m)}) imports {t} (level {level_of(t)})"
              for m, targets in graph().items() for t in sorted(targets)
              if level_of(t) > level_of(m) and not (m == "tta" or t == "tta")]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycles():
    edges = graph()
    # a package's __init__ importing its own modules is how a package exposes them, not a cycle
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_the_layering_test_would_catch_an_upward_import(tmp_path, monkeypatch):
    # The checks read source files: a data module that imports the runner must be reported.
    fake = tmp_path / "tasks.py"
    fake.write_text("def f():\n    from tta.run.runner import run\n")
    modules = project_modules()
    assert imports_of(fake, modules) == {"tta.run.runner"}
    assert level_of("tta.run.runner") > level_of("tta.data.tasks")


@pytest.mark.parametrize("module", sorted(project_modules()))
def test_every_module_imports_on_its_own(module):
    import importlib
    importlib.import_module(module)
