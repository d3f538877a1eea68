"""The `tta` command line (click).  Every expected failure is one line on stderr and a non-zero
exit; tracebacks are for bugs only."""
from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
from pathlib import Path

import click

from tta.threads import choose_threads, passive_wait

passive_wait()   # before torch loads OpenMP: waiting threads sleep instead of spinning (see tta.threads)

from tta.budget import DEFAULT_FLOPS, Budget  # noqa: E402  (after passive_wait)

# Errors that are the user's input, not our bug: shown as one line, exit code 2.
def _user_errors():
    from tta.data.contamination import ContaminationError
    from tta.method import MethodError
    from tta.model.loading import ModelError
    from tta.reporting.report import ReportError
    from tta.run.record import RecordError
    from tta.run.runner import RunError
    from tta.reporting.show import ShowError
    from tta.data.tasks import TaskError
    return (TaskError, ModelError, MethodError, RunError, RecordError, ReportError, ContaminationError, ShowError)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class Group(click.Group):
    """Turns every expected error -- ours, and click's usage errors -- into one line on stderr.
    SIGTERM (what `kill` and batch schedulers send) stops a run as Ctrl-C does: the task in flight
    is dropped, worker processes end, every finished task is already on disk, exit code 130."""

    def main(self, args=None, prog_name=None, **kwargs):
        if threading.current_thread() is threading.main_thread():   # only there can Python set handlers
            signal.signal(signal.SIGTERM, _interrupt)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            command = f" ({e.ctx.command_path})" if getattr(e, "ctx", None) else ""
            click.echo(f"error{command}: {e.format_message()}", err=True)
            sys.exit(e.exit_code or 2)
        except _user_errors() as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=Group)
def main():
    """Compare test-time adaptation methods on ARC under identical compute budgets."""


class FlopsCap(click.ParamType):
    """A FLOP cap per task: a positive number, or `none` for no cap."""
    name = "FLOPS|none"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == UNCAPPED:
            return value
        if str(value).strip().lower() in ("none", "uncapped"):
            return UNCAPPED
        try:
            flops = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number of FLOPs nor 'none'", param, ctx)
        if not 0 < flops < float("inf"):
            self.fail(f"{value!r}: give a positive number of FLOPs, or 'none' for no cap", param, ctx)
        return flops


UNCAPPED = "none"


def _budget(flops, seconds) -> Budget:
    """The cap `tta run` uses: DEFAULT_FLOPS when neither flag is given; `--budget-flops none`
    for no FLOP cap (alone: uncapped)."""
    if flops not in (None, UNCAPPED) and seconds is not None:
        raise click.UsageError("give --budget-flops or --budget-seconds, not both")
    if flops is None and seconds is None:
        return Budget(flops=DEFAULT_FLOPS)
    return Budget(None if flops in (None, UNCAPPED) else flops, seconds)


def _plugin_option(f):
    return click.option("--plugin", "plugins", multiple=True, metavar="FILE_OR_MODULE",
                        help="import a file or module first, so its @register(\"name\") methods run by name (repeatable)")(f)


def _threads_option(f):
    return click.option("--threads", type=click.IntRange(min=1),
                        help="CPU threads for torch [default: the cores this process may use, within any container quota]")(f)


def _workers_option(f):
    return click.option("--workers", type=click.IntRange(min=1),
                        help="tasks solved side by side: N worker processes, each loading the model once, with "
                             "--threads each [default: the cores shared out]; with --executor ray, N actors. "
                             "On a CPU, one thread per task keeps more cores busy than many threads on one task")(f)


def _command_line() -> str:
    return "tta " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@main.command()
@click.option("--method", required=True, help="method name (see `tta methods`), module:Class or path/to/file.py:Class")
@click.option("--dataset", default="arc1-eval", show_default=True, help="dataset name or path")
@click.option("--limit", type=click.IntRange(min=1), help="first N tasks (sorted by id)")
@click.option("--sample", type=click.IntRange(min=1), help="N tasks spread evenly over the sorted ids (every k-th)")
@click.option("--tasks", "task_ids", help="comma-separated task ids")
@click.option("--model", default="default", show_default=True, help="default | random:SIZE | PATH | ORG/NAME")
@click.option("--budget-flops", type=FlopsCap(),
              help=f"FLOP cap per task, or 'none' for no cap [default: {DEFAULT_FLOPS:g} unless --budget-seconds]")
