"""Deterministic generator of ARC-format tasks from many small rule families.

Design
------
A *family* is a kind of transformation ("flip the grid left-right", "let the
cells fall down").  Its ``build(rng, difficulty)`` function draws the
parameters of one task (which colour maps to which, which direction things
fall) and returns an :class:`Instance`:

* ``rule``   -- the transformation, input grid -> output grid, with the drawn
  parameters baked in;
* ``sample`` -- draws one input grid that the rule makes a clear example of;
* ``params`` -- the drawn parameters, recorded in ``Task.meta``.

:func:`make_task` draws the instance once per task and then asks it for
``n_train + n_test`` pairs, so all pairs of a task share one rule while tasks
of one family differ.  Every random draw comes from one ``numpy`` generator
seeded by (family name, seed, attempt), so a task is a pure function of its
family and seed.

A sample can be a poor example: the flip of a symmetric grid is the grid
itself, "recolour 3 as 5" teaches nothing on a grid without colour 3.  Rules
raise :class:`Unsuitable` on inputs they cannot make a clear example of, and
``make_task`` resamples (a bounded number of times, still deterministic) any
pair that is unsuitable, identical to its input, too large, or a repeat of an
earlier input.  A test pair must also use only colours its demonstrations
show, so that the task is solvable in principle.  :func:`check_task` then
verifies the finished task against the rule.

Difficulty knobs (:class:`Difficulty`): the range of grid sides and the most
objects a scene holds.  ``max_size`` bounds *every* grid, input and output, so
families that grow a grid (``scale_up_3``, ``tile_2x2``...) sample smaller
inputs.  With the default (3..10) a task of 3 demonstrations and a test is at
most 8 grids of 10x10, about 900 tokens at one token per cell plus one per row.

Families (``FAMILIES``; the name is the key)
--------------------------------------------
geometry       rotate_90 (clockwise), rotate_180, rotate_270, flip_horizontal
               (mirror left-right), flip_vertical (mirror top-bottom),
               transpose, anti_transpose
colour         colour_permutation (a cycle over 2-4 colours), colour_swap
               (two colours trade places), recolour_single (one colour becomes
               another), invert_fg_bg (background and the one foreground
               colour trade places), remove_colour
physics        gravity (cells fall down/up/left/right)
regions        flood_fill (fill regions enclosed by walls), hollow_objects,
               outline_objects, draw_border, majority_colour_fill
objects        crop_object (crop the only object), crop_largest_object,
               keep_largest_object, count_objects (1xN bar, N = objects),
               colours_by_frequency (1xN row of colours, most common first),
               denoise (remove isolated pixels), shift (translate everything)
size           scale_up_2, scale_up_3, scale_down_2, tile_2x2, tile_mirror
               (2x2 tile of the grid and its mirror images), mirror_concat
               (grid beside/above its mirror image), half_crop
symmetry       symmetry_completion (restore a masked patch of a symmetric grid)
lines          extend_to_border (pixels shoot a line to the border),
               connect_pixels (join two same-coloured pixels on a row/column),
               draw_cross (lines through a single pixel, + or x)
sorting/logic  sort_by_count (sort rows/columns by their coloured cells),
               logic_combine (and/or/xor/nor of the two halves of a grid)

Compositions ``"a+b"`` apply family ``a`` then family ``b`` (:func:`compose`);
:func:`get_family` accepts either kind of name.  ``TRAIN_COMPOSITIONS`` appear
in gen-train; ``HELD_OUT_COMPOSITIONS`` only in gen-eval, and every part of a
held-out composition appears in gen-train both alone and in other
compositions, so gen-eval tests combining known rules in a new way.

Datasets (``DATASETS``, built by :func:`dataset`)
------------------------------------------------
gen-train  seeds 0..39 of every single family, seeds 0..9 of every training
           composition.
gen-eval   200 tasks: seeds from 1_000_000 (a range gen-train never uses)
           spread evenly over the single families, plus seeds 1_000_000..
           of every held-out composition.
Both are sorted by task id; ids are ``gen-{family}-{seed}``.
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from tta.data.tasks import MAX_SIZE, N_COLOURS, Pair, Task, grid_key

Grid = np.ndarray
Rule = Callable[[Grid], Grid]
Sampler = Callable[[np.random.Generator], Grid]

PAIR_TRIES = 40  # samples drawn for one pair before the task's parameters are redrawn
TASK_ATTEMPTS = 50  # parameter draws before a (family, seed) is declared impossible
EVAL_SEED_START = 1_000_000


class Unsuitable(Exception):
    """A rule or sampler cannot make a clear example from this grid; draw another."""


class GenerationError(ValueError):
    """A task could not be generated, or a generated task breaks its rule."""


@dataclass(frozen=True)
class Difficulty:
    min_size: int = 3  # smallest grid side a sampler draws (families may need more)
    max_size: int = 10  # largest side of any grid in the task, input or output
    max_objects: int = 4  # most objects/pixels a scene holds

    def shrink(self, factor: int) -> "Difficulty":
        """The difficulty for inputs whose output will be `factor` times larger."""
        top = max(1, self.max_size // factor)
        return replace(self, max_size=top, min_size=min(self.min_size, top))


DEFAULT = Difficulty()


@dataclass(frozen=True)
class Instance:
    """One task's rule: the family's parameters drawn and baked in."""
    rule: Rule
    sample: Sampler
    params: dict


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[np.random.Generator, Difficulty], Instance]
    growth: int = 1  # an output side is at most growth x the input's (compositions use it)
    doc: str = ""


FAMILIES: dict[str, Family] = {}


def family(name: str, growth: int = 1):
    """Decorator: register a build function as a family; its docstring says what it does."""
    def register(build):
        FAMILIES[name] = Family(name, build, growth, (build.__doc__ or "").strip())
        return build
    return register


# ================================================================ sampling helpers

DIRECTIONS = ("down", "up", "left", "right")


def pick(rng: np.random.Generator, options):
    """One element of a list, as a plain Python value (so params stay JSON-friendly)."""
    return options[int(rng.integers(len(options)))]


def grid_size(rng, d: Difficulty, lo: int | None = None, hi: int | None = None) -> tuple[int, int]:
    """A random (height, width) within the difficulty, optionally narrowed."""
    hi = d.max_size if hi is None else min(hi, d.max_size)
    lo = min(d.min_size if lo is None else max(lo, d.min_size), hi)
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def colours(rng, k: int, exclude=()) -> list[int]:
    """k distinct foreground colours (1-9), none of them in `exclude`."""
    choices = [c for c in range(1, N_COLOURS) if c not in exclude]
    return [int(c) for c in rng.choice(choices, size=k, replace=False)]


def n_objects(rng, d: Difficulty, lo: int = 1) -> int:
    return int(rng.integers(lo, max(lo, d.max_objects) + 1))


def sprite(rng, max_h: int, max_w: int, min_cells: int = 1) -> np.ndarray:
    """A random 4-connected blob grown inside a max_h x max_w box, cropped to its bounds."""
    box = max_h * max_w
    target = int(rng.integers(min(min_cells, box), box + 1))
    cells = [(int(rng.integers(max_h)), int(rng.integers(max_w)))]
    while len(cells) < target:
        r, c = cells[int(rng.integers(len(cells)))]
        dr, dc = pick(rng, [(1, 0), (-1, 0), (0, 1), (0, -1)])
        cell = (r + dr, c + dc)
        if 0 <= cell[0] < max_h and 0 <= cell[1] < max_w and cell not in cells:
            cells.append(cell)
    mask = np.zeros((max_h, max_w), bool)
    mask[tuple(np.array(cells).T)] = True
    return crop_to_content(mask)


def place(grid: np.ndarray, mask: np.ndarray, colour, rng, gap: int = 0, tries: int = 20) -> bool:
    """Paint `mask` in `colour` where its box, widened by `gap`, touches no other content.

    A gap of 1 keeps objects apart even diagonally, so each one is its own
    8-connected component -- what counting and cropping rules rely on.
    """
    H, W = grid.shape
    h, w = mask.shape
    if h > H or w > W:
        return False
    for _ in range(tries):
        r, c = int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1))
        around = grid[max(0, r - gap):r + h + gap, max(0, c - gap):c + w + gap]
        if not around.any():
            grid[r:r + h, c:c + w][mask] = colour if np.isscalar(colour) else colour[mask]
            return True
    return False


def scene(rng, d: Difficulty, palette=None, size=None, n=None, gap: int = 0,
          max_sprite: int = 4, min_cells: int = 1) -> np.ndarray:
    """The everyday input: a few blobs of palette colours on a black background."""
    h, w = size or grid_size(rng, d)
    palette = palette or list(range(1, N_COLOURS))
    grid = np.zeros((h, w), np.int8)
    for _ in range(n or n_objects(rng, d)):
        mask = sprite(rng, min(h, max_sprite), min(w, max_sprite), min_cells)
        place(grid, mask, pick(rng, palette), rng, gap)
    if not grid.any():
        raise Unsuitable("empty scene")
    return grid


def dense(rng, h: int, w: int, palette, density: float = 1.0) -> np.ndarray:
    """Every cell a random palette colour with probability `density`, else background."""
    cells = rng.choice(np.asarray(palette), size=(h, w))
    return np.where(rng.random((h, w)) < density, cells, 0).astype(np.int8)


def rectangles(rng, d: Difficulty, lo: int, hi: int, palette, n=None, gap: int = 1,
               min_size: int | None = None) -> np.ndarray:
    """Filled rectangles with sides lo..hi, kept `gap` apart."""
    h, w = grid_size(rng, d, lo=min_size or lo + 2)
    grid = np.zeros((h, w), np.int8)
    for _ in range(n or n_objects(rng, d)):
        mask = np.ones((int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))), bool)
        place(grid, mask, pick(rng, palette), rng, gap)
    if not grid.any():
        raise Unsuitable("no rectangle fitted")
    return grid


# ================================================================ grid helpers

def crop_to_content(grid: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(grid)
    if len(ys) == 0:
        raise Unsuitable("nothing to crop")
    return grid[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def neighbour_count(mask: np.ndarray, diagonal: bool = True) -> np.ndarray:
    """How many of each cell's neighbours are set (outside the grid counts as unset)."""
    p = np.pad(mask.astype(np.int8), 1)
    h, w = mask.shape
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if diagonal:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    return sum(p[1 + dr:1 + dr + h, 1 + dc:1 + dc + w] for dr, dc in steps)


