"""Would the vote have settled before the budget ran out?  Runs a method on tasks, keeps every
view's answer in decoding order with the seconds of each decode call, and replays the vote
after each call: how many views (and seconds) a rule "stop filling once the two attempts have
not changed for S calls in a row" would have saved, and on which tasks it changes the attempts
or what they solve.

Filling views spends what is left of a task's cap after training (icl: the whole cap).  On long
tasks that is most of the time (the arc1-eval tasks that train no step decode 400-512 views), so
a rule that stops once more views stop changing the vote is a time lever; this script measures
it on a split before any method gets it.

    python scripts/view_settling.py --method ttt_full --dataset arc1-heldout --budget-flops 8e12 \
        --out reports/runs/levers/view-settling-heldout.jsonl [--limit N] [--tasks ID ...] [--shard I/N]
    python scripts/view_settling.py --replay reports/runs/levers/view-settling-heldout.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = (1, 2, 3, 4, 6, 8)   # S: decode calls in a row with the same two attempts


def grid_key_text(grid) -> str | None:
    """A short name for a grid (its values' sha1): the record keeps which views agreed, not the grids."""
    if grid is None:
        return None
    return hashlib.sha1(json.dumps(grid.tolist(), separators=(",", ":")).encode()).hexdigest()[:16]


def record_task(runner, task) -> dict:
    """The method on one task, with every view's answer (per test input, in decoding order,
    tagged by the decode call it came from) and each decode call's views and seconds."""
    from tta.inference import predict
    calls, captured = [], []
    original_decode, original_vote = predict.decode_views, predict.vote_per_test

    def timed_decode(lm, views, budget, room, batch_size):
        started = time.perf_counter()
        out = original_decode(lm, views, budget, room, batch_size)
        calls.append({"views": len(views), "seconds": round(time.perf_counter() - started, 3),
                      "tests": [v.test_index for v in views]})
        return out

    def keeping_vote(per_test, how="hierarchical", top_per_group=3):
        captured.append(per_test)
        return original_vote(per_test, how, top_per_group)

    predict.decode_views, predict.vote_per_test = timed_decode, keeping_vote
    try:
        record = runner.solve(task.id)
    finally:
        predict.decode_views, predict.vote_per_test = original_decode, original_vote
    return {"task_id": task.id, "correct": record.correct, "seconds": record.seconds, "error": record.error,
            "steps": (record.extra.get("adapt") or {}).get("steps"), "calls": calls,
            "truth": [grid_key_text(p.output) for p in task.test],
            "answers": answers_with_calls(captured[-1], calls) if captured else None}


def answers_with_calls(per_test, calls: list[dict]) -> list:
    """Each test input's answers as [group, grid, decode call]: views reach the vote in decoding
    order, so the i-th answer of test input t came from the call that decoded t's i-th view."""
    call_of = [[c for c, call in enumerate(calls) for t in call["tests"] if t == test] for test in range(len(per_test))]
    assert all(len(a) == len(c) for a, c in zip(per_test, call_of)), "answers and decoded views do not line up"
    return [[[group, grid_key_text(grid), c] for (group, grid), c in zip(preds, cs)]
            for preds, cs in zip(per_test, call_of)]


def attempts_after(answers: list, last_call: int, how: str = "hierarchical", top_per_group: int = 3) -> list:
    """The two attempts per test input from the views of decode calls 0..last_call."""
    import numpy as np
    from tta.inference.predict import vote
    out = []
    for preds in answers:
        # The vote needs grids only to tell answers apart: each name stands in as a 1x1 grid of its number.
        number = {k: i for i, k in enumerate(dict.fromkeys(k for _, k, _ in preds if k is not None))}
        name = {i: k for k, i in number.items()}
        kept = [(g, None if k is None else np.full((1, 1), number[k])) for g, k, c in preds if c <= last_call]
        out.append([None if a is None else name[int(a[0, 0])] for a in vote(kept, how, top_per_group)])
    return out


def solved(attempts: list, truth: list) -> bool:
    return all(t in a for a, t in zip(attempts, truth))


def replay(entries: list[dict]) -> None:
    """Per rule S: views and decode seconds kept, tasks whose attempts change, solved full vs stopped."""
    print(f"{len(entries)} tasks; decode calls: the configured views' call, then one per fill batch")
    full_solved = sum(solved(attempts_after(e["answers"], len(e["calls"]) - 1), e["truth"]) for e in entries)
    total_views = sum(c["views"] for e in entries for c in e["calls"])
    total_seconds = sum(c["seconds"] for e in entries for c in e["calls"])
    task_seconds = sum(e["seconds"] for e in entries)
    print(f"full: {full_solved} solved, {total_views} views, decode {total_seconds:.0f} s of {task_seconds:.0f} task-s")
    print("| S | views kept | decode s kept | task-s kept | attempts changed | solved (full -> stopped) |")
    print("|---|---|---|---|---|---|")
    for s in RULES:
        views = seconds = changed = now_solved = 0
        lost, gained = [], []
        for e in entries:
            n_calls = len(e["calls"])
            history = [attempts_after(e["answers"], c) for c in range(n_calls)]
            stop = n_calls - 1
            for c in range(1 + s, n_calls):   # fill calls start at 1; need S unchanged calls after one
                if all(history[c - j] == history[c] for j in range(1, s + 1)):
                    stop = c
                    break
            views += sum(call["views"] for call in e["calls"][: stop + 1])
            seconds += sum(call["seconds"] for call in e["calls"][: stop + 1])
            changed += history[stop] != history[-1]
            was, now = solved(history[-1], e["truth"]), solved(history[stop], e["truth"])
            now_solved += now
            if was and not now:
                lost.append(e["task_id"])
            if now and not was:
                gained.append(e["task_id"])
        saved = total_seconds - seconds
        print(f"| {s} | {views} ({views / total_views:.2f}) | {seconds:.0f} ({seconds / max(total_seconds, 1e-9):.2f}) | "
              f"{task_seconds - saved:.0f} ({(task_seconds - saved) / task_seconds:.2f}) | {changed} | "
              f"{full_solved} -> {now_solved} (lost {', '.join(lost) or 'none'}; gained {', '.join(gained) or 'none'}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replay", type=Path, nargs="+", help="JSONL files written by a run of this script")
    parser.add_argument("--method", default="ttt_full")
    parser.add_argument("--dataset", default="arc1-heldout")
    parser.add_argument("--budget-flops", type=float, default=8e12)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--tasks", nargs="+")
    parser.add_argument("--shard", help="I/N: every N-th task from the I-th")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.replay:
        entries = [json.loads(line) for path in args.replay for line in path.read_text().splitlines() if line]
        for e in entries:
            for call in e["calls"]:
                call.pop("tests", None)
        replay([e for e in entries if not e["error"]])
        return
    if args.out is None:
        parser.error("--out is needed to record (or --replay FILE)")
    import torch
    torch.set_num_threads(args.threads)
    from tta.budget import Budget
    from tta.run.solve import RunSpec, TaskRunner, prepare
    spec = RunSpec(method=args.method, dataset=args.dataset, limit=args.limit, task_ids=args.tasks,
                   budget=Budget(flops=args.budget_flops), out=Path("/tmp/view_settling_unused"),
                   shard=tuple(int(x) for x in args.shard.split("/")) if args.shard else None)
    cls, config, dataset, _, _ = prepare(spec)
    runner = TaskRunner(spec, cls, config, dataset)
    done = set()
    if args.out.exists():
        done = {json.loads(line)["task_id"] for line in args.out.read_text().splitlines() if line}
    for task in dataset.tasks:
        if task.id in done:
            continue
        entry = record_task(runner, task)
        if entry["answers"] is None:
            entry["error"] = entry["error"] or "no vote captured"
        with args.out.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"{task.id}: {entry['seconds']:.0f} s, {len(entry['calls'])} decode calls, steps {entry['steps']}, "
              f"correct {entry['correct']}", flush=True)


if __name__ == "__main__":
    main()
