"""`tta experiment FILE`: a whole comparison -- methods x budgets x seeds -- from one TOML file.

    name = "default"                 # report: reports/<name>.md
    dataset = "gen-eval"
    limit = 20                       # first N ids; or sample = 20 (spread evenly); or tasks = ["id", ...]
    model = "default"
    seeds = [0]
    budgets = ["none", 1e12]         # FLOPs per task; "none" = uncapped; or budget_seconds = [...]
                                     # (without either: tta.budget.DEFAULT_FLOPS, as `tta run`)
    baseline = "icl"
    task_timeout = 600               # optional: wall seconds before a task is stopped and fails
    [methods.icl]
    [methods.ttt_lora]
    max_examples = 64                # any setting of the method, as with --set
    [methods."ttt_lora-lr3e-3"]      # a variant: any label, with the method it runs
    method = "ttt_lora"
    lr = 3e-3

Every cell is an ordinary run directory under `runs/<name>/` (so an interrupted experiment
resumes finished cells and tasks), and the report is `tta compare` over all of them.  A cell that
another process is writing (a second experiment, or `tta run --out` on that cell to share the
grid between processes) is passed over and taken up last, once that process lets go.  Every
method's settings are checked before the first cell runs, so a typo in the last method's table
costs nothing.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from tta.budget import DEFAULT_FLOPS, Budget
from tta.method import MethodError, get_method, load_plugins, make_config
from tta.run.runner import DirectoryBusy, RunError, RunSpec, run
from tta.run.solve import DifferentRun, check_label, method_label


@dataclass
class Cell:
    method: str
    settings: dict
    budget: Budget
    seed: int
    label: str | None = None   # a variant's table name (its `method` key names the method)

    def directory(self, root: Path) -> Path:
        # "%g" keeps every digit a plan gives (6.4e12 -> f6.4e12; "%.0e" made it f6e12, the same
        # name as a 6e12 cell); round budgets keep their names (2e11 -> f2e11).
        cap = f"f{self.budget.flops:g}".replace("+", "") if self.budget.flops else (
            f"s{self.budget.seconds:g}" if self.budget.seconds else "uncapped")
        return root / f"{self.label or method_label(self.method)}-{cap}-seed{self.seed}"


def _budgets(plan: dict, where: str) -> list[Budget]:
    """The plan's caps: `budgets` (FLOPs) or `budget_seconds`, each a list of positive numbers or
    "none".  Before these checks, `budget_seconds = [-1]` ran every cell with each task refused at
    once (200 tasks scored 0 in 10 s), and a plan giving both kinds silently dropped its FLOPs."""
    if "budgets" in plan and "budget_seconds" in plan:
        raise RunError(f"{where}: budgets (FLOPs) and budget_seconds are two kinds of cap; give one of them")
    key, unit = ("budget_seconds", "seconds") if "budget_seconds" in plan else ("budgets", "FLOPs")
    values = plan.get(key, [DEFAULT_FLOPS])
    if not isinstance(values, list) or not values:
        raise RunError(f"{where}: {key} must be a list, e.g. {key} = [{'30' if unit == 'seconds' else '1e12'}], "
                       f"not {values!r}")
    budgets = []
    for b in values:
        if b != "none" and not _positive_number(b):
            raise RunError(f"{where}: {key} must be positive numbers of {unit} or \"none\", not {b!r}")
        cap = None if b == "none" else float(b)
        budgets.append(Budget(seconds=cap) if unit == "seconds" else Budget(flops=cap))
    return budgets


def _positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < float("inf")


def _check_values(plan: dict, where: str) -> None:
    """Each of the plan's keys holds the kind of value it takes (one-line RunError), so a typo in
    a value costs nothing and does not surface part-way through the grid as a traceback."""
    for key in ("name", "dataset", "model", "baseline"):
        if key in plan and not (isinstance(plan[key], str) and plan[key]):
            raise RunError(f"{where}: {key} must be a string, not {plan[key]!r}")
    for key in ("limit", "sample"):
        if key in plan and (isinstance(plan[key], bool) or not isinstance(plan[key], int) or plan[key] < 1):
            raise RunError(f"{where}: {key} must be a whole number of tasks, at least 1, not {plan[key]!r}")
    tasks = plan.get("tasks")
    if tasks is not None and not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
        raise RunError(f"{where}: tasks must be a list of task ids, e.g. tasks = [\"00576224\"], not {tasks!r}")
    seeds = plan.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise RunError(f"{where}: seeds must be a list of whole numbers, e.g. seeds = [0, 1], not {seeds!r}")
    _budgets(plan, where)
    timeout = plan.get("task_timeout")
    if timeout is not None and not _positive_number(timeout):
        raise RunError(f"{where}: task_timeout must be a positive number of seconds, not {timeout!r}")


PLAN_KEYS = {"name", "dataset", "limit", "sample", "tasks", "model", "seeds", "budgets", "budget_seconds",
             "baseline", "methods", "task_timeout"}


def load_plan(path: Path) -> dict:
    try:
        plan = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise RunError(f"{path}: not valid TOML ({e})") from None
    if not plan.get("methods"):
        raise RunError(f"{path}: names no [methods.NAME] tables")
    unknown = sorted(set(plan) - PLAN_KEYS)
    if unknown:
        raise RunError(f"{path}: unknown key {', '.join(map(repr, unknown))} (known: {', '.join(sorted(PLAN_KEYS))})")
    plan.setdefault("name", path.stem)
    return plan


def _cost(budget: Budget) -> float:
    """Sort key: smaller caps first, uncapped last."""
    cap = budget.flops if budget.flops is not None else budget.seconds
    return float("inf") if cap is None else cap


def cells(plan: dict, where: str) -> list[Cell]:
    """Every (budget, seed, method) cell, the cheapest budget first: an experiment stopped part
    way (a 4-hour grid on a laptop) then holds whole comparisons -- every method on the same tasks
    -- at the small budgets, instead of one method at every budget and nothing to compare it to."""
    methods = [_method_settings_label(name, table) for name, table in plan["methods"].items()]
    return [Cell(method, dict(settings), budget, seed, label)
            for budget in sorted(_budgets(plan, where), key=_cost)
            for seed in plan.get("seeds", [0])
            for method, settings, label in methods]


def _method_settings_label(name: str, table: dict) -> tuple[str, dict, str | None]:
    """`[methods.NAME]` runs method NAME; a table with a `method` key is a variant: NAME is its
    label (the cells' directories and the report's rows) and `method` the method it runs."""
    settings = dict(table)
    if "method" not in settings:
        return name, settings, None
    return settings.pop("method"), settings, name


def validate(plan: dict, where: str) -> None:
    """The plan's values, every method named and every setting typed, before any cell runs
    (one-line RunError)."""
    _check_values(plan, where)
    named = set(plan["methods"]) | {t["method"] for t in plan["methods"].values() if isinstance(t, dict) and "method" in t}
    if "baseline" in plan and plan["baseline"] not in named:   # found now, not after the grid has run
        raise RunError(f"{where}: baseline {plan['baseline']!r} is none of the plan's methods ({', '.join(sorted(named))})")
    for name, table in plan["methods"].items():
        if not isinstance(table, dict):
            raise RunError(f"{where}: methods.{name} must be a table ([methods.{name}])")
        if "method" in table and not isinstance(table["method"], str):
            raise RunError(f"{where}: [methods.{name}]: method must be a method's name, not {table['method']!r}")
        try:
            method, settings, label = _method_settings_label(name, table)
            if label is not None:
                check_label(label)
            make_config(get_method(method), settings)
        except (MethodError, RunError) as e:
            raise RunError(f"{where}: [methods.{name}]: {e}") from None


def run_experiment(path: Path, runs_root: Path = Path("runs"), reports_root: Path = Path("reports"),
                   progress: bool = True, log=print, command: str = "", plugins: list[str] | None = None,
                   workers: int | None = None) -> Path:
    from tta.reporting.report import write_report

    plan = load_plan(path)
    load_plugins(plugins)
    validate(plan, str(path))
    root = runs_root / plan["name"]
    grid = cells(plan, str(path))

    def run_cell(cell: Cell, wait: bool) -> None:
        run(RunSpec(method=cell.method, dataset=plan.get("dataset", "arc1-eval"), model=plan.get("model", "default"),
                    limit=plan.get("limit"), sample=plan.get("sample"), task_ids=plan.get("tasks"), budget=cell.budget, seed=cell.seed,
                    overrides=cell.settings, out=cell.directory(root), command=command or f"tta experiment {path}",
                    plugins=list(plugins or []), label=cell.label, task_timeout=plan.get("task_timeout")),
            progress=progress, log=log, wait_for_directory=wait, workers=workers)

    busy, failed = [], {}
    for cell in grid:
        log(f"== {cell.directory(root)}")
        try:
            run_cell(cell, wait=False)
        except DifferentRun as e:
            # A cell made before a default changed: the user picks the runs root, not the cell's
            # directory, so say so in the experiment's terms.
            raise DifferentRun(e.out, e.detail, "run the experiment with another --runs "
                               "(the cells already there stay as they are)") from None
        except DirectoryBusy as e:
            log(f"   busy, coming back to it last: {e}")
            busy.append(cell)
        except RunError as e:   # this cell's method cannot run (its setup failed, its reset leaks): the others go on
            log(f"   error: {e}")
            failed[cell.directory(root)] = str(e)
    for cell in busy:   # whatever the other process left undone, once it lets go
        log(f"== {cell.directory(root)} (waiting for the other process)")
        run_cell(cell, wait=True)
    directories = [cell.directory(root) for cell in grid if cell.directory(root) not in failed]
    several_budgets = len(_budgets(plan, str(path))) > 1
    report = None
    if directories:
        report = write_report(directories, reports_root / f"{plan['name']}.md", baseline=plan.get("baseline", "icl"),
                              allow_mismatch=several_budgets or bool(failed), command=command or f"tta experiment {path}",
                              baseline_given="baseline" in plan and not failed, missing=failed)
    if failed:
        directory, reason = next(iter(failed.items()))
        covered = f"; the report {report} covers the other cells" if report else ""
        raise RunError(f"{len(failed)} of {len(grid)} cells stopped, first {directory}: {reason}{covered} "
                       "(fix it, then rerun the same command: finished cells are kept)")
    return report
