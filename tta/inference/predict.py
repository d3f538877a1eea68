"""Augmented inference: predict each test output under several invertible views of the task,
map every prediction back, and vote (Akyürek et al. 2024, section 4).

The configured views of all test inputs go through one batched `generate` call; a budget that
pays for more buys more views (colour-permuted, reordered dihedral views), batch by batch.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Iterator

import numpy as np

from tta.data.augment import (DIHEDRAL, IDENTITY, TaskAugmentation, inference_transforms, random_colour_permutation,
                         transforms_from_names)
from tta.budget import TaskBudget
from tta.inference.decoding import generate
from tta.inference.search import poe_rank, scoring_reserve
from tta.model.loading import LoadedModel
from tta.settings import setting
from tta.data.tasks import Task, grid_key
from tta.inference.voting import hierarchical_vote, majority_vote


VIEWS_SECONDS_SHARE = 0.5   # see RoomForViews


def _kept_before_the_setting(budget: dict) -> float:
    """What a run recorded before `views_seconds_share` existed kept: no time under a seconds cap;
    under a FLOP cap the setting changes nothing, so such a run resumes at today's default."""
    return 0.0 if budget.get("seconds") else VIEWS_SECONDS_SHARE


@dataclass
class RoomForViews:
    """What a method that adapts before it predicts (`room_for_views`) keeps for the prediction."""
    # Under a FLOP cap the configured views are priced and kept; their time cannot be priced so.
    # Measured (`python benchmarks/phase_seconds.py`: ttt_lora at 5e11 FLOPs, the first 4
    # arc1-heldout tasks): prediction took 22%, 38%, 59% and 87% of a task's seconds, by its
    # prompts' lengths; 0.5 is about their median.  Before this setting a seconds cap kept no
    # time: ttt_lora at --budget-seconds 30 trained until the cap and then decoded no valid answer
    # on 4 of 4 of those tasks (benchmarks/results/seconds_cap/).
    views_seconds_share: float = setting(VIEWS_SECONDS_SHARE, "under a seconds cap (--budget-seconds): the share of the seconds left "
                                              "that adaptation keeps for prediction (a FLOP cap keeps the configured "
                                              "views' FLOPs instead); not in the paper, which has no seconds cap",
                                         at_least=0, at_most=1, before=_kept_before_the_setting)


@dataclass
class ViewSettings:
    """Augmented inference settings, shared by every method that predicts this way."""
    transforms: list = setting(["identity", "rot90", "rot180", "flip_h", "flip_v", "transpose"],
                               "configured views (paper: identity, rot90/180, three flips)")
    orders: int = setting(2, "demonstration orders per configured view (paper: 2)", at_least=1)
    leave_one_out_prompts: bool = setting(False, "also prompt every configured view with each demonstration left out (the reference code's inference "
                                                   "does). Off: with ttt_full at 4e12 it won 2, lost 0 of 80 development tasks, "
                                                   "then 9/100 on arc1-eval as without it (won 1, lost 1)")
    vote: str = setting("hierarchical", "hierarchical: the reference code's vote (a candidate scores one point per transform whose top answers it is among, plus one for the all-views top) | majority: plain self-consistency")
    top_per_group: int = setting(3, "answers kept per transform category in the hierarchical vote (paper: 3)", at_least=1)
    fill_views: bool = setting(True, "under a cap, spend what is left on more views (8 dihedral transforms x colour permutations x demonstration orders) until it runs out")
    max_views: int = setting(512, "views per test input at most when filling (the method records when it stops here)", at_least=1)
    settle: int = setting(0, "when filling, stop once the vote's two attempts for every test input have stayed the same "
                             "over this many fill batches in a row (0: fill until the cap or max_views; not in the paper)",
                          at_least=0, before=0)
    select: str = setting("vote", "how the two attempts are chosen: vote (the vote's two best) | poe: the vote's `scored` best "
                                  "re-ranked by their summed NLL under the configured views (product of experts, Franzen et al. "
                                  "2025), the scoring's FLOPs held back from filling views (not in the TTT paper). icl at 1e12 on "
                                  "40 development tasks: the same 4 solved as the vote, 85% of the cap spent (reserve unused "
                                  "where fewer answers differ)", before="vote")
    scored: int = setting(8, "select=poe: distinct answers scored per test input, in the vote's order", at_least=2, before=8)
    decode_batch_size: int = setting(16, "prompts decoded together", at_least=1)

    def __post_init__(self) -> None:
        if self.vote not in ("hierarchical", "majority"):
            raise ValueError(f"--set vote={self.vote}: must be hierarchical or majority")
        if self.select not in ("vote", "poe"):
            raise ValueError(f"--set select={self.select}: must be vote or poe")
        transforms_from_names(self.transforms)
        parent = getattr(super(), "__post_init__", None)   # configs compose several settings pieces
        if parent:
            parent()


