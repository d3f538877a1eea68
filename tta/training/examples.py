"""Training sequences from tasks: augmented leave-one-out copies of the demonstrations.

Used by test-time training (a task's own demonstrations), by LESS (a pool of
training tasks) and by pretraining.  Recipe (Akyürek et al. 2024): each
demonstration in turn becomes the query and the others the context, topped up
with leave-two-out when there are fewer than the cap; each copy is augmented
by an invertible transform, a colour permutation (0 fixed) and a shuffle of
the demonstration order; duplicates and copies over 30x30 or over the
context length are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from tta.data.augment import IDENTITY, TRANSPOSE, random_augmentation, training_transforms
from tta.model.encoding import Encoded
from tta.data.tasks import Pair, Task, grid_key


@dataclass
class Example:
    """One training sequence and where it came from (for LESS's record of what it selected)."""
    encoded: Encoded
    task_id: str
    held_out: tuple[int, ...]     # which demonstrations were left out (the first is the query)
    augmentation: str


def leave_out_splits(task: Task, max_left_out: int = 2, min_context: int = 1
                     ) -> list[tuple[tuple[int, ...], list[Pair], Pair]]:
    """(left-out indices, context demonstrations, query pair): leave-one-out first, then leave-two-out,
    and so on up to `max_left_out`, keeping at least `min_context` demonstrations in the context."""
    n = len(task.train)
    splits = []
    for k in range(1, max_left_out + 1):
        if n - k < min_context:
            break
        for left_out in combinations(range(n), k):
            for query in left_out:   # each left-out demonstration may be the query
                context = [p for i, p in enumerate(task.train) if i not in left_out]
                splits.append(((query, *[i for i in left_out if i != query]), context, task.train[query]))
    return splits


def _content_key(task: Task) -> tuple:
    return tuple(grid_key(g) for p in (*task.train, *task.test) for g in (p.input, p.output))


def leave_one_out_examples(task: Task, fmt, rng: np.random.Generator, max_examples: int = 250,
                           max_len: int = 4096, transforms: list | None = None,
                           permute_colours: bool = True, shuffle_demos: bool = True,
                           learn_demo_outputs: bool = True, shorten_to_fit: bool = False,
                           passes: int = 1) -> list[Example]:
    """Up to `max_examples` distinct augmented leave-one-out sequences of `task`.

    Each (split, transform) pair is used once per pass, with a fresh colour permutation and
    demonstration order.  A small task runs out of pairs before `max_examples` (a 3-demonstration
    task has 6 leave-one- and leave-two-out splits x 21 transforms); `passes` > 1 tops it up with
    more copies of the same pairs.  Later passes run only while the cap is not reached and draw
    after the first, so the first pass's sequences are the same whatever `passes` is.

    With `shorten_to_fit`, a task none of whose leave-one- or leave-two-out sequences fits
    `max_len` (big grids) is trained on sequences with fewer demonstrations in the context, down
    to a demonstration pair alone, instead of on nothing."""
    transforms = [IDENTITY] + (training_transforms() if transforms is None else list(transforms))
    splits = leave_out_splits(task, max_left_out=1)
    if len(splits) * len(transforms) < max_examples:
        splits = leave_out_splits(task, max_left_out=2)
    seen: set = set()

    def one_pass(splits: list, cap: int) -> list[Example]:
        return _augmented(task, fmt, rng, splits, transforms, cap, max_len, permute_colours, shuffle_demos,
                          learn_demo_outputs, seen)

    examples = one_pass(splits, max_examples)
    if not examples and shorten_to_fit:
        tried = {left_out for left_out, _, _ in splits}
        splits = [s for s in leave_out_splits(task, max_left_out=len(task.train), min_context=0) if s[0] not in tried]
        examples = one_pass(splits, max_examples)
    for _ in range(passes - 1):
        if not examples or len(examples) >= max_examples:
            break   # nothing fits, or the cap is reached
        examples += one_pass(splits, max_examples - len(examples))
    return examples


def _augmented(task: Task, fmt, rng: np.random.Generator, splits: list, transforms: list, max_examples: int,
               max_len: int, permute_colours: bool, shuffle_demos: bool, learn_demo_outputs: bool,
               seen: set) -> list[Example]:
    examples = []
    # Every (split, transform) once, in a seeded order, each with fresh colours and demo order.
    candidates = [(s, t) for s in splits for t in transforms]
    for index in rng.permutation(len(candidates)):
        if len(examples) >= max_examples:
            break
        (left_out, context, query), transform = candidates[index]
        sub = Task(task.id, tuple(context), (query,))
        aug = random_augmentation(rng, len(context), [transform], permute_colours, shuffle_demos)
        augmented = aug.apply(sub)
        if augmented is None:
            continue
        key = _content_key(augmented)
        if key in seen:
            continue
        seen.add(key)
        q = augmented.test[0]
        encoded = fmt.encode(list(augmented.train), q.input, q.output, learn_demo_outputs=learn_demo_outputs)
        if len(encoded) > max_len:
            continue
        examples.append(Example(encoded, task.id, left_out, aug.name))
    return examples


def held_out_demonstration(task: Task, rng: np.random.Generator, fmt, max_len: int = 4096,
                           views: tuple = (IDENTITY, TRANSPOSE)) -> tuple[Task, list[list[int]], list[list[int]]] | None:
    """(the task without one of its demonstrations, chosen by `rng`; prompts and answers that
    score that demonstration: its output after the other demonstrations, under each of `views`),
    for model selection during test-time training.  None when the task has fewer than 3
    demonstrations (training needs two, one in context and one to learn) or no view fits."""
    if len(task.train) < 3:
        return None
    index = int(rng.integers(len(task.train)))
    rest = tuple(p for i, p in enumerate(task.train) if i != index)
    held = task.train[index]
    prompts, answers = [], []
    for view in views:
        demos = [Pair(view.forward(p.input), view.forward(p.output)) for p in rest]
        prompt = fmt.encode(demos, view.forward(held.input)).input_ids
        answer = fmt.answer_ids(view.forward(held.output))
        if len(prompt) + len(answer) <= max_len:
            prompts.append(prompt)
            answers.append(answer)
    if not prompts:
        return None
    return Task(task.id, rest, task.test), prompts, answers