def components(grid: np.ndarray) -> list[list[tuple[int, int]]]:
    """The 8-connected groups of non-background cells (any colours), in reading order."""
    h, w = grid.shape
    seen = np.zeros((h, w), bool)
    groups = []
    for start in zip(*np.nonzero(grid)):
        if seen[start]:
            continue
        seen[start] = True
        stack, group = [start], []
        while stack:
            r, c = stack.pop()
            group.append((int(r), int(c)))
            for nr in range(max(0, r - 1), min(h, r + 2)):
                for nc in range(max(0, c - 1), min(w, c + 2)):
                    if grid[nr, nc] and not seen[nr, nc]:
                        seen[nr, nc] = True
                        stack.append((nr, nc))
        groups.append(group)
    return groups


def largest_component(grid: np.ndarray) -> list[tuple[int, int]]:
    groups = sorted(components(grid), key=len, reverse=True)
    if len(groups) < 2 or len(groups[0]) == len(groups[1]):
        raise Unsuitable("no unique largest object")  # a tie would make the answer a guess
    return groups[0]


def as_if_down(fn: Rule, grid: np.ndarray, direction: str) -> np.ndarray:
    """Apply a rule written for "down" in any direction, by turning the grid first.

    np.rot90 turns anticlockwise, so k quarter turns bring `direction` to "down".
    """
    k = {"down": 0, "left": 1, "up": 2, "right": 3}[direction]
    return np.rot90(fn(np.rot90(grid, k)), -k)


