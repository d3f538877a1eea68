import numpy as np

from tta import scoring
from tta.voting import hierarchical_vote, majority_vote

A, B, C, D = (np.full((2, 2), v, np.int8) for v in range(4))


def test_global_vote_counts_only_each_groups_top_answers():
    preds = [("identity", A), ("identity", A), ("rot90", B), ("rot90", B), ("rot90", B),
             ("flip_h", C), ("flip_h", C), ("flip_h", C), ("flip_h", C), ("flip_h", None)]
    first, second = hierarchical_vote(preds)
    assert np.array_equal(first, C) and np.array_equal(second, B)


def test_top_per_group_drops_rare_answers():
    preds = [("g", A)] * 3 + [("g", B)] * 2 + [("g", C)] * 2 + [("g", D)] + [("h", D)]
    ranked = hierarchical_vote(preds, top_per_group=3, n_attempts=4)
    # D is 4th in group g and dropped there; it keeps only h's single vote.
    assert [int(x[0, 0]) for x in ranked] == [0, 1, 2, 3]


def test_ties_go_to_the_identity_view():
    preds = [("rot90", B), ("identity", A)]
    assert np.array_equal(hierarchical_vote(preds)[0], A)


def test_fewer_candidates_than_attempts():
    assert hierarchical_vote([("identity", None)]) == [None, None]
    out = majority_vote([A, A, B])
    assert np.array_equal(out[0], A) and np.array_equal(out[1], B)


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
