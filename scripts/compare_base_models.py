"""Two base models on the same tasks, before any method runs: the true answer's likelihood with
the plain prompt (every demonstration that fits the context, dropped from the end; no views, no
training).  A cheap first look at a new base model on a development split: a minute per model
on 40 tasks, where a method's run takes many.

Per test output: the true answer's mean NLL per token, teacher-forced, and whether every answer
token is the model's top choice given the true tokens before it, which is exactly when greedy
decoding would write the answer ("greedy exact").  The paired NLL difference (B - A) has a
bootstrap interval over test outputs.

    python scripts/compare_base_models.py --a default --b DIR --dataset arc1-heldout --out FILE.json
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
from tta.run.solve import true_answer_scores  # noqa: E402
from tta.model.loading import load_model  # noqa: E402
from tta.reporting.stats import paired_bootstrap_diff  # noqa: E402


def plain_prompt_scores(spec: str, dataset) -> list[dict]:
    """One row per test output the context can hold: NLL, token accuracy, greedy exact."""
    lm = load_model(spec, device="cpu")
    contamination.check_model_data(lm, spec, dataset)   # never score a model on what it trained on
    rows = []
    for task in dataset.tasks:
        for i, score in enumerate(true_answer_scores(lm, task)):
            if score is not None:
                rows.append({"task": task.id, "test": i, "nll": round(score.mean_nll, 4),
                             "token_accuracy": round(score.token_accuracy, 4),
                             "greedy_exact": score.n_correct == score.n_tokens})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="default", help="the base model to compare against")
    parser.add_argument("--b", required=True, help="the other base model")
    parser.add_argument("--dataset", default="arc1-heldout")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    dataset = load_dataset(args.dataset)
    a, b = plain_prompt_scores(args.a, dataset), plain_prompt_scores(args.b, dataset)
    both = {(r["task"], r["test"]) for r in a} & {(r["task"], r["test"]) for r in b}
    a = [r for r in a if (r["task"], r["test"]) in both]
    b = [r for r in b if (r["task"], r["test"]) in both]
    diff = paired_bootstrap_diff([r["nll"] for r in b], [r["nll"] for r in a])
    summary = {"dataset": args.dataset, "test_outputs": len(a),
               "mean_nll": [round(float(np.mean([r["nll"] for r in rows])), 4) for rows in (a, b)],
               "nll_b_minus_a": [round(diff.value, 4), round(diff.lo, 4), round(diff.hi, 4)],
               "b_lower_nll": sum(rb["nll"] < ra["nll"] for ra, rb in zip(a, b)),
               "mean_token_accuracy": [round(float(np.mean([r["token_accuracy"] for r in rows])), 4) for rows in (a, b)],
               "greedy_exact": [sum(r["greedy_exact"] for r in rows) for rows in (a, b)]}
    Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "models": [args.a, args.b],
                                          "summary": summary, "a": a, "b": b}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