def colours_in(grid: np.ndarray) -> set[int]:
    return {int(c) for c in np.unique(grid)}


# ================================================================ geometry

def _geometry(name: str, transform: Rule, doc: str) -> None:
    def build(rng, d):
        return Instance(transform, lambda r: scene(r, d), {})
    build.__doc__ = doc
    family(name)(build)


_geometry("rotate_90", lambda g: np.rot90(g, -1), "Rotate a quarter turn clockwise.")
_geometry("rotate_180", lambda g: np.rot90(g, 2), "Rotate half a turn.")
_geometry("rotate_270", lambda g: np.rot90(g, 1), "Rotate a quarter turn anticlockwise.")
_geometry("flip_horizontal", np.fliplr, "Mirror left-right.")
_geometry("flip_vertical", np.flipud, "Mirror top-bottom.")
_geometry("transpose", lambda g: g.T, "Mirror in the main diagonal.")
_geometry("anti_transpose", lambda g: np.rot90(g, 2).T, "Mirror in the anti-diagonal.")


# ================================================================ colour

@family("colour_permutation")
def colour_permutation(rng, d):
    """Cycle 2-4 colours (a->b->c->a); other colours stay."""
    palette = colours(rng, int(rng.integers(2, 5)))
    shift = int(rng.integers(1, len(palette)))
    lut = np.arange(N_COLOURS)
    lut[palette] = palette[shift:] + palette[:shift]
    return Instance(lambda g: lut[g], lambda r: scene(r, d, palette),
                    {"map": {a: int(lut[a]) for a in palette}})


@family("colour_swap")
def colour_swap(rng, d):
    """Two colours trade places."""
    a, b, *others = colours(rng, 4)

    def rule(g):
        if not {a, b} <= colours_in(g):
            raise Unsuitable("both swapped colours must show")
        return np.where(g == a, b, np.where(g == b, a, g))

    def sample(r):
        return scene(r, d, [a, b] + others[:int(r.integers(3))], n=n_objects(r, d, lo=2))
    return Instance(rule, sample, {"swap": [a, b]})


@family("recolour_single")
def recolour_single(rng, d):
    """Every cell of one colour becomes another colour."""
    src, dst, *others = colours(rng, 4)

    def rule(g):
        if src not in colours_in(g):
            raise Unsuitable("source colour absent")
        return np.where(g == src, dst, g)
    return Instance(rule, lambda r: scene(r, d, [src] + others[:int(r.integers(3))]),
                    {"from": src, "to": dst})


@family("invert_fg_bg")
def invert_fg_bg(rng, d):
    """Background and the single foreground colour trade places."""
    def rule(g):
        fg = colours_in(g) - {0}
        if len(fg) != 1 or 0 not in colours_in(g):
            raise Unsuitable("needs background and exactly one foreground colour")
        c = fg.pop()
        return np.where(g == c, 0, c)

    def sample(r):
        h, w = grid_size(r, d)
        return dense(r, h, w, [int(r.integers(1, N_COLOURS))], float(r.uniform(0.3, 0.6)))
    return Instance(rule, sample, {})


@family("remove_colour")
def remove_colour(rng, d):
    """One colour is erased to background."""
    gone, *others = colours(rng, 3)
    return Instance(lambda g: np.where(g == gone, 0, g),
                    lambda r: scene(r, d, [gone] + others, n=n_objects(r, d, lo=2)),
                    {"colour": gone})


# ================================================================ physics

def _fall_down(g: np.ndarray) -> np.ndarray:
    """Coloured cells drop to the bottom of their column, keeping their order."""
    out = np.zeros_like(g)
    for c in range(g.shape[1]):
        column = g[:, c][g[:, c] != 0]
        out[g.shape[0] - len(column):, c] = column
    return out


@family("gravity")
def gravity(rng, d):
    """Coloured cells fall down (or up/left/right) until they hit the edge or another cell."""
    direction = pick(rng, DIRECTIONS)

    def sample(r):
        h, w = grid_size(r, d)
        return dense(r, h, w, colours(r, int(r.integers(1, 4))), float(r.uniform(0.15, 0.4)))
    return Instance(lambda g: as_if_down(_fall_down, g, direction), sample, {"direction": direction})


# ================================================================ regions

def _enclosed(background: np.ndarray) -> np.ndarray:
    """Background cells that no 4-connected background path links to the grid's edge."""
    h, w = background.shape
    outside = np.zeros((h, w), bool)
    stack = [(r, c) for r in range(h) for c in range(w)
             if background[r, c] and (r in (0, h - 1) or c in (0, w - 1))]
    for cell in stack:
        outside[cell] = True
    while stack:
        r, c = stack.pop()
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < h and 0 <= nc < w and background[nr, nc] and not outside[nr, nc]:
                outside[nr, nc] = True
                stack.append((nr, nc))
    return background & ~outside


@family("flood_fill")
def flood_fill(rng, d):
    """Fill the background enclosed by walls; a wall with a gap does not enclose."""
    wall, fill = colours(rng, 2)

    def rule(g):
        inside = _enclosed(g == 0)
        if not inside.any():
            raise Unsuitable("nothing enclosed")
        return np.where(inside, fill, g)

    def sample(r):
        h, w = grid_size(r, d, lo=5)
        grid = np.zeros((h, w), np.int8)
        for _ in range(n_objects(r, d)):
            box = np.ones((int(r.integers(3, 6)), int(r.integers(3, 6))), bool)
            box[1:-1, 1:-1] = False
            if r.random() < 0.3:  # a broken wall: the learner must see it is not filled
                ys, xs = np.nonzero(box)
                sides = [(y, x) for y, x in zip(ys, xs)
                         if y not in (0, box.shape[0] - 1) or x not in (0, box.shape[1] - 1)]
                box[pick(r, sides)] = False
            place(grid, box, wall, r, gap=1)
        return grid
    return Instance(rule, sample, {"wall": wall, "fill": fill})


