#!/usr/bin/env bash
# Re-creates every committed report under reports/ and the evaluation in the model card, from
# scratch, on the embedded defaults.  Each run directory lands under runs/ (resumable).
set -euo pipefail
cd "$(dirname "$0")/.."
# The harness issue's check: icl and ttt_lora on 5 ARC-AGI-1 evaluation tasks, compared.
tta run --method icl --dataset arc1-eval --limit 5 --out runs/icl --quiet
tta run --method ttt_lora --dataset arc1-eval --limit 5 --out runs/ttt --quiet
tta compare runs/icl runs/ttt --out reports/arc1-eval-icl-vs-ttt.md
# The other two methods on the same tasks (issues 4 and 5), then all four together.
tta run --method sampling --dataset arc1-eval --limit 5 --out runs/sampling --quiet
tta run --method less --dataset arc1-eval --limit 5 --out runs/less --quiet
tta compare runs/icl runs/ttt runs/less runs/sampling --out reports/arc1-eval-four-methods.md
# The shipped experiments.
tta experiment experiments/default.toml --quiet
tta experiment experiments/budget_sweep.toml --quiet
# Held-out real ARC training tasks the base model never saw (model card).
tta run --method icl --dataset arc1-heldout --limit 10 --budget-flops 2e12 --out runs/card/icl-arc1-heldout --quiet
tta run --method ttt_lora --dataset arc1-heldout --limit 10 --budget-flops 2e12 --out runs/card/ttt-arc1-heldout --quiet
tta run --method copy_input --dataset arc1-heldout --limit 10 --budget-flops 2e12 --out runs/card/copy-arc1-heldout --quiet
tta compare runs/card/icl-arc1-heldout runs/card/ttt-arc1-heldout runs/card/copy-arc1-heldout --out reports/arc1-heldout.md