@dataclass
class View:
    test_index: int
    augmentation: TaskAugmentation
    prompt: list[int]


Predictions = list[list[tuple[str, "np.ndarray | None"]]]   # per test input: (transform name, grid) per view


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


def paper_augmentations(task: Task, transforms: list, orders: int, rng: np.random.Generator,
                        leave_one_out: bool = False) -> list[TaskAugmentation]:
    """The configured views: every transform under `orders` demonstration orders (the first is the
    task's own), and with `leave_one_out` also every transform with one demonstration left out of
    the prompt (the reference implementation's inference prompts use such subsets too)."""
    n = len(task.train)
    augmentations = []
    for transform in transforms:
        for k in range(orders):
            order = None if k == 0 else tuple(rng.permutation(n).tolist())
            augmentations.append(TaskAugmentation(transform, None, order))
        if leave_one_out and n >= 2:
            augmentations += [TaskAugmentation(transform, None, tuple(j for j in range(n) if j != i)) for i in range(n)]
    return augmentations


def more_augmentations(task: Task, rng: np.random.Generator) -> Iterator[TaskAugmentation]:
    """Views past the configured ones, for a budget that pays for more: the 8 dihedral transforms
    in turn, each with a fresh colour permutation (0 stays) and demonstration order, as the
    Product-of-Experts recipe draws its views.  Endless: 8 x 9! x n! distinct views."""
    n = len(task.train)
    while True:
        for transform in DIHEDRAL:
            yield TaskAugmentation(transform, random_colour_permutation(rng), tuple(rng.permutation(n).tolist()))


def build_views(lm: LoadedModel, task: Task, transforms: list, orders: int, rng: np.random.Generator,
                leave_one_out: bool = False) -> list[View]:
    """The configured views (see `paper_augmentations`) of every test input."""
    return views_for(lm, task, paper_augmentations(task, transforms, orders, rng, leave_one_out))


def views_for(lm: LoadedModel, task: Task, augmentations: list[TaskAugmentation]) -> list[View]:
    """For every test input, every augmentation whose grids fit 30x30 and whose prompt fits."""
    views = []
    room = lm.max_context - answer_room(lm.format, task)
    for test_index in range(len(task.test)):
        for aug in augmentations:
            augmented = aug.apply(task)
            if augmented is None:
                continue
            prompt = fit_prompt(lm.format, list(augmented.train), augmented.test[test_index].input, room)
            if prompt is not None:
                views.append(View(test_index, aug, prompt))
    return views


def decode_views(lm: LoadedModel, views: list[View], budget: TaskBudget | None, room: int,
                 batch_size: int) -> list[tuple[View, np.ndarray | None]]:
    """Greedy answers of the views, each mapped back to the task's frame (None: no grid)."""
    generations = generate(lm, [v.prompt for v in views], budget, max_new_tokens=room, batch_size=batch_size)
    out = []
    for view, gen in zip(views, generations):
        grid = lm.format.parse(gen.tokens) if gen.finished else None
        out.append((view, view.augmentation.invert_grid(grid) if grid is not None else None))
    return out


