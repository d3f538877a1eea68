"""How many tasks of a dataset a model can attempt whole: the prompt with every demonstration,
the test input and room for the answer, at one token per cell plus one per row (the embedded
model's format), against context lengths; and how many demonstrations `fit_prompt` keeps at
the embedded model's context when a task does not fit.  With `--training-examples`, also how
many of test-time training's augmented leave-one-out sequences fit that context per task (the
tasks left with none train nothing and spend their budget on views).

    python scripts/context_fit.py [--dataset arc1-eval] [--sample 100] [--contexts 2048 4096 8192]
                                  [--training-examples]
"""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from tta.data.datasets import load_dataset, select
from tta.data.tasks import TaskError
from tta.inference.predict import answer_room, fit_prompt
from tta.model.loading import load_model
from tta.training.examples import leave_one_out_examples


def kept_smallest_first(fmt, demos: list, query, max_len: int) -> int:
    """Demonstrations that fit when the largest are dropped first (the others in their order)."""
    bare = len(fmt.encode([], query))
    by_size = sorted(range(len(demos)), key=lambda i: len(fmt.encode([demos[i]], query)) - bare)
    for keep in range(len(demos), -1, -1):
        if len(fmt.encode([demos[i] for i in sorted(by_size[:keep])], query)) <= max_len:
            return keep
    return 0


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="arc1-eval")
    parser.add_argument("--sample", type=positive, help="N tasks spread over the ids, as `tta run --sample`")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--training-examples", action="store_true",
                        help="count the leave-one-out training sequences (up to 250, seed 0) that fit")
    args = parser.parse_args()
    lm = load_model("default", device="cpu")
    try:
        tasks = select(load_dataset(args.dataset), sample=args.sample).tasks
    except TaskError as e:
        parser.error(str(e))
    whole, dropped = [], Counter()
    demos_of_long = kept_from_end = kept_if_smallest = 0   # over the tasks that do not fit whole
    for task in tasks:
        room = answer_room(lm.format, task)
        longest = max(len(lm.format.encode(list(task.train), pair.input)) for pair in task.test) + room
        whole.append(longest)
        prompt = fit_prompt(lm.format, list(task.train), task.test[0].input, lm.max_context - room)
        kept = -1 if prompt is None else len(lm.format.encode(list(task.train), task.test[0].input)) == len(prompt)
        if prompt is None:
            dropped["cannot attempt (the query alone does not fit)"] += 1
        elif not kept:
            dropped["demonstrations dropped to fit"] += 1
            demos_of_long += len(task.train)
            kept_from_end += sum(1 for k in range(1, len(task.train) + 1)   # prefixes that fit
                                 if len(lm.format.encode(list(task.train)[:k], task.test[0].input)) <= lm.max_context - room)
            kept_if_smallest += kept_smallest_first(lm.format, list(task.train), task.test[0].input, lm.max_context - room)
        else:
            dropped["whole"] += 1
    n = len(tasks)
    print(f"{args.dataset}: {n} tasks; whole-task tokens (all demonstrations, test input, answer room)")
    for context in args.contexts:
        k = sum(t <= context for t in whole)
        print(f"  fit {context:5d} tokens whole: {k:3d} / {n} = {k / n:.0%}")
    print(f"at the embedded model's context ({lm.max_context}): " + ", ".join(f"{v} {k}" for k, v in dropped.items()))
    if demos_of_long:
        print(f"demonstrations kept in the tasks that do not fit (first test input): {kept_from_end} of "
              f"{demos_of_long} dropping from the end (fit_prompt), {kept_if_smallest} dropping the largest first")
    if args.training_examples:
        counts = Counter()
        for task in tasks:
            fitting = len(leave_one_out_examples(task, lm.format, np.random.default_rng(0), max_len=lm.max_context))
            counts["none" if fitting == 0 else "1-49" if fitting < 50 else "50-249" if fitting < 250 else "250"] += 1
        print(f"leave-one-out training sequences that fit {lm.max_context} tokens, tasks by count: "
              + ", ".join(f"{k}: {counts[k]}" for k in ("none", "1-49", "50-249", "250")))


if __name__ == "__main__":
    main()