@family("hollow_objects")
def hollow_objects(rng, d):
    """Solid objects keep only their edge cells."""
    def rule(g):
        inner = (g != 0) & (neighbour_count(g != 0, diagonal=False) == 4)
        return np.where(inner, 0, g)
    return Instance(rule, lambda r: rectangles(r, d, 3, 5, list(range(1, N_COLOURS))), {})


@family("outline_objects")
def outline_objects(rng, d):
    """Background cells touching an object (diagonals too) take the outline colour."""
    line, *palette = colours(rng, 4)

    def rule(g):
        ring = (g == 0) & (neighbour_count(g != 0) > 0)
        return np.where(ring, line, g)
    return Instance(rule, lambda r: scene(r, d, palette, gap=2, max_sprite=3),
                    {"colour": line})


@family("draw_border")
def draw_border(rng, d):
    """The cells on the grid's edge take the border colour."""
    border, *palette = colours(rng, 4)

    def rule(g):
        out = g.copy()
        out[[0, -1], :] = border
        out[:, [0, -1]] = border
        return out
    return Instance(rule, lambda r: scene(r, d, palette), {"colour": border})


@family("majority_colour_fill")
def majority_colour_fill(rng, d):
    """The whole grid takes its most common foreground colour."""
    def rule(g):
        counts = np.bincount(g[g != 0].ravel(), minlength=N_COLOURS)
        top = np.sort(counts)[::-1]
        if top[0] == 0 or top[0] == top[1]:
            raise Unsuitable("no unique majority")
        return np.full_like(g, int(counts.argmax()))

    def sample(r):
        h, w = grid_size(r, d)
        return dense(r, h, w, colours(r, int(r.integers(2, 4))), float(r.uniform(0.5, 1.0)))
    return Instance(rule, sample, {})


# ================================================================ objects

@family("crop_object")
def crop_object(rng, d):
    """Cut out the bounding box of the only object."""
    palette = colours(rng, 3)

    def sample(r):
        h, w = grid_size(r, d, lo=4)
        grid = np.zeros((h, w), np.int8)
        mask = sprite(r, int(r.integers(2, h)), int(r.integers(2, w)), min_cells=3)
        place(grid, mask, dense(r, *mask.shape, palette), r)  # a many-coloured object
        return grid
    return Instance(crop_to_content, sample, {})


def _objects_apart(rng, d: Difficulty, palette) -> np.ndarray:
    """2+ single-coloured blobs, kept apart so each is its own object."""
    return scene(rng, d, palette, n=n_objects(rng, d, lo=2), gap=1, max_sprite=4)


def _only_largest(g: np.ndarray) -> np.ndarray:
    """The grid with every cell outside its largest object set to background."""
    cells = tuple(np.array(largest_component(g)).T)
    out = np.zeros_like(g)
    out[cells] = g[cells]
    return out


@family("crop_largest_object")
def crop_largest_object(rng, d):
    """Cut out the largest object (by cell count), without its neighbours."""
    palette = colours(rng, 3)

    return Instance(lambda g: crop_to_content(_only_largest(g)), lambda r: _objects_apart(r, d, palette), {})


@family("keep_largest_object")
def keep_largest_object(rng, d):
    """Erase every object but the largest (by cell count)."""
    palette = colours(rng, 3)

    return Instance(_only_largest, lambda r: _objects_apart(r, d, palette), {})


@family("count_objects")
def count_objects(rng, d):
    """Output a 1xN bar of the bar colour, N = the number of objects."""
    bar, *palette = colours(rng, 3)

    def rule(g):
        n = len(components(g))
        if n == 0:
            raise Unsuitable("no objects")
        return np.full((1, n), bar)
    return Instance(rule, lambda r: scene(r, d, palette, gap=1, max_sprite=3), {"colour": bar})


