import numpy as np

from tta import scoring
from tta.inference.voting import hierarchical_vote, majority_vote

A, B, C, D, E, F, G = (np.full((2, 2), v, np.int8) for v in range(7))


def values(grids):
    return [None if g is None else int(g[0, 0]) for g in grids]


def test_agreement_across_transforms_beats_a_plain_majority():
    """A: both orders of three transforms (6 votes, 3 categories); B: one order of four other
    transforms (4 votes, 4 categories), whose other orders each said something else."""
    preds = [(t, A) for t in ("identity", "rot90", "rot180") for _ in range(2)]
    preds += [("flip_h", B), ("flip_h", D), ("flip_v", B), ("flip_v", E),
              ("transpose", B), ("transpose", F), ("rot270", B), ("rot270", G)]
    # points: B = 4 transforms + the all-views top 3 = 5; A = 3 + 1 = 4; D = flip_h + third of
    # all (ties at 1 vote go to the first seen) = 2; E, F, G = 1 each.
    assert values(hierarchical_vote(preds, n_attempts=4)) == [1, 0, 3, 4]
    assert values(majority_vote([g for _, g in preds], n_attempts=2)) == [0, 1]
    assert values(hierarchical_vote(preds)) == [1, 0]


def test_a_category_scores_an_answer_once_however_often_it_repeats_it():
    preds = [("rot90", B)] * 5 + [("identity", A), ("flip_h", A)]
    # B: rot90 + all = 2; A: identity + flip_h + all = 3, though B has 5 votes to A's 2.
    assert values(hierarchical_vote(preds)) == [0, 1]


def test_only_each_categorys_top_answers_score():
    # Group g ranks A (3) > B (2) > C (2) > D (1): D misses g's top 3 and scores only in h.
    # All views: A 3, B 2, C 2, D 2 -> the tie for third goes to C (seen before D).
    preds = [("g", A)] * 3 + [("g", B)] * 2 + [("g", C)] * 2 + [("g", D)] + [("h", D)]
    assert values(hierarchical_vote(preds, top_per_group=3, n_attempts=4)) == [0, 1, 2, 3]
    # With a top 1, B and C score nothing and are not candidates at all.
    assert values(hierarchical_vote(preds, top_per_group=1, n_attempts=3)) == [0, 3, None]


def test_ties_go_to_the_identity_view():
    # Equal points (1 category + all each): the identity view's answer first, though seen second.
    assert values(hierarchical_vote([("rot90", B), ("identity", A)])) == [0, 1]
    # Equal points (3 each); the identity view produced B twice and A once: B first.
    preds = [("identity", A), ("rot90", A), ("identity", B), ("identity", B), ("flip_h", B)]
    assert values(hierarchical_vote(preds)) == [1, 0]
    # The identity name is the caller's.
    assert values(hierarchical_vote([("rot90", B), ("base", A)], identity="base")) == [0, 1]
    # No identity answer among the tied: the first seen.
    assert values(hierarchical_vote([("rot90", B), ("flip_h", A)])) == [1, 0]


def test_none_predictions_are_ignored():
    # Five views without an answer neither score nor take a place in a category's top answers.
    preds = [("identity", None)] * 5 + [("identity", A), ("rot90", B), ("rot90", None)]
    assert values(hierarchical_vote(preds, top_per_group=1)) == [0, 1]
    assert values(majority_vote([None, None, None, B, A, A])) == [0, 1]


def test_fewer_candidates_than_attempts_are_padded_with_none():
    assert hierarchical_vote([("identity", None)]) == [None, None]
    assert hierarchical_vote([]) == [None, None]
    assert values(hierarchical_vote([("identity", A), ("rot90", A)], n_attempts=3)) == [0, None, None]
    assert majority_vote([None]) == [None, None]
    assert values(majority_vote([A], n_attempts=3)) == [0, None, None]


def test_majority_vote_is_plain_self_consistency():
    assert values(majority_vote([B, A, A, C, B, A])) == [0, 1]
    assert values(majority_vote([B, A, C, A, B], n_attempts=3)) == [1, 0, 2]   # ties: first seen
    different_shape = np.zeros((2, 3), np.int8)   # same values, another shape: another answer
    assert [g.shape for g in majority_vote([different_shape, A, A])] == [(2, 2), (2, 3)]


def test_pass_at_2_and_shapes():
    truth = np.array([[1, 2], [3, 4]], np.int8)
    wrong_shape = np.array([[1, 2, 0], [3, 4, 0]], np.int8)
    near = np.array([[1, 2], [3, 0]], np.int8)
    assert scoring.solved([near, truth], truth)        # the second attempt counts
    assert not scoring.solved([near, wrong_shape], truth)
    assert not scoring.solved([near, near, truth], truth)   # only two attempts are read
    assert scoring.cell_accuracy(near, truth) == 0.75
    assert scoring.cell_accuracy(wrong_shape, truth) == 0.0 and not scoring.shape_ok(None, truth)


def test_three_aggregations_by_hand():
    per_task = [[True, False], [True], [False, False, False]]
    acc = scoring.aggregate(per_task)
    assert acc["kaggle"] == 2 / 6
    assert acc["benchmarking"] == (0.5 + 1 + 0) / 3
    assert acc["all_outputs"] == 1 / 3
