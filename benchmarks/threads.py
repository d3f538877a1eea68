"""Two `tta run` processes on one machine: how much slower each is than alone, under OpenMP's
default (spinning) wait policy and under the passive policy `tta` sets.  Aim: side by side, each
finishes within 2.5x its time alone (two jobs on the same cores should take about 2x).

    python benchmarks/threads.py [--tasks 4] [--budget 5e11] [--policies unset OMP_WAIT_POLICY=PASSIVE ...]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def tta_run(out: str, tasks: int, budget: str, policy: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy != "unset":
        key, _, value = policy.partition("=")
        env[key] = value
    return subprocess.Popen([sys.executable, "-m", "tta.cli", "run", "--method", "icl", "--dataset", "gen-eval",
                             "--limit", str(tasks), "--budget-flops", budget, "--out", out, "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wall(procs: list[subprocess.Popen]) -> float:
    start = time.perf_counter()
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"tta run failed: {err.strip().splitlines()[-1]}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--budget", default="5e11")
    parser.add_argument("--policies", nargs="+", default=["unset", "OMP_WAIT_POLICY=PASSIVE"],
                        help="environments to compare: unset (OpenMP's default) or VAR=VALUE")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; icl on {args.tasks} gen-eval tasks at {args.budget} FLOPs each, per process")
    for policy in args.policies:
        with tempfile.TemporaryDirectory() as d:
            alone = wall([tta_run(f"{d}/a", args.tasks, args.budget, policy)])
            pair = wall([tta_run(f"{d}/b{i}", args.tasks, args.budget, policy) for i in range(2)])
        print(f"{policy:24s}  alone {alone:6.1f} s   two side by side {pair:6.1f} s   "
              f"ratio {pair / alone:.2f}  (aim <= 2.5)")


if __name__ == "__main__":
    main()
