import numpy as np
from hypothesis import given, settings, strategies as st

from tta.model.encoding import (IGNORE, CompactFormat, ChatTextFormat, make_grid_tokenizer, numpy_text,
                          parse_numpy_text, DIGIT0_ID, EOS_ID, NL_ID, OUT_ID)
from tta.data.tasks import Pair
from conftest import flip_task

FMT = CompactFormat(make_grid_tokenizer())
grid_st = st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**31 - 1)).map(
    lambda s: np.random.default_rng(s[2]).integers(0, 10, size=(s[0], s[1])).astype(np.int8))


@settings(max_examples=50, deadline=None)
@given(grid_st)
def test_compact_answer_round_trips(g):
    ids = FMT.answer_ids(g)
    assert len(ids) == g.shape[0] * (g.shape[1] + 1) + 1
    assert np.array_equal(FMT.parse(ids), g)


@settings(max_examples=30, deadline=None)
@given(grid_st)
def test_numpy_text_round_trips(g):
    assert np.array_equal(parse_numpy_text(numpy_text(g)), g)


def test_numpy_text_is_the_paper_format():
    assert numpy_text(np.array([[0, 0, 5], [0, 5, 5]])) == "[[0 0 5]\n [0 5 5]]"


def test_fast_encoding_matches_the_transformers_tokenizer():
    task = flip_task()
    enc = FMT.encode(list(task.train), task.test[0].input, task.test[0].output)
    text = FMT.tokenizer.decode(enc.input_ids, skip_special_tokens=False).replace(" ", "")
    assert FMT.tokenizer(text.replace("<s>", ""), add_special_tokens=False)["input_ids"] == enc.input_ids[1:]


def test_loss_only_on_outputs_from_the_second_demonstration():
    task = flip_task(n_train=3, size=2)
    enc = FMT.encode(list(task.train), task.test[0].input, task.test[0].output)
    learned = [t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE]
    expected = []
    for pair in list(task.train)[1:] + [task.test[0]]:
        expected += FMT.answer_ids(pair.output)
    assert learned == expected
    no_demo = FMT.encode(list(task.train), task.test[0].input, task.test[0].output, learn_demo_outputs=False)
    assert sum(l != IGNORE for l in no_demo.labels) == len(FMT.answer_ids(task.test[0].output))


def test_malformed_outputs_parse_to_none_never_raise():
    digit = lambda d: 6 + d
    assert FMT.parse([]) is None
    assert FMT.parse([digit(1), digit(2), NL_ID, digit(3), NL_ID, EOS_ID]) is None      # ragged
    assert FMT.parse([digit(1), 3, NL_ID]) is None                                       # a marker inside
    assert FMT.parse([digit(1)] * 31 + [NL_ID]) is None                                  # too wide
    assert parse_numpy_text("no grid here") is None
    assert parse_numpy_text("[[1 2]\n [3]]") is None


class FakeChatTokenizer:
    """Character-level stand-in for a chat LLM tokenizer without a chat template."""
    eos_token_id, pad_token_id, chat_template = 0, 0, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)

    def get_vocab(self):
        return {chr(i): i for i in range(1, 128)}

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


def test_chat_format_round_trip_and_allowed_tokens():
    fmt = ChatTextFormat(FakeChatTokenizer())
    task = flip_task(size=2)
    enc = fmt.encode(list(task.train), task.test[0].input, task.test[0].output)
    answer = [t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE]
    assert np.array_equal(fmt.parse(answer), task.test[0].output)
    allowed = {chr(i) for i in fmt.allowed_token_ids() if i}
    assert set("0123456789[] \n") <= allowed and "a" not in allowed


def test_grid_positions_put_the_same_cell_of_consecutive_grids_a_fixed_distance_apart():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (3, 7), (30, 30), (5, 2)]:
        a, b = rng.integers(0, 10, (h, w)), rng.integers(0, 10, (w, h))
        ids = FMT.encode([Pair(a, b)], b, a).input_ids
        pos = FMT.positions(ids)
        cells = [p for t, p in zip(ids, pos) if DIGIT0_ID <= t < DIGIT0_ID + 10]
        first, second = cells[:h * w], cells[h * w:2 * h * w]
        # grid 0 is h x w, grid 1 is w x h: cell (r, c) of each at 1024 g + 1 + 32 r + c
        assert first == [1 + 32 * r + c for r in range(h) for c in range(w)]
        assert second == [1025 + 32 * r + c for r in range(w) for c in range(h)]
        assert len(set(pos[1:])) == len(pos) - 1          # no two tokens share a position after <s>
        closers = [p for t, p in zip(ids, pos) if t in (OUT_ID, EOS_ID)]
        assert closers == [1 + 32 * h, 1025 + 32 * w, 2049 + 32 * w, 3073 + 32 * h]


def test_positions_of_a_chat_format_and_of_old_checkpoints_count_up():
    plain = CompactFormat(grid_positions=False)
    ids = plain.encode([], np.ones((2, 2), dtype=np.int8)).input_ids
    assert plain.positions(ids) == list(range(len(ids)))