@click.option("--budget-seconds", type=click.FloatRange(min=0, min_open=True), help="wall-second cap per task")
@click.option("--task-timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="stop a task still running after this many wall seconds and record it as failed (a guard "
                   "against a method that hangs; set it well above any --budget-seconds)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a method setting")
@click.option("--out", type=click.Path(path_type=Path), help="run directory (default runs/METHOD-DATASET)")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | mps")
@click.option("--force", is_flag=True, help="evaluate the default model even on tasks it was trained on")
@click.option("--shard", help="I/N: run every N-th task starting from the I-th (0-based), for batch schedulers")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="where tasks run: this process, or a Ray cluster")
@click.option("--ray-address", help="address of a running Ray cluster (default: start a local one)")
@click.option("--retry-failed", is_flag=True, help="rerun the tasks of this run directory that failed, replacing their records")
@click.option("--label", help="what reports call this run's method, e.g. ttt_lora-lr3e-3 for a variant (default: its name)")
@_plugin_option
@_threads_option
@_workers_option
@click.option("--quiet", is_flag=True, help="no progress bar")
def run(method, dataset, limit, sample, task_ids, model, budget_flops, budget_seconds, task_timeout, seed, overrides, out,
        device, force, shard, executor, ray_address, retry_failed, label, plugins, threads, workers, quiet):
    """Run one method over an ARC task set into a run directory (resumable)."""
    choose_threads(threads)
    from tta.run.runner import RunSpec, read_results, run as run_method
    from tta.scoring import aggregate

    spec = RunSpec(shard=_parse_shard(shard) if shard else None, method=method, dataset=dataset, model=model, limit=limit, sample=sample,
                   task_ids=[t.strip() for t in task_ids.split(",") if t.strip()] if task_ids else None,
                   budget=_budget(budget_flops, budget_seconds), seed=seed, overrides=list(overrides),
                   out=out, device=device, command=_command_line(), force=force, plugins=list(plugins),
                   retry_failed=retry_failed, label=label, task_timeout=task_timeout)
    out_dir = run_method(spec, progress=not quiet, executor=executor, ray_address=ray_address,
                         log=lambda line: click.echo(line, err=True), workers=workers)
    records = read_results(out_dir / "results.jsonl")
    click.echo(_task_table(records, json.loads((out_dir / "manifest.json").read_text())["task_ids"]))
    click.echo(_summary_line(records, aggregate))
    if any(r.get("graded") is False for r in records):
        click.echo(f"attempts in {out_dir / 'submission.json'} (Kaggle format)")
    if any(r["error"] is not None for r in records):
        click.echo("rerun the failed tasks with the same command and --retry-failed")
    click.echo(f"results in {out_dir} (full report: tta report {shlex.quote(str(out_dir))})")


TABLE_ROWS = 40   # tasks shown in the table at the end of a run; `tta report` has them all


def _task_table(records: list[dict], order: list[str], limit: int = TABLE_ROWS) -> str:
    """The per-task table printed at the end of a run: task, score, FLOPs, share of the cap,
    seconds, error (the first `limit` tasks in run order)."""
    by_id = {r["task_id"]: r for r in records}
    rows = [("task", "score", "FLOPs", "of cap", "seconds", "error")]
    shown = [t for t in order if t in by_id]
    for task_id in shown[:limit]:
        r = by_id[task_id]
        score = "ungraded" if r.get("graded") is False else f"{r['score']:.2g}"
        share = r.get("budget_share")
        error = r["error"] or ""
        rows.append((task_id, "failed" if r["error"] else score, f"{r.get('flops') or 0:.2e}",
                     "-" if share is None else f"{share:.0%}", f"{r.get('seconds') or 0:.1f}",
                     error if len(error) <= 90 else error[:87] + "..."))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
    if len(shown) > limit:
        lines.append(f"... and {len(shown) - limit} more tasks")
    missing = len(order) - len(shown)
    if missing:
        lines.append(f"{missing} task{'s' if missing != 1 else ''} not run yet")
    return "\n".join(line.rstrip() for line in lines)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not I/N", param_hint="--shard") from None
    if not 0 <= index < count:
        raise click.BadParameter(f"{text!r}: need 0 <= I < N", param_hint="--shard")
    return index, count


