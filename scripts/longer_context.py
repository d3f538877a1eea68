"""Can the embedded model read past the 2,048 tokens it was trained on?  Its grid position ids
number a cell by its grid and place (1024 per grid), not by its token count, so a longer prompt
with big grids uses no position id the model has not seen.  This scores the true answer of
long tasks (teacher-forced, mean NLL per answer token) twice: with the demonstrations that fit
2,048 tokens (dropped from the end, as `fit_prompt` does) and with those that fit `--context`.

Tasks: the development tasks that need more than 2,048 tokens and keep more demonstrations at
the longer context, from `arc2-new`: ARC-AGI-2 training tasks in no ARC-AGI-1 set and not in
ARC-AGI-2 evaluation, none of them in the embedded model's pretraining data.

    python scripts/longer_context.py --context 4096 --out reports/runs/levers/longer-context-4096.json

`--model DIR` asks the same of another model, such as one pretrained onward at 4,096 tokens
(`tta pretrain --init default --max-len 4096`); the tasks are then those unseen by that model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tta.data import contamination  # noqa: E402
from tta.data.datasets import load_dataset  # noqa: E402
from tta.inference.decoding import score_answers  # noqa: E402
from tta.inference.predict import fit_prompt  # noqa: E402
from tta.model.loading import load_model, model_directory  # noqa: E402

TRAINED_CONTEXT = 2048


def unseen_arc2_training_tasks(model: str = "default"):
    """arc2-new (ARC-AGI-2 training tasks in no ARC-AGI-1 set and not in ARC-AGI-2 evaluation),
    checked against what the model was trained on."""
    tasks = load_dataset("arc2-new").tasks
    seen = set(contamination.overlap(contamination.read_training_data(model_directory(model) / "training_data.json"), tasks))
    return [t for t in tasks if t.id not in seen]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="default", help="'default' or a model directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = load_model(args.model, device="cpu")
    fmt = lm.format
    tasks = unseen_arc2_training_tasks(args.model)
    rows = []
    for task in tasks:
        pair = task.test[0]
        answer = fmt.answer_ids(pair.output)
        prompts = {}
        for context in (TRAINED_CONTEXT, args.context):
            prompts[context] = fit_prompt(fmt, list(task.train), pair.input, context - len(answer))
        short, long = prompts[TRAINED_CONTEXT], prompts[args.context]
        if short is None or long is None or len(long) == len(short):
            continue   # fits whole at 2,048, or the longer context adds no demonstration
        scores = {}
        for context, prompt in prompts.items():
            lm.model.config.max_position_embeddings = context
            scores[context] = score_answers(lm, [prompt], [answer], batch_size=1)[0]
        rows.append({"task": task.id, "prompt_tokens": [len(short), len(long)],
                     "nll": [round(scores[c].mean_nll, 4) for c in prompts],
                     "token_accuracy": [round(scores[c].token_accuracy, 4) for c in prompts]})
        print(rows[-1], flush=True)
    lower = sum(r["nll"][1] < r["nll"][0] for r in rows)
    summary = {"unseen_arc2_training_tasks": len(tasks), "long_tasks": len(rows),
               "mean_nll": [round(float(np.mean([r["nll"][i] for r in rows])), 4) for i in (0, 1)],
               "mean_token_accuracy": [round(float(np.mean([r["token_accuracy"][i] for r in rows])), 4) for i in (0, 1)],
               "lower_nll_at_longer_context": lower}
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "contexts": [TRAINED_CONTEXT, args.context],
                                          "summary": summary, "rows": rows}, indent=1))
    print(summary)


if __name__ == "__main__":
    main()
