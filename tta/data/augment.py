"""Invertible augmentations of ARC tasks (Akyürek et al. 2024, section 3).

Each grid transform is a small object with `forward` and `inverse`; the inverse
maps a *prediction* made on the augmented task back to the original frame, so
it must accept any grid the model produced (wrong shapes included) without
raising.  A `TaskAugmentation` composes a grid transform, a colour permutation
(0, the background, stays fixed) and an order of the demonstrations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tta.data.tasks import MAX_SIZE, Pair, Task


# ---------------------------------------------------------------- grid transforms

@dataclass(frozen=True)
class Dihedral:
    """One of the 8 rotations/reflections of the square (k quarter turns, then an optional transpose)."""
    k: int = 0
    transpose: bool = False

    @property
    def name(self) -> str:
        return {(0, False): "identity", (1, False): "rot90", (2, False): "rot180", (3, False): "rot270",
                (0, True): "transpose", (1, True): "flip_h", (2, True): "anti_transpose",
                (3, True): "flip_v"}[(self.k % 4, self.transpose)]

    def forward(self, g: np.ndarray) -> np.ndarray:
        g = np.rot90(g, self.k)
        return np.ascontiguousarray(g.T if self.transpose else g)

    def inverse(self, g: np.ndarray) -> np.ndarray:
        g = g.T if self.transpose else g
        return np.ascontiguousarray(np.rot90(g, -self.k))


IDENTITY = Dihedral(0)
ROT90, ROT180, ROT270 = Dihedral(1), Dihedral(2), Dihedral(3)
TRANSPOSE = Dihedral(0, True)
FLIP_H = Dihedral(1, True)        # rot90(g).T == g[:, ::-1]: mirror left-right
ANTI_TRANSPOSE = Dihedral(2, True)
FLIP_V = Dihedral(3, True)        # mirror top-bottom
DIHEDRAL = (IDENTITY, ROT90, ROT180, ROT270, FLIP_H, FLIP_V, TRANSPOSE, ANTI_TRANSPOSE)


@dataclass(frozen=True)
class Upscale:
    """Repeat each cell `fy` times down and `fx` times across; the inverse takes every fy-th/fx-th cell."""
    fy: int = 2
    fx: int = 2

    @property
    def name(self) -> str:
        return f"upscale{self.fy}x{self.fx}"

    def forward(self, g):
        return np.repeat(np.repeat(g, self.fy, axis=0), self.fx, axis=1)

    def inverse(self, g):
        return np.ascontiguousarray(g[:: self.fy, :: self.fx])


@dataclass(frozen=True)
class Reflect:
    """Append a mirrored copy of the grid below (axis 0) or to the right (axis 1); the inverse keeps the first half."""
    axis: int = 1

    @property
    def name(self) -> str:
        return "reflect_right" if self.axis == 1 else "reflect_down"

    def forward(self, g):
        return np.concatenate([g, np.flip(g, self.axis)], axis=self.axis)

    def inverse(self, g):
        half = max(1, g.shape[self.axis] // 2)
        return np.ascontiguousarray(g[:half] if self.axis == 0 else g[:, :half])


@dataclass(frozen=True)
class Translate:
    """Pad `dy` rows and `dx` columns of background on top/left (the content moves down-right); the inverse crops them."""
    dy: int = 1
    dx: int = 1

    @property
    def name(self) -> str:
        return f"translate{self.dy},{self.dx}"

    def forward(self, g):
        return np.pad(g, ((self.dy, 0), (self.dx, 0)))

    def inverse(self, g):
        out = g[self.dy:, self.dx:]
        return np.ascontiguousarray(out if out.size else g)


@dataclass(frozen=True)
class Chain:
    """Apply `steps` left to right; the inverse undoes them right to left."""
    steps: tuple

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.steps)

    def forward(self, g):
        for s in self.steps:
            g = s.forward(g)
        return g

    def inverse(self, g):
        for s in reversed(self.steps):
            g = s.inverse(g)
        return g


def training_transforms() -> list:
    """The paper's transforms for test-time training data (identity excluded)."""
    basic = [ROT90, ROT180, ROT270, FLIP_H, FLIP_V, TRANSPOSE, ANTI_TRANSPOSE]
    scales = [Upscale(2, 2), Upscale(2, 1), Upscale(1, 2)]
    reflections = [Reflect(0), Reflect(1)]
    translations = [Translate(1, 1), Translate(2, 2), Translate(0, 1), Translate(1, 0)]
    chains = [Chain((b, s)) for b in (ROT90, ROT180, FLIP_H, TRANSPOSE) for s in scales[:1]]
    return basic + scales + reflections + translations + chains