def _summary_line(records, aggregate) -> str:
    ungraded = sum(r.get("graded") is False for r in records)
    failed = sum(r["error"] is not None for r in records)
    records = [r for r in records if r.get("graded") is not False]
    if not records:
        return (f"{ungraded} tasks ungraded: the dataset has no solutions to score against"
                + (f"; {failed} failed" if failed else ""))
    acc = aggregate([r["correct"] for r in records])
    cells = [c for r in records for c in r.get("metrics", {}).get("cell_acc", [])]
    nlls = [x for r in records for x in r.get("metrics", {}).get("nll", []) if x is not None]
    line = (f"{len(records)} tasks: exact (kaggle) {acc['kaggle']:.1%}, per-task {acc['benchmarking']:.1%}, "
            f"all-outputs {acc['all_outputs']:.1%}")
    if cells:
        line += f"; cell accuracy {sum(cells) / len(cells):.3f}"
    if nlls:
        line += f", true-answer NLL {sum(nlls) / len(nlls):.3f}"
    return line + (f"; {failed} failed" if failed else "") + (f"; {ungraded} more ungraded (no solutions)" if ungraded else "")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", help="method the others are compared with, or one run (its directory, or its name when "
                                "that is no method's): every other run, of any method, is compared with it "
                                "[default: icl, else the first run]")
@click.option("--out", type=click.Path(path_type=Path), help="report path (default reports/compare-RUNS.md)")
@click.option("--allow-mismatch", is_flag=True, help="compare runs over different tasks/models/budgets, saying so")
def compare(runs, baseline, out, allow_mismatch):
    """Compare run directories in a markdown report."""
    from tta.reporting.report import write_report

    out = out or Path("reports") / ("compare-" + "-vs-".join(Path(r).name for r in runs)[:120] + ".md")
    path = write_report(list(runs), out, baseline=baseline or "icl", allow_mismatch=allow_mismatch,
                        command=_command_line(), baseline_given=baseline is not None)
    click.echo(f"report written to {path}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--task", "task_ids", multiple=True, help="task id to draw (repeatable; default: every task of the runs)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("pictures"), show_default=True,
              help="folder for the PNGs (one per task)")
def show(runs, task_ids, out):
    """Draw tasks as pictures: demonstrations, test input, true output and each run's two attempts."""
    from tta.reporting.show import show_runs
    pictures = show_runs(list(runs), list(task_ids), out, say=lambda line: click.echo(line, err=True))
    click.echo(f"{len(pictures)} pictures written to {out}/")


@main.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN_DIR...")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="the merged run directory")
@click.option("--overlay", is_flag=True,
              help="the first directory is a whole run, the others rerun some of its tasks (same method, model, "
                   "dataset, budget and seed; settings may differ): keep the first run's results except where a "
                   "rerun has one, and record in the manifest which tasks ran with which settings")
def merge(shards, out, overlay):
    """Join the directories of `tta run --shard I/N` runs into one run directory, or with
    --overlay lay a partial rerun over a run (`tta merge RUN RERUN --overlay --out DIR`)."""
    from tta.run import runner
    if overlay:
        if len(shards) < 2:
            raise click.UsageError("--overlay needs a run and at least one rerun of some of its tasks")
        out = runner.overlay(shards[0], list(shards[1:]), out, command=_command_line())
        click.echo(f"overlaid {len(shards) - 1} rerun(s) on {shards[0]} into {out}")
        return
    click.echo(f"merged {len(shards)} shards into {runner.merge(list(shards), out)}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="also write the report here")
def report(run_dir, out):
    """Summarise one run: accuracy, per-task results, failures."""
    from tta.reporting.report import write_run_report
    click.echo(write_run_report(run_dir, out))


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--runs", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="where the run directories go (runs/NAME/METHOD-BUDGET-SEED)")
@click.option("--reports", type=click.Path(path_type=Path), default=Path("reports"), show_default=True)
@_plugin_option
@_threads_option
@_workers_option
@click.option("--quiet", is_flag=True, help="no progress bars")
def experiment(file, runs, reports, plugins, threads, workers, quiet):
    """Run every cell of an experiment TOML (resuming finished ones), then write its report.
    A plan without `budgets` runs at the default cap; `budgets = ["none"]` is uncapped."""
    choose_threads(threads)
    from tta.experiment import run_experiment
    path = run_experiment(file, runs, reports, progress=not quiet, log=lambda m: click.echo(m, err=True),
                          command=_command_line(), plugins=list(plugins), workers=workers)
    click.echo(f"report written to {path}")


@main.command()
def datasets():
    """List the datasets by name, with task counts."""
    from tta.data import synthetic
    from tta.data.datasets import dataset_names, load_dataset
    for name in dataset_names():
        if name in synthetic.DATASETS:   # counted without generating (gen-train and gen-eval took 17 s)
            n = synthetic.size(name)
            click.echo(f"{name:12s} {n:5d} tasks  (generated when first used)" if n > synthetic.PARALLEL_ABOVE
                       else f"{name:12s} {n:5d} tasks  {n * synthetic.TEST_PAIRS:5d} test outputs")
            continue
        d = load_dataset(name)
        outputs = sum(len(t.test) for t in d.tasks)
        click.echo(f"{name:12s} {len(d.tasks):5d} tasks  {outputs:5d} test outputs"
                   + (f"  ({len(d.failures)} invalid)" if d.failures else ""))
    click.echo("or a PATH: a directory of task .json files, one task file, or a Kaggle challenges file "
               "(or the folder holding it, with its solutions file: without one the run is ungraded)")


@main.command()
@click.argument("names", nargs=-1, metavar="[METHOD]...")
@_plugin_option
def methods(names, plugins):
    """List the methods and their settings (change one with --set KEY=VALUE); name some to see only them."""
    from tta.method import REGISTRY, discover, describe, get_method, load_plugins
    discover()
    load_plugins(plugins)
    for name in names or sorted(REGISTRY):
        cls = get_method(name)   # a name, module:Class or path/to/file.py:Class; an unknown one is one line
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        click.echo(f"{name}: {doc[0] if doc else ''}")
        if cls.spends:
            click.echo(f"  a bigger budget buys: {cls.spends}")
        for field, kind, default, help_text in describe(cls):
            click.echo(f"    {field} ({kind}) = {default!r}  {help_text}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("checkpoints/pretrain"), show_default=True,
              help="model directory (rerunning resumes from its checkpoint)")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), help="wall-clock length of the run")
