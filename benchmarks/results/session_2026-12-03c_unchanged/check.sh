#!/usr/bin/env bash
# Built-ins after this session's changes: the same commands as session_2026-12-03b_unchanged.
set -u
cd /work/main && . .venv/bin/activate
OUT=${OUT:-/tmp/chk2/runs}; mkdir -p $OUT; export OUT
for M in icl ttt_lora ttt_full sampling; do
  tta run --method $M --dataset arc1-heldout --limit 3 --budget-flops 1e11 --out $OUT/new-$M --quiet > /dev/null 2>&1
done
tta run --method less --dataset gen-eval --limit 3 --budget-flops 1e11 --out $OUT/new-less --quiet > /dev/null 2>&1
for M in ttt_lora ttt_full; do
  tta run --method $M --dataset arc1-heldout --limit 3 --budget-flops 3e10 --out $OUT/new-$M-small --quiet > /dev/null 2>&1
done
tta run --method less --dataset gen-eval --limit 3 --budget-flops 3e10 --out $OUT/new-less-small --quiet > /dev/null 2>&1
python - <<'PY'
import json, os, pathlib
ref = pathlib.Path("/work/main/benchmarks/results/session_2026-12-03b_unchanged")
new = pathlib.Path(os.environ["OUT"])
pairs = same = 0
for d in sorted(ref.glob("new-*")):
    a = {json.loads(l)["task_id"]: json.loads(l) for l in (d / "results.jsonl").read_text().splitlines()}
    b = {json.loads(l)["task_id"]: json.loads(l) for l in (new / d.name / "results.jsonl").read_text().splitlines()}
    for t in a:
        pairs += 1
        keys = ("attempts", "flops", "metrics", "error")
        eq = all(a[t].get(k) == b.get(t, {}).get(k) for k in keys)
        same += eq
        if not eq:
            print("DIFF", d.name, t, [k for k in keys if a[t].get(k) != b.get(t, {}).get(k)])
print(f"{same}/{pairs} task pairs identical")
PY
