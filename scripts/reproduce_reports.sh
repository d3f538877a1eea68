#!/usr/bin/env bash
# Re-creates every committed report under reports/ and the evaluation in the model card, from
# scratch, on the embedded defaults.  Each run directory lands under runs/ (resumable).
# On a 2-core CPU the whole script takes about 1.5-2 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
# Model card: in-context accuracy on every gen-eval task.
tta run --method icl --dataset gen-eval --budget-flops 2e12 --out runs/card/icl-gen-eval --quiet
# The shipped comparison: four methods and two floors on 20 gen-eval tasks at 2e12 FLOPs per task.
tta experiment experiments/default.toml --quiet
# Held-out real ARC training tasks the base model never saw (model card).
tta run --method icl --dataset arc1-heldout --limit 10 --budget-flops 2e12 --out runs/card/icl-arc1-heldout --quiet
tta run --method ttt_lora --dataset arc1-heldout --limit 10 --budget-flops 2e12 --out runs/card/ttt-arc1-heldout --quiet
tta run --method copy_input --dataset arc1-heldout --limit 10 --budget-flops 2e12 --out runs/card/copy-arc1-heldout --quiet
tta compare runs/card/icl-arc1-heldout runs/card/ttt-arc1-heldout runs/card/copy-arc1-heldout --out reports/arc1-heldout.md
# The harness issue's check: icl and ttt_lora on 5 ARC-AGI-1 evaluation tasks, compared.
tta run --method icl --dataset arc1-eval --limit 5 --out runs/icl --quiet
tta run --method ttt_lora --dataset arc1-eval --limit 5 --out runs/ttt --quiet
tta compare runs/icl runs/ttt --out reports/arc1-eval-icl-vs-ttt.md
# ARC-AGI-1 evaluation, 40 tasks spread over the ids, at the same budget (model card).
tta run --method icl --dataset arc1-eval --sample 40 --budget-flops 2e12 --out runs/card/icl-arc1-eval-40 --quiet
tta run --method ttt_lora --dataset arc1-eval --sample 40 --budget-flops 2e12 --out runs/card/ttt-arc1-eval-40 --quiet
tta compare runs/card/icl-arc1-eval-40 runs/card/ttt-arc1-eval-40 --out reports/arc1-eval-40.md
# The model card's Evaluation section, from the runs above.
python scripts/model_card_eval.py
# Accuracy against compute: four methods at three budgets.
tta experiment experiments/budget_sweep.toml --quiet