def affordable_prefix(views: list[View], budget: TaskBudget, room: int) -> list[View]:
    """The longest prefix (halving) whose prompts and full-length answers the budget pays for."""
    while views and not budget.can_afford(budget.sequences_cost([len(v.prompt) + room for v in views])):
        views = views[: len(views) // 2]
    return views


def vote(predictions: list[tuple[str, np.ndarray | None]], how: str = "hierarchical",
         top_per_group: int = 3, n_attempts: int = 2) -> list[np.ndarray | None]:
    """Two attempts (or `n_attempts`) from (category, grid) predictions: marc's hierarchical vote
    or a plain majority."""
    if how == "majority":
        return majority_vote([g for _, g in predictions], n_attempts)
    return hierarchical_vote(predictions, top_per_group=top_per_group, n_attempts=n_attempts, identity=IDENTITY.name)


def predict_augmented(lm: LoadedModel, task: Task, budget: TaskBudget | None, transforms: list | None = None,
                      orders: int = 2, seed: int = 0, batch_size: int = 16, top_per_group: int = 3,
                      how: str = "hierarchical", leave_one_out: bool = False, fill: bool = True,
                      max_views: int = 512, settle: int = 0) -> tuple[list[list[np.ndarray | None]], dict]:
    """Two attempts per test output, and a record of the views.

    The configured views come first.  With `fill` and a capped budget, more views follow (see
    `more_augmentations`), a batch at a time, for as long as the budget pays for a whole view
    (prompt and full-length answer), at most `max_views` per test input: more budget buys more
    votes; with `settle` S > 0 filling stops once S fill batches in a row left the attempts as
    they were (see `VoteSettling`).  Without a cap only the configured views are decoded."""
    settling = VoteSettling.watching(task, settle, how, top_per_group)
    per_test, info = view_predictions(lm, task, budget, transforms, orders, seed, batch_size, leave_one_out, fill,
                                      max_views, settling)
    return vote_per_test(per_test, how, top_per_group), info


def view_predictions(lm: LoadedModel, task: Task, budget: TaskBudget | None, transforms: list | None = None,
                     orders: int = 2, seed: int = 0, batch_size: int = 16, leave_one_out: bool = False,
                     fill: bool = True, max_views: int = 512,
                     settling: "VoteSettling | None" = None) -> tuple[Predictions, dict]:
    """`predict_augmented` before the vote: every view's answer, grouped by test input and named by
    its transform (the vote's categories), and the record of the views.  Methods that pool views
    from several sources (e.g. several independently trained adapters) vote once over them all."""
    transforms = inference_transforms() if transforms is None else transforms
    views, decoded = decode_augmented(lm, task, budget, transforms, orders, np.random.default_rng(seed),
                                      batch_size, leave_one_out, fill, max_views, settling)
    per_test: Predictions = [[] for _ in task.test]
    add_answers(per_test, decoded)
    info = {"views": len(decoded), "configured_views": len(views),
            "valid_predictions": sum(g is not None for preds in per_test for _, g in preds)}
    return per_test, info


def add_answers(per_test: Predictions, decoded: list[tuple["View", np.ndarray | None]]) -> None:
    """Each decoded view's answer into its test input's list, named by its transform (the vote's category)."""
    for view, grid in decoded:
        per_test[view.test_index].append((view.augmentation.transform.name, grid))


def vote_per_test(per_test: Predictions, how: str = "hierarchical", top_per_group: int = 3) -> list[list[np.ndarray | None]]:
    """Two attempts for every test input from its views' answers."""
    return [vote(preds, how, top_per_group) for preds in per_test]


def decode_augmented(lm: LoadedModel, task: Task, budget: TaskBudget | None, transforms: list, orders: int,
                     rng: np.random.Generator, batch_size: int = 16, leave_one_out: bool = False, fill: bool = True,
                     max_views: int = 512, settling: "VoteSettling | None" = None
                     ) -> tuple[list[View], list[tuple[View, np.ndarray | None]]]:
    """(the configured views, every view decoded with its greedy answer): the configured views,
    then with `fill` under a cap more views while the budget pays (see `predict_augmented`)."""
    room = answer_room(lm.format, task)
    views = build_views(lm, task, transforms, orders, rng, leave_one_out)
    decoded = decode_views(lm, views, budget, room, batch_size)
    capped = is_capped(budget)
    if fill and capped and not budget.exhausted():
        if settling is not None:
            settling.add(decoded, filled=False)
        decoded += fill_views(lm, task, budget, room, batch_size, len(views), max_views, rng, settling)
    elif budget is not None and not capped:
        budget.out_of_work("no cap: the configured views only")
    return views, decoded


def is_capped(budget: TaskBudget | None) -> bool:
    """Whether the budget has a cap to fill (without one, methods decode their configured views only)."""
    return budget is not None and (budget.cap.flops is not None or budget.cap.seconds is not None)


class MoreViews:
    """Views past the configured ones (see `more_augmentations`), a batch at a time, at most
    `max_views` per test input in all (`done` of them already used)."""

    def __init__(self, lm: LoadedModel, task: Task, rng: np.random.Generator, max_views: int, done: int):
        self.lm, self.task, self.max_views, self.done = lm, task, max_views, done
        self.per_test = max(1, len(task.test))
        self.source = more_augmentations(task, rng)

    def next_batch(self, size: int, budget: TaskBudget) -> list[View]:
        """About `size` more views ([] when there are none: the reason goes to `budget.out_of_work`)."""
        misses = 0
        while True:
            room_left = self.max_views * self.per_test - self.done
            if room_left <= 0:
                budget.out_of_work(f"max_views reached ({self.max_views} views per test input)")
                return []
            augs = [next(self.source) for _ in range(max(1, min(size, room_left) // self.per_test))]
            views = views_for(self.lm, self.task, augs)[:room_left]
            if views:
                return views
            misses += 1
            if misses > 8:
                budget.out_of_work("no further view fits the context")
                return []

    def used(self, n: int) -> None:
        self.done += n


def fill_views(lm, task, budget: TaskBudget, room: int, batch_size: int, done: int, max_views: int,
               rng: np.random.Generator, settling: "VoteSettling | None" = None) -> list[tuple[View, np.ndarray | None]]:
    """More views while the budget pays for them (see predict_augmented), until the vote settles
    when `settling` watches it."""
    more = MoreViews(lm, task, rng, max_views, done)
    decoded = []
    while views := more.next_batch(batch_size, budget):
        views = affordable_prefix(views, budget, room)
        if not views:
            break   # the budget cannot pay for one more view (recorded as a stop by the cap)
        batch = decode_views(lm, views, budget, room, batch_size)
        decoded += batch
        more.used(len(views))
        if settling is not None and settling.add(batch):
            budget.out_of_work(f"the vote settled ({settling.batches} fill batches in a row left the attempts unchanged)")
            break
    return decoded


class VoteSettling:
    """Watches the vote while views are filled: `add(batch)` is true once `batches` fill batches in
    a row have left every test input's two attempts as they were.

    Why: filling spends what is left of a task's cap on more views, and on long prompts decoding is
    memory-bound, so those views are most of a task's time (the arc1-eval tasks that train no step
    decode 400-512 views each).  When more views stop changing the vote they buy nothing but time.
    Adaptive-Consistency (Aggarwal et al. 2023) stops sampling on a posterior over the majority;
    this is its plainest form, for a two-level vote whose ranking has no such posterior.  The
    configured views set the first attempts; only fill batches count towards `batches`."""

    def __init__(self, n_tests: int, batches: int, how: str = "hierarchical", top_per_group: int = 3):
        self.batches, self.how, self.top_per_group = batches, how, top_per_group
        self.per_test: Predictions = [[] for _ in range(max(1, n_tests))]
        self.attempts: list | None = None
        self.unchanged = 0
        self.filled_before = False   # whether the last batch added was a fill batch

    @classmethod
    def watching(cls, task: Task, settle: int, how: str, top_per_group: int) -> "VoteSettling | None":
        """A watch for `settle` > 0 fill batches; None (fill to the end) for 0."""
        return cls(len(task.test), settle, how, top_per_group) if settle else None

    def add(self, decoded: list[tuple[View, np.ndarray | None]], filled: bool = True) -> bool:
        add_answers(self.per_test, decoded)
        attempts = [[None if a is None else grid_key(a) for a in vote(preds, self.how, self.top_per_group)]
                    for preds in self.per_test]
        # A batch counts when it and the batch before it were both fill batches.
        self.unchanged = self.unchanged + 1 if filled and self.filled_before and attempts == self.attempts else 0
        self.attempts, self.filled_before = attempts, filled
        return self.unchanged >= self.batches


def predict_with_views(lm: LoadedModel, task: Task, budget: TaskBudget | None, views: ViewSettings,
                       seed: int) -> tuple[list[list[np.ndarray | None]], dict]:
    """`predict_augmented` with a method's `ViewSettings`."""
    if views.select == "poe":
        return predict_with_poe(lm, task, budget, views, seed)
    per_test, info = view_predictions_with(lm, task, budget, views, seed)
    return vote_per_test(per_test, views.vote, views.top_per_group), info


def predict_with_poe(lm: LoadedModel, task: Task, budget: TaskBudget | None, views: ViewSettings,
                     seed: int) -> tuple[list[list[np.ndarray | None]], dict]:
    """The views' answers as `predict_with_views` decodes them, leaving the FLOPs to score
    `views.scored` answers in every configured view; then, per test input, the vote's `scored` best
    answers ranked by their summed NLL under its configured views (`poe_rank`): an answer the vote
    ranks low but every view finds likely can win."""
    configured = build_views(lm, task, transforms_from_names(views.transforms), views.orders,
                             np.random.default_rng(seed), views.leave_one_out_prompts)   # the draw decoding makes first
    decoding = budget.holding_back(*scoring_reserve(configured, answer_room(lm.format, task), budget, views.scored)) \
        if is_capped(budget) else budget   # leaves the scoring's FLOPs
    per_test, info = view_predictions_with(lm, task, decoding, views, seed)
    attempts, info["poe_nll"] = [], []
    for i, predictions in enumerate(per_test):
        shortlist = [g for g in vote(predictions, views.vote, views.top_per_group, n_attempts=views.scored) if g is not None]
        ranked, nlls = poe_rank(lm, [v for v in configured if v.test_index == i], shortlist, budget, views.scored)
        info["poe_nll"].append([round(x, 3) for x in nlls])
        attempts.append((list(ranked) + [None, None])[:2])
    return attempts, info


def view_predictions_with(lm: LoadedModel, task: Task, budget: TaskBudget | None, views: ViewSettings,
                          seed: int) -> tuple[Predictions, dict]:
    """`view_predictions` with a method's `ViewSettings`."""
    settling = VoteSettling.watching(task, views.settle, views.vote, views.top_per_group)
    return view_predictions(lm, task, budget, transforms_from_names(views.transforms), views.orders, seed=seed,
                            batch_size=views.decode_batch_size, leave_one_out=views.leave_one_out_prompts,
                            fill=views.fill_views, max_views=views.max_views, settling=settling)


def room_for_views(lm: LoadedModel, task: Task, budget: TaskBudget, views) -> TaskBudget:
    """The budget of an adaptation phase that prediction with `views` (ViewSettings and
    RoomForViews) follows: it keeps the configured views' FLOPs and, under a seconds cap,
    `views_seconds_share` of the seconds left."""
    return budget.holding_back(configured_views_cost(lm, task, budget, views), share_of_rest=views.views_seconds_share)


def configured_views_cost(lm: LoadedModel, task: Task, budget: TaskBudget, views: ViewSettings) -> float:
    """FLOPs of the configured views (prompts plus full-length answers): what an adaptation phase
    leaves for the prediction that follows."""
    configured = build_views(lm, task, transforms_from_names(views.transforms), views.orders,
                             np.random.default_rng(0), views.leave_one_out_prompts)
    room = answer_room(lm.format, task)
    return budget.sequences_cost([len(v.prompt) + room for v in configured])
