"""Augmented inference: predict each test output under several invertible views of the task,
map every prediction back, and vote (Akyürek et al. 2024, section 4).

All views of all test inputs go through one batched `generate` call.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tta.augment import IDENTITY, TaskAugmentation, inference_transforms
from tta.budget import Meter
from tta.decoding import generate
from tta.models import LoadedModel
from tta.tasks import Task
from tta.voting import hierarchical_vote


@dataclass
class View:
    test_index: int
    augmentation: TaskAugmentation
    prompt: list[int]


def fit_prompt(fmt, demos: list, query: np.ndarray, max_len: int):
    """The prompt with as many demonstrations as fit in `max_len` tokens (dropping from the end),
    or None when not even the query alone fits."""
    for keep in range(len(demos), -1, -1):
        encoded = fmt.encode(demos[:keep], query)
        if len(encoded) <= max_len:
            return encoded.input_ids
    return None


def answer_room(fmt, task: Task) -> int:
    """Tokens to leave for the answer: a square two cells wider than the largest grid the task
    shows (views may transpose it)."""
    grids = [g for p in task.train for g in (p.input, p.output)] + [p.input for p in task.test]
    return fmt.answer_tokens(min(30, max(max(g.shape) for g in grids) + 2))


def build_views(lm: LoadedModel, task: Task, transforms: list, orders: int, rng: np.random.Generator) -> list[View]:
    """For every test input, every transform, `orders` demonstration orders (the first is the task's)."""
    views = []
    room = lm.max_context - answer_room(lm.format, task)
    for test_index in range(len(task.test)):
        for transform in transforms:
            for k in range(orders):
                order = None if k == 0 else tuple(rng.permutation(len(task.train)).tolist())
                aug = TaskAugmentation(transform, None, order)
                augmented = aug.apply(task)
                if augmented is None:
                    continue
                prompt = fit_prompt(lm.format, list(augmented.train), augmented.test[test_index].input, room)
                if prompt is not None:
                    views.append(View(test_index, aug, prompt))
    return views


def predict_augmented(lm: LoadedModel, task: Task, meter: Meter | None, transforms: list | None = None,
                      orders: int = 2, seed: int = 0, batch_size: int = 16,
                      top_per_group: int = 3) -> tuple[list[list[np.ndarray | None]], dict]:
    """Two attempts per test output, and a record of the views' votes."""
    transforms = inference_transforms() if transforms is None else transforms
    rng = np.random.default_rng(seed)
    views = build_views(lm, task, transforms, orders, rng)
    room = answer_room(lm.format, task)
    generations = generate(lm, [v.prompt for v in views], meter, max_new_tokens=room, batch_size=batch_size)
    per_test: list[list[tuple[str, np.ndarray | None]]] = [[] for _ in task.test]
    for view, gen in zip(views, generations):
        grid = lm.format.parse(gen.tokens) if gen.finished else None
        back = view.augmentation.invert_grid(grid) if grid is not None else None
        per_test[view.test_index].append((view.augmentation.transform.name, back))
    attempts = [hierarchical_vote(preds, top_per_group=top_per_group, identity=IDENTITY.name) for preds in per_test]
    info = {"views": len(views), "valid_predictions": sum(g is not None for preds in per_test for _, g in preds)}
    return attempts, info