@family("colours_by_frequency")
def colours_by_frequency(rng, d):
    """Output a 1xN row of the grid's colours, the most common first."""
    def rule(g):
        counts = np.bincount(g[g != 0].ravel(), minlength=N_COLOURS)
        present = [c for c in range(1, N_COLOURS) if counts[c]]
        if len({int(counts[c]) for c in present}) != len(present):
            raise Unsuitable("tied counts")
        return np.array([sorted(present, key=lambda c: -counts[c])])

    def sample(r):
        h, w = grid_size(r, d)
        k = int(r.integers(2, 5))
        counts = r.choice(np.arange(1, max(k, h * w // 3) + 1), size=k, replace=False)
        if counts.sum() > h * w:
            raise Unsuitable("more cells than the grid holds")
        cells = np.repeat(colours(r, k), counts)
        grid = np.zeros(h * w, np.int8)
        grid[r.choice(h * w, size=len(cells), replace=False)] = cells
        return grid.reshape(h, w)
    return Instance(rule, sample, {})


@family("denoise")
def denoise(rng, d):
    """Remove isolated pixels (no neighbour, diagonals included); objects stay."""
    palette = colours(rng, 3)

    def rule(g):
        lonely = (g != 0) & (neighbour_count(g != 0) == 0)
        return np.where(lonely, 0, g)

    def sample(r):
        grid = rectangles(r, d, 2, 3, palette, min_size=5)
        for _ in range(int(r.integers(1, 5))):
            y, x = int(r.integers(grid.shape[0])), int(r.integers(grid.shape[1]))
            if not grid[max(0, y - 1):y + 2, max(0, x - 1):x + 2].any():
                grid[y, x] = pick(r, palette)
        return grid
    return Instance(rule, sample, {})


@family("shift")
def shift(rng, d):
    """Move everything 1-2 cells in one of 8 directions (nothing falls off)."""
    dy, dx = pick(rng, [(y, x) for y in (-1, 0, 1) for x in (-1, 0, 1) if (y, x) != (0, 0)])
    distance = int(rng.integers(1, 3))
    sy, sx = dy * distance, dx * distance

    def rule(g):
        ys, xs = np.nonzero(g)
        h, w = g.shape
        if not (0 <= ys.min() + sy and ys.max() + sy < h and 0 <= xs.min() + sx and xs.max() + sx < w):
            raise Unsuitable("content would leave the grid")
        out = np.zeros_like(g)
        out[ys + sy, xs + sx] = g[ys, xs]
        return out

    def sample(r):
        h, w = grid_size(r, d, lo=distance + 2)
        inner = scene(r, d, size=(h - abs(sy), w - abs(sx)), max_sprite=3)
        grid = np.zeros((h, w), np.int8)
        y, x = int(r.integers(abs(sy) + 1)), int(r.integers(abs(sx) + 1))
        grid[y:y + inner.shape[0], x:x + inner.shape[1]] = inner
        return grid
    return Instance(rule, sample, {"dy": sy, "dx": sx})


# ================================================================ size

def _small_dense(rng, d: Difficulty, factor: int, palette) -> np.ndarray:
    """A busy grid small enough that `factor` times it still fits (sides from 2 up)."""
    small = d.shrink(factor)
    h, w = grid_size(rng, replace(small, min_size=min(2, small.min_size)))
    return dense(rng, h, w, palette, float(rng.uniform(0.4, 0.8)))


def _scale_up(factor: int) -> None:
    def build(rng, d):
        palette = colours(rng, 3)
        return Instance(lambda g: np.kron(g, np.ones((factor, factor), g.dtype)),
                        lambda r: _small_dense(r, d, factor, palette), {})
    build.__doc__ = f"Each cell becomes a {factor}x{factor} block."
    family(f"scale_up_{factor}", growth=factor)(build)


_scale_up(2)
_scale_up(3)


@family("scale_down_2")
def scale_down_2(rng, d):
    """Each 2x2 block of one colour becomes one cell."""
    palette = colours(rng, 3)

    def rule(g):
        small = g[::2, ::2]
        if g.shape[0] % 2 or g.shape[1] % 2 or not np.array_equal(np.kron(small, np.ones((2, 2), g.dtype)), g):
            raise Unsuitable("not made of 2x2 blocks")
        return small
    return Instance(rule, lambda r: np.kron(_small_dense(r, d, 2, palette), np.ones((2, 2), np.int8)), {})


@family("tile_2x2", growth=2)
def tile_2x2(rng, d):
    """The grid repeated twice across and twice down."""
    palette = colours(rng, 3)
    return Instance(lambda g: np.tile(g, (2, 2)), lambda r: _small_dense(r, d, 2, palette), {})


@family("tile_mirror", growth=2)
def tile_mirror(rng, d):
    """A 2x2 tile of the grid and its mirror images, symmetric both ways."""
    palette = colours(rng, 3)

    def rule(g):
        top = np.hstack([g, np.fliplr(g)])
        return np.vstack([top, np.flipud(top)])
    return Instance(rule, lambda r: _small_dense(r, d, 2, palette), {})


@family("mirror_concat", growth=2)
def mirror_concat(rng, d):
    """The grid followed by its mirror image, to the right or below."""
    axis = pick(rng, ["right", "below"])

    def rule(g):
        return np.hstack([g, np.fliplr(g)]) if axis == "right" else np.vstack([g, np.flipud(g)])
    return Instance(rule, lambda r: scene(r, d.shrink(2)), {"axis": axis})


@family("half_crop")
def half_crop(rng, d):
    """Keep one half (left, right, top or bottom) of a grid of even side."""
    side = pick(rng, ["left", "right", "top", "bottom"])
    across = side in ("left", "right")

    def rule(g):
        h, w = g.shape
        if (w if across else h) % 2:
            raise Unsuitable("odd side")
        return {"left": g[:, :w // 2], "right": g[:, w // 2:],
                "top": g[:h // 2], "bottom": g[h // 2:]}[side]

    def sample(r):
        h, w = grid_size(r, d, lo=4)
        h, w = (h, w - w % 2) if across else (h - h % 2, w)
        return scene(r, d, size=(h, w), n=n_objects(r, d, lo=2))
    return Instance(rule, sample, {"side": side})


# ================================================================ symmetry

@family("symmetry_completion")
def symmetry_completion(rng, d):
    """A symmetric picture has a patch painted over in the mask colour; restore it."""
    axis = pick(rng, ["left-right", "top-bottom", "both"])
    mask, *palette = colours(rng, 4)
    palette = [0] + palette

    def mirrors(r, c, h, w):
        lr, tb = (r, w - 1 - c), (h - 1 - r, c)
        return {"left-right": [lr], "top-bottom": [tb], "both": [lr, tb, (h - 1 - r, w - 1 - c)]}[axis]

    def rule(g):
        h, w = g.shape
        hidden = list(zip(*np.nonzero(g == mask)))
        if not hidden:
            raise Unsuitable("nothing masked")
        out = g.copy()
        for r, c in hidden:
            seen = [g[m] for m in mirrors(r, c, h, w) if g[m] != mask]
            if not seen:
                raise Unsuitable("a masked cell's mirror is masked too")
            out[r, c] = seen[0]
        return out

    def sample(r):
        h, w = grid_size(r, d, lo=4)
        art = dense(r, h, w, palette)
        if axis != "top-bottom":
            art[:, w - w // 2:] = art[:, :w // 2][:, ::-1]
        if axis != "left-right":
            art[h - h // 2:] = art[:h // 2][::-1]
        # The patch stays inside one half (one quadrant for "both") so its mirror is intact.
        rows = (0, h // 2) if axis != "left-right" else (0, h)
        cols = (0, w // 2) if axis != "top-bottom" else (0, w)
        ph = int(r.integers(1, max(1, (rows[1] - rows[0]) // 2) + 1))
        pw = int(r.integers(1, max(1, (cols[1] - cols[0]) // 2) + 1))
        y = int(r.integers(rows[0], rows[1] - ph + 1))
        x = int(r.integers(cols[0], cols[1] - pw + 1))
        art[y:y + ph, x:x + pw] = mask
        flip = (r.random() < 0.5, r.random() < 0.5)  # move the patch to a random half
        if flip[0] and axis != "left-right":
            art = art[::-1]
        if flip[1] and axis != "top-bottom":
            art = art[:, ::-1]
        return art
    return Instance(rule, sample, {"axis": axis, "mask": mask})


# ================================================================ lines

@family("extend_to_border")
def extend_to_border(rng, d):
    """Each pixel shoots a line of its colour to the border in one direction."""
    direction = pick(rng, DIRECTIONS)

    def shoot_down(g):
        out = g.copy()
        ys, xs = np.nonzero(g)
        if len(set(xs.tolist())) != len(xs):
            raise Unsuitable("two pixels on one line")
        for y, x in zip(ys, xs):
            out[y + 1:, x] = g[y, x]
        return out

    def sample(r):
        h, w = grid_size(r, d)
        k = int(r.integers(1, min(d.max_objects, h, w) + 1))
        grid = np.zeros((h, w), np.int8)
        grid[r.choice(h, k, replace=False), r.choice(w, k, replace=False)] = r.integers(1, N_COLOURS, k)
        return grid
    return Instance(lambda g: as_if_down(shoot_down, g, direction), sample, {"direction": direction})


@family("connect_pixels")
def connect_pixels(rng, d):
    """Two pixels of one colour on the same row (or column) are joined by a line."""
    along = pick(rng, ["rows", "columns"])
    palette = colours(rng, 3)

    def connect_rows(g):
        out = g.copy()
        for y in range(g.shape[0]):
            for c in set(g[y].tolist()) - {0}:
                xs = np.nonzero(g[y] == c)[0]
                if len(xs) == 2:
                    out[y, xs[0]:xs[1] + 1] = np.where(g[y, xs[0]:xs[1] + 1] == 0, c, g[y, xs[0]:xs[1] + 1])
        return out

    def sample_rows(r):
        h, w = grid_size(r, d, lo=4)
        grid = np.zeros((h, w), np.int8)
        rows = r.choice(h, int(r.integers(1, min(h, d.max_objects) + 1)), replace=False)
        for y in rows:
            a, b = sorted(r.choice(w, 2, replace=False))
            if b - a >= 2:
                grid[y, [a, b]] = pick(r, palette)
            else:  # too close to show a line: leave a lone pixel, which stays as it is
                grid[y, a] = pick(r, palette)
        return grid

    if along == "rows":
        return Instance(connect_rows, sample_rows, {"along": along})
    return Instance(lambda g: connect_rows(g.T).T, lambda r: sample_rows(r).T, {"along": along})


@family("draw_cross")
def draw_cross(rng, d):
    """A single pixel draws lines of its colour through itself: a + or an x."""
    shape = pick(rng, ["plus", "x"])

    def rule(g):
        ys, xs = np.nonzero(g)
        if len(ys) != 1:
            raise Unsuitable("needs exactly one pixel")
        y, x = int(ys[0]), int(xs[0])
        r, c = np.indices(g.shape)
        on = (r == y) | (c == x) if shape == "plus" else (r - c == y - x) | (r + c == y + x)
        return np.where(on, g[y, x], 0)

    def sample(r):
        h, w = grid_size(r, d)
        grid = np.zeros((h, w), np.int8)
        grid[int(r.integers(h)), int(r.integers(w))] = int(r.integers(1, N_COLOURS))
        return grid
    return Instance(rule, sample, {"shape": shape})


# ================================================================ sorting and logic

@family("sort_by_count")
def sort_by_count(rng, d):
    """Sort rows (or columns) by how many coloured cells they hold."""
    along = pick(rng, ["rows", "columns"])
    order = pick(rng, ["ascending", "descending"])
    colour = int(rng.integers(1, N_COLOURS))

    def sort_rows(g):
        counts = (g != 0).sum(axis=1)
        if len(set(counts.tolist())) != len(counts):
            raise Unsuitable("tied counts")
        ranked = np.argsort(counts if order == "ascending" else -counts, kind="stable")
        return g[ranked]

    def sample_rows(r):
        h, w = grid_size(r, d, lo=3)
        h = min(h, w + 1)  # distinct counts need at most w + 1 rows
        grid = np.zeros((h, w), np.int8)
        for y, count in enumerate(r.choice(w + 1, h, replace=False)):
            grid[y, r.choice(w, count, replace=False)] = colour
        return grid

    if along == "rows":
        return Instance(sort_rows, sample_rows, {"along": along, "order": order})
    return Instance(lambda g: sort_rows(g.T).T, lambda r: sample_rows(r).T,
                    {"along": along, "order": order})


LOGIC = {"and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor,
         "nor": lambda a, b: ~(a | b)}


@family("logic_combine")
def logic_combine(rng, d):
    """Two halves split by a divider line overlay by and/or/xor/nor into the result colour."""
    op = pick(rng, list(LOGIC))
    stacked = bool(rng.random() < 0.5)
    left, right, divider, result = colours(rng, 4)

    def combine_side_by_side(g):
        h, w = g.shape
        half = w // 2
        if w % 2 == 0 or not (g[:, half] == divider).all():
            raise Unsuitable("no divider in the middle")
        return np.where(LOGIC[op](g[:, :half] != 0, g[:, half + 1:] != 0), result, 0)

    def sample_side_by_side(r):
        h, w = grid_size(r, d, lo=2, hi=(d.max_size - 1) // 2)
        a = dense(r, h, w, [left], 0.5)
        b = dense(r, h, w, [right], 0.5)
        return np.hstack([a, np.full((h, 1), divider, np.int8), b])

    params = {"op": op, "stacked": stacked, "result": result}
    if not stacked:
        return Instance(combine_side_by_side, sample_side_by_side, params)
    return Instance(lambda g: combine_side_by_side(g.T).T, lambda r: sample_side_by_side(r).T, params)


# ================================================================ compositions

def compose(first: Family, second: Family) -> Family:
    """Apply `first`, then `second`; inputs come from `first`'s sampler.

    The second family's parameters are drawn after the first's from the same
    generator.  A pair is rejected (and resampled) when either step leaves
    the grid unchanged, e.g. a colour map whose colours are absent, so every
    pair shows both steps.  Inputs shrink by the second
    family's growth so the final output still fits the difficulty.
    """
    def build(rng, d):
        a = first.build(rng, d.shrink(second.growth))
        b = second.build(rng, d)

        def rule(g):
            middle = a.rule(g)
            out = b.rule(middle)
            # A pair where either step changes nothing cannot teach the composite.
            if np.array_equal(middle, g) or np.array_equal(out, middle):
                raise Unsuitable("one step of the composition is invisible")
            return out
        return Instance(rule, a.sample, {first.name: a.params, second.name: b.params})
    return Family(f"{first.name}+{second.name}", build, first.growth * second.growth,
                  f"{first.doc} Then: {second.doc}")


# The second part is always a rule that applies to any grid (geometry, colour
# maps, growth), so the composite stays well defined.  Geometry after geometry
# is left out: it collapses into another single geometry family.
TRAIN_COMPOSITIONS = [
    ("flip_vertical", "recolour_single"),
    ("flip_horizontal", "colour_permutation"),
    ("rotate_90", "colour_permutation"),
    ("transpose", "recolour_single"),
    ("gravity", "recolour_single"),
    ("gravity", "rotate_90"),
    ("denoise", "flip_vertical"),
    ("denoise", "colour_permutation"),
    ("crop_largest_object", "scale_up_2"),
    ("crop_object", "flip_horizontal"),
    ("flood_fill", "rotate_90"),
    ("outline_objects", "flip_horizontal"),
    ("draw_border", "scale_up_2"),
    ("extend_to_border", "colour_permutation"),
    ("flip_horizontal", "tile_2x2"),
]

# Only in gen-eval.  Each part also appears in TRAIN_COMPOSITIONS, in the same
# position, so these test new combinations of familiar steps.
HELD_OUT_COMPOSITIONS = [
    ("flip_horizontal", "recolour_single"),
    ("denoise", "scale_up_2"),
    ("crop_largest_object", "flip_horizontal"),
    ("gravity", "colour_permutation"),
    ("flood_fill", "flip_vertical"),
]


def composition_name(pair: tuple[str, str]) -> str:
    return "+".join(pair)


def get_family(name: str) -> Family:
    """A single family by name, or a composition named "first+second"."""
    if name in FAMILIES:
        return FAMILIES[name]
    parts = name.split("+")
    if len(parts) == 2 and all(p in FAMILIES for p in parts):
        return compose(FAMILIES[parts[0]], FAMILIES[parts[1]])
    raise KeyError(f"unknown generator family {name!r} (known: {', '.join(sorted(FAMILIES))}, or a+b)")


# ================================================================ tasks

def _rng(name: str, seed: int, attempt: int) -> np.random.Generator:
    # crc32, not hash(): Python salts string hashes per process.
    return np.random.default_rng([zlib.crc32(name.encode()), seed, attempt])


def _frozen(grid) -> np.ndarray:
    """A read-only int8 copy: rules must not edit their input, cached tasks must not change."""
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.size == 0 or grid.min() < 0 or grid.max() >= N_COLOURS:
        raise GenerationError(f"bad grid from a rule or sampler: shape {grid.shape}")  # a bug, not bad luck
    out = np.array(grid, dtype=np.int8)
    out.setflags(write=False)
    return out


def _fits(grid: np.ndarray, d: Difficulty) -> bool:
    return all(1 <= side <= min(d.max_size, MAX_SIZE) for side in grid.shape)


def _draw_pair(inst: Instance, rng, d: Difficulty) -> Pair | None:
    """One input and its output, or None if it would be a poor example."""
    try:
        x = _frozen(inst.sample(rng))
        y = _frozen(inst.rule(x))
    except Unsuitable:
        return None
    if not (_fits(x, d) and _fits(y, d)) or grid_key(x) == grid_key(y):
        return None  # identity pairs show nothing about the rule
    return Pair(x, y)


def _shown_by(pair: Pair, demos: list[Pair]) -> bool:
    """Whether every colour in a test pair occurs somewhere in the demonstrations."""
    shown = set().union(*(colours_in(p.input) | colours_in(p.output) for p in demos))
    return colours_in(pair.input) <= shown and colours_in(pair.output) <= shown


def _draw_pairs(inst: Instance, rng, d: Difficulty, n_train: int, n_test: int) -> list[Pair] | None:
    pairs, inputs = [], set()
    for i in range(n_train + n_test):
        for _ in range(PAIR_TRIES):
            pair = _draw_pair(inst, rng, d)
            if pair is None or grid_key(pair.input) in inputs:
                continue
            if i >= n_train and not _shown_by(pair, pairs[:n_train]):
                continue
            break
        else:
            return None
        pairs.append(pair)
        inputs.add(grid_key(pair.input))
    return pairs


TEST_PAIRS = 1   # test pairs per generated task


def make_task(family: str, seed: int, n_train: int = 3, n_test: int = TEST_PAIRS,
              difficulty: Difficulty = DEFAULT) -> Task:
    """The task `gen-{family}-{seed}`: one draw of the family's parameters, n_train + n_test pairs."""
    fam = get_family(family)
    for attempt in range(TASK_ATTEMPTS):
        rng = _rng(fam.name, seed, attempt)
        inst = fam.build(rng, difficulty)
        pairs = _draw_pairs(inst, rng, difficulty, n_train, n_test)
        if pairs is None:
            continue  # these parameters rarely give good pairs: draw new ones
        task = Task(id=f"gen-{fam.name}-{seed}", train=tuple(pairs[:n_train]),
                    test=tuple(pairs[n_train:]), source="generate",
                    meta={"family": fam.name, "seed": seed, "attempt": attempt,
                          "params": inst.params, "difficulty": asdict(difficulty)})
        check_task(task, inst.rule)
        return task
    raise GenerationError(f"{fam.name} seed {seed}: no valid task in {TASK_ATTEMPTS} attempts")


def rule_of(task: Task) -> Rule:
    """Rebuild a generated task's rule from its meta (the parameters are drawn first)."""
    m = task.meta
    rng = _rng(m["family"], m["seed"], m["attempt"])
    return get_family(m["family"]).build(rng, Difficulty(**m["difficulty"])).rule


def check_task(task: Task, rule: Rule) -> None:
    """Raise GenerationError unless the task is a consistent, non-trivial example of `rule`."""
    pairs = task.train + task.test
    for i, p in enumerate(pairs):
        for grid in (p.input, p.output):
            if grid is None or grid.ndim != 2 or not all(1 <= s <= MAX_SIZE for s in grid.shape):
                raise GenerationError(f"{task.id}: pair {i} has a missing or mis-sized grid")
            if grid.min() < 0 or grid.max() >= N_COLOURS:
                raise GenerationError(f"{task.id}: pair {i} has a colour outside 0-9")
        expected = np.asarray(rule(p.input))
        if expected.shape != p.output.shape or not np.array_equal(expected, p.output):
            raise GenerationError(f"{task.id}: pair {i} output is not rule(input)")
    keys = [grid_key(p.input) for p in pairs]
    if len(pairs) > 1 and len(set(keys)) == 1:
        raise GenerationError(f"{task.id}: all inputs are identical")
    train_keys = [grid_key(p.input) for p in task.train]
    if len(set(train_keys)) != len(train_keys):
        raise GenerationError(f"{task.id}: two demonstration inputs are equal")
    if all(grid_key(p.input) == grid_key(p.output) for p in pairs):
        raise GenerationError(f"{task.id}: every output equals its input")


# ================================================================ datasets

TRAIN_SEEDS = range(40)
TRAIN_COMPOSITION_SEEDS = range(10)
# gen-train-large: 25x the seeds, for pretraining on a GPU, where 40 seeds a family are seen
# hundreds of times over in ten minutes.  Every training seed stays below EVAL_SEED_START.
LARGE_TRAIN_SEEDS = range(1000)
LARGE_TRAIN_COMPOSITION_SEEDS = range(200)
EVAL_SIZE = 200
EVAL_COMPOSITION_SEEDS = range(EVAL_SEED_START, EVAL_SEED_START + 8)


def _train_specs(seeds=TRAIN_SEEDS, composition_seeds=TRAIN_COMPOSITION_SEEDS) -> list[tuple[str, int]]:
    singles = [(name, s) for name in FAMILIES for s in seeds]
    combos = [(composition_name(c), s) for c in TRAIN_COMPOSITIONS for s in composition_seeds]
    return singles + combos


def _large_train_specs() -> list[tuple[str, int]]:
    return _train_specs(LARGE_TRAIN_SEEDS, LARGE_TRAIN_COMPOSITION_SEEDS)


def _eval_specs() -> list[tuple[str, int]]:
    combos = [(composition_name(c), s) for c in HELD_OUT_COMPOSITIONS for s in EVAL_COMPOSITION_SEEDS]
    names = sorted(FAMILIES)
    # Round-robin over the single families so each gets the same share (+-1).
    singles = [(names[i % len(names)], EVAL_SEED_START + i // len(names))
               for i in range(EVAL_SIZE - len(combos))]
    return singles + combos


DATASETS = {"gen-train": _train_specs, "gen-train-large": _large_train_specs, "gen-eval": _eval_specs}
PARALLEL_ABOVE = 5000   # tasks; ~1.2 ms each, so gen-train-large (41k) is worth the worker start-up


def _make_tasks(specs: list[tuple[str, int]]) -> list[Task]:
    return [make_task(family, seed) for family, seed in specs]


_WHOLE: dict[str, tuple[Task, ...]] = {}   # the generated datasets made whole in this process


def _dataset(name: str) -> tuple[Task, ...]:
    if name not in _WHOLE:
        _WHOLE[name] = _generate(name)
    return _WHOLE[name]


def _generate(name: str) -> tuple[Task, ...]:
    specs = DATASETS[name]()
    cpus = 1
    if len(specs) > PARALLEL_ABOVE:
        from tta.threads import usable_cpus
        cpus = usable_cpus()
    if cpus == 1:
        tasks = _make_tasks(specs)
    else:
        # Forked workers: they run numpy only (no torch thread pools), and unlike spawned ones
        # they need no importable __main__ (a script piped to python has none).
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing
        chunks = [specs[i:i + 1000] for i in range(0, len(specs), 1000)]
        with ProcessPoolExecutor(cpus, mp_context=multiprocessing.get_context("fork")) as pool:
            tasks = [t for chunk in pool.map(_make_tasks, chunks) for t in chunk]
    return tuple(sorted(tasks, key=lambda t: t.id))


def size(name: str) -> int:
    """How many tasks a generated dataset holds, without generating it."""
    return len(DATASETS[name]())


def _task_id(family: str, seed: int) -> str:
    return f"gen-{family}-{seed}"   # make_task's id: a family's name is the name it is built by


def ids(name: str) -> list[str]:
    """A generated dataset's task ids, sorted, without generating it."""
    return sorted(_task_id(family, seed) for family, seed in DATASETS[name]())


def tasks(name: str, task_ids: list[str]) -> list[Task]:
    """Some of a generated dataset's tasks, in the order of `task_ids`, generating only those
    (unless the whole dataset is at hand): a run of 5 gen-eval tasks started 1.5 s later when
    it generated all 200 first, and each worker process and test run pays that start-up."""
    if name in _WHOLE:
        by_id = {t.id: t for t in _WHOLE[name]}
        return [by_id[i] for i in task_ids]
    spec_of = {_task_id(family, seed): (family, seed) for family, seed in DATASETS[name]()}
    return [_one_task(*spec_of[i]) for i in task_ids]


@functools.lru_cache(maxsize=None)
def _one_task(family: str, seed: int) -> Task:
    return make_task(family, seed)


def dataset(name: str) -> list[Task]:
    """All tasks of a generated dataset, sorted by id (cached; grids are read-only)."""
    if name not in DATASETS:
        raise KeyError(f"unknown generated dataset {name!r} (known: {', '.join(DATASETS)})")
    return list(_dataset(name))