@click.option("--steps", type=click.IntRange(min=1), help="optimiser steps")
@click.option("--size", default="default", show_default=True, help="model size (tiny, small, default, medium)")
@click.option("--init", "init", metavar="MODEL",
              help="start from this model's weights ('default' or a model directory) instead of random ones: "
                   "continued pretraining on new data, with a fresh optimiser and schedule (--size is ignored)")
@click.option("--positions", type=click.Choice(["grid", "sequential"]), default="grid", show_default=True,
              help="position ids: grid geometry (tta.model.encoding.GridPositions) or plain 0, 1, 2, ...")
@click.option("--data", default="arc1-train,arc2-train,gen-train", show_default=True,
              help="training datasets, comma-separated")
@click.option("--exclude", default="arc1-eval,arc2-eval,arc1-heldout,gen-eval", show_default=True,
              help="datasets the training data must not overlap, comma-separated")
@click.option("--drop-overlap", is_flag=True, help="drop training tasks that overlap --exclude instead of refusing")
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--tokens-per-batch", type=int, default=8192, show_default=True)
@click.option("--max-len", type=int, default=2048, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-minutes", type=float, default=5.0, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="processes drawing batches [default: 0 on the CPU, up to 8 on a GPU]")
@click.option("--device", default="auto", show_default=True)
@_threads_option
def pretrain(out, minutes, steps, size, init, positions, data, exclude, drop_overlap, lr, tokens_per_batch, max_len, seed,
             checkpoint_minutes, workers, device, threads):
    """Train the embedded base model, from scratch or onward from --init (resumable)."""
    choose_threads(threads)
    from tta.training.pretrain import PretrainConfig, main_log, pretrain as run_pretrain

    if minutes is None and steps is None:
        raise click.UsageError("give --minutes or --steps")
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]
    config = PretrainConfig(data=split(data), exclude=split(exclude), drop_overlap=drop_overlap, size=size, init=init, positions=positions, minutes=minutes, steps=steps,
                            tokens_per_batch=tokens_per_batch, max_len=max_len, lr=lr, seed=seed,
                            checkpoint_minutes=checkpoint_minutes, workers=workers)
    state = run_pretrain(config, out, device=device, command=_command_line(), log=main_log)
    click.echo(f"{state['step']} steps, {state['tokens']:,} tokens; model in {out}")


def entry():
    """The `tta` command: `main`, and an exit that a thread still computing cannot spoil.  A
    method's thread left running forwards (a run stops on one; see `tta.threads`) made Python's
    exit abort inside torch ("terminate called without an active exception", exit code 134
    instead of the run's 2), and a non-daemon one made it wait for the thread to end.  With such
    a thread alive, the exit handlers run and the process ends at once, with the command's code."""
    try:
        main()
    except SystemExit as e:
        from tta.threads import child_processes, left_working
        if left_working({threading.main_thread()}, child_processes()):   # threads only: a process cannot spoil the exit
            import atexit
            import os
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
        raise


if __name__ == "__main__":
    entry()
