#!/usr/bin/env bash
# Re-creates every committed report under reports/ and the evaluation in the model card, from
# scratch, on the embedded defaults.  Each run directory lands under runs/ (resumable).
# Every method spends nearly all of each cap, so the time is the caps' sum: on a 2-core CPU
# about 3 hours with one job at a time.  Two halves can run side by side, each pinned to one core
# with one thread (`bash scripts/reproduce_reports.sh experiments` and `... others`), about 1.5 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
if [[ "$part" == all || "$part" == experiments ]]; then
  # The shipped comparison: four methods and two floors on 40 gen-eval tasks at 5e11 FLOPs per task, 3 seeds.
  tta experiment experiments/default.toml --quiet
fi
if [[ "$part" == all || "$part" == others ]]; then
  # Accuracy against compute: four methods at three budgets.
  tta experiment experiments/budget_sweep.toml --quiet
  # The harness issue's check: icl and ttt_lora on 5 ARC-AGI-1 evaluation tasks, compared.
  tta run --method icl --dataset arc1-eval --limit 5 --budget-flops 5e11 --out runs/icl --quiet
  tta run --method ttt_lora --dataset arc1-eval --limit 5 --budget-flops 5e11 --out runs/ttt --quiet
  tta compare runs/icl runs/ttt --out reports/arc1-eval-icl-vs-ttt.md
  # Held-out real ARC training tasks the base model never saw (model card).
  tta run --method icl --dataset arc1-heldout --limit 10 --budget-flops 5e11 --out runs/card/icl-arc1-heldout --quiet
  tta run --method ttt_lora --dataset arc1-heldout --limit 10 --budget-flops 5e11 --out runs/card/ttt-arc1-heldout --quiet
  tta run --method copy_input --dataset arc1-heldout --limit 10 --budget-flops 5e11 --out runs/card/copy-arc1-heldout --quiet
  tta compare runs/card/icl-arc1-heldout runs/card/ttt-arc1-heldout runs/card/copy-arc1-heldout --out reports/arc1-heldout.md
  # ARC-AGI-1 evaluation, 40 tasks spread over the ids, at the same budget (model card).
  tta run --method icl --dataset arc1-eval --sample 40 --budget-flops 5e11 --out runs/card/icl-arc1-eval-40 --quiet
  tta run --method ttt_lora --dataset arc1-eval --sample 40 --budget-flops 5e11 --out runs/card/ttt-arc1-eval-40 --quiet
  tta compare runs/card/icl-arc1-eval-40 runs/card/ttt-arc1-eval-40 --out reports/arc1-eval-40.md
  # Model card: in-context accuracy on every gen-eval task.
  tta run --method icl --dataset gen-eval --budget-flops 5e11 --out runs/card/icl-gen-eval --quiet
fi
if [[ "$part" == all || "$part" == card ]]; then
  # The model card's Evaluation section, from the runs above.
  python scripts/model_card_eval.py
fi