def inference_transforms() -> list:
    """The paper's transforms for augmented inference: identity, rotations 90/180, three flips."""
    return [IDENTITY, ROT90, ROT180, FLIP_H, FLIP_V, TRANSPOSE]


# ---------------------------------------------------------------- colours

def random_colour_permutation(rng: np.random.Generator) -> np.ndarray:
    """A permutation of colours 1-9 (index = old colour, value = new colour); 0 stays the background."""
    return np.concatenate([[0], rng.permutation(np.arange(1, 10))]).astype(np.int8)


def apply_colours(g: np.ndarray, perm: np.ndarray) -> np.ndarray:
    return perm[g]


def invert_colours(perm: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(len(perm), dtype=perm.dtype)
    return inverse


# ---------------------------------------------------------------- tasks

@dataclass(frozen=True)
class TaskAugmentation:
    """A grid transform, a colour permutation and a demonstration order, applied to a whole task."""
    transform: object = IDENTITY
    colours: np.ndarray | None = field(default=None, compare=False)
    order: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        parts = [self.transform.name]
        if self.colours is not None:
            parts.append("colours" + "".join(map(str, self.colours[1:].tolist())))
        if self.order is not None:
            parts.append("order" + ",".join(map(str, self.order)))
        return "/".join(parts)

    def grid(self, g: np.ndarray) -> np.ndarray:
        g = self.transform.forward(g)
        return g if self.colours is None else apply_colours(g, self.colours)

    def invert_grid(self, g: np.ndarray) -> np.ndarray:
        if self.colours is not None:
            g = apply_colours(g, invert_colours(self.colours))
        return self.transform.inverse(g)

    def apply(self, task: Task) -> Task | None:
        """The augmented task, or None when a transformed grid would exceed 30x30."""
        def pair(p: Pair) -> Pair:
            return Pair(self.grid(p.input), None if p.output is None else self.grid(p.output))
        train = [pair(p) for p in task.train]
        if self.order is not None:
            train = [train[i] for i in self.order]
        test = [pair(p) for p in task.test]
        grids = [g for p in train + test for g in (p.input, p.output) if g is not None]
        if any(g.shape[0] > MAX_SIZE or g.shape[1] > MAX_SIZE for g in grids):
            return None
        return Task(task.id, tuple(train), tuple(test), task.source, {**task.meta, "augmentation": self.name})


def random_augmentation(rng: np.random.Generator, n_demos: int, transforms: list,
                        permute_colours: bool = True, shuffle_demos: bool = True) -> TaskAugmentation:
    transform = transforms[rng.integers(len(transforms))]
    colours = random_colour_permutation(rng) if permute_colours else None
    order = tuple(rng.permutation(n_demos).tolist()) if shuffle_demos else None
    return TaskAugmentation(transform, colours, order)


TRANSFORMS_BY_NAME = {t.name: t for t in DIHEDRAL}


def transforms_from_names(names: list[str]) -> list:
    unknown = [n for n in names if n not in TRANSFORMS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown transform {', '.join(unknown)} (known: {', '.join(TRANSFORMS_BY_NAME)})")
    return [TRANSFORMS_BY_NAME[n] for n in names]
