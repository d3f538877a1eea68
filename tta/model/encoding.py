"""Turning tasks into token sequences and model outputs back into grids.

Two formats share one interface (`encode`, `parse`, `allowed_token_ids`):

* `CompactFormat` for the embedded model: one token per cell, one per row end,
  markers for input/output, an end-of-sequence after every output.  16 tokens.
* `ChatTextFormat` for general chat LLMs: grids printed the way numpy prints
  them (the paper's format, ``[[0 0 5]\\n [0 5 5]]``) inside the model's chat
  template when it has one.

Parsing never raises: text that is not a rectangular grid of digits is None,
which the scorer counts as an invalid attempt.

Every format also numbers its tokens (`positions`, `position_tracker`): plain
0, 1, 2, ... for chat LLMs, and *grid positions* for the compact format (see
`GridPositions`), which the embedded model was trained with.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from tta.data.tasks import MAX_SIZE, Pair

# ---------------------------------------------------------------- compact tokenizer

PAD, BOS, EOS, IN, OUT, NL = "<pad>", "<s>", "</s>", "I", "O", "\n"
SPECIALS = [PAD, BOS, EOS, IN, OUT, NL]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + [str(d) for d in range(10)])}
PAD_ID, BOS_ID, EOS_ID, IN_ID, OUT_ID, NL_ID = (VOCAB[t] for t in SPECIALS)
DIGIT0_ID = VOCAB["0"]
IGNORE = -100  # label value that the loss skips (the transformers convention)


def make_grid_tokenizer():
    """The compact tokenizer as a transformers tokenizer, so models, trainers and save/load take it."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(VOCAB, unk_token=PAD))
    # Every character is its own token: cells, row ends, markers.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=PAD, padding_side="left",
                                   clean_up_tokenization_spaces=False)


def is_grid_tokenizer(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return len(vocab) == len(VOCAB) and all(vocab.get(t) == i for t, i in VOCAB.items())


# ---------------------------------------------------------------- position ids

GRID_STRIDE = 1024   # position distance between the same cell of consecutive grids
ROW_STRIDE = 32      # position distance between the same column of consecutive rows (> 30 cells + row end)


class GridPositions:
    """Position ids that make a grid's geometry a fixed distance in RoPE.

    Cell (r, c) of the g-th grid of a sequence sits at position ``1024 g + 1 + 32 r + c``; a row
    end takes the next column, the token that closes a grid (``O`` after an input, ``</s>`` after
    an output) takes column 0 of the row below the last, and ``I`` sits just before its grid.  So
    the cell above is always 32 back, and the same cell of the previous grid (the input of the
    output being written) always 1024 back, whatever the grids' sizes.  With plain 0, 1, 2, ...
    these distances depend on the widths, and the 3.4M-parameter model never learned to write an
    output of the right width (measured: 0 right-shaped greedy answers on 20 gen-eval tasks after
    72 CPU-minutes of pretraining).  The model is an unmodified Llama: only the ids differ.

    Fed one token at a time (`feed` returns that token's position), so the decoding loop and the
    tree search can number tokens as they are chosen.
    """

    def __init__(self):
        self.grid, self.row, self.col = 0, 0, 0

    def _here(self) -> int:
        return GRID_STRIDE * self.grid + 1 + ROW_STRIDE * self.row + self.col

    def feed(self, token: int) -> int:
        if token == IN_ID:                  # opens grid `self.grid`
            self.row, self.col = 0, 0
            return GRID_STRIDE * self.grid
        if token in (OUT_ID, EOS_ID):       # closes the grid; O also opens the next one
            position = GRID_STRIDE * self.grid + 1 + ROW_STRIDE * self.row
            self.grid, self.row, self.col = self.grid + 1, 0, 0
            return position
        if token == NL_ID:
            position = self._here()
            self.row, self.col = self.row + 1, 0
            return position
        if DIGIT0_ID <= token < DIGIT0_ID + 10:
            position = self._here()
            self.col += 1
            return position
        return 0                            # <s> and padding


class SequentialPositions:
    """0, 1, 2, ...: how every other causal LM numbers its tokens."""

    def __init__(self):
        self.next = 0

    def feed(self, token: int) -> int:
        self.next += 1
        return self.next - 1


def positions_of(tracker, ids) -> list[int]:
    return [tracker.feed(int(t)) for t in ids]


@dataclass
class Encoded:
    """One training or inference sequence; `labels` is IGNORE except on the tokens to learn."""
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


class CompactFormat:
    """``<s> I grid O grid </s> I grid O grid </s> ... I query O`` with grids as digit rows ending in newline."""

    name = "compact"
    eos_id = EOS_ID
    pad_id = PAD_ID

    def __init__(self, tokenizer=None, grid_positions: bool = True):
        self.tokenizer = tokenizer
        self.grid_positions = grid_positions   # False only for checkpoints trained before grid positions

    def position_tracker(self):
        return GridPositions() if self.grid_positions else SequentialPositions()

    def positions(self, ids) -> list[int]:
        return positions_of(self.position_tracker(), ids)

    @staticmethod
    def grid_ids(grid: np.ndarray) -> list[int]:
        rows = grid.astype(np.int64) + DIGIT0_ID
        newline = np.full((grid.shape[0], 1), NL_ID, dtype=np.int64)
        return np.concatenate([rows, newline], axis=1).ravel().tolist()

    def encode(self, demos: list[Pair], query: np.ndarray, answer: np.ndarray | None = None,
               learn_demo_outputs: bool = True) -> Encoded:
        """Demonstrations in context, then the query; labels cover every demonstration output
        from the second on (when `learn_demo_outputs`) and the answer, never the inputs."""
        ids, labels = [BOS_ID], [IGNORE]

        def add(tokens, learn: bool):
            ids.extend(tokens)
            labels.extend(tokens if learn else [IGNORE] * len(tokens))

        for i, pair in enumerate(demos):
            add([IN_ID, *self.grid_ids(pair.input), OUT_ID], False)
            add([*self.grid_ids(pair.output), EOS_ID], learn_demo_outputs and i > 0)
        add([IN_ID, *self.grid_ids(query), OUT_ID], False)
        if answer is not None:
            add([*self.grid_ids(answer), EOS_ID], True)
        return Encoded(ids, labels)

    def answer_ids(self, answer: np.ndarray) -> list[int]:
        return [*self.grid_ids(answer), EOS_ID]

    def allowed_token_ids(self) -> list[int]:
        return [NL_ID, EOS_ID] + list(range(DIGIT0_ID, DIGIT0_ID + 10))

    def answer_tokens(self, side: int) -> int:
        """Tokens a side x side answer takes: a cell each, a row end each, end-of-sequence."""
        return side * (side + 1) + 1

    def max_answer_tokens(self) -> int:
        return self.answer_tokens(MAX_SIZE)

    def parse(self, token_ids) -> np.ndarray | None:
        rows, row = [], []
        for t in token_ids:
            t = int(t)
            if t == EOS_ID:
                break
            if t == NL_ID:
                rows.append(row)
                row = []
            elif DIGIT0_ID <= t < DIGIT0_ID + 10:
                row.append(t - DIGIT0_ID)
            else:
                return None
        if row:  # an unterminated last row is still a row
            rows.append(row)
        return _rectangle(rows)


def _rectangle(rows: list[list[int]]) -> np.ndarray | None:
    if not rows or not rows[0] or len(rows) > MAX_SIZE or len(rows[0]) > MAX_SIZE:
        return None
    if any(len(r) != len(rows[0]) for r in rows):
        return None
    return np.array(rows, dtype=np.int8)


# ---------------------------------------------------------------- chat LLM text format

def numpy_text(grid: np.ndarray) -> str:
    """``[[0 0 5]\\n [0 5 5]]``: how numpy prints an integer grid (the paper's format)."""
    return "[" + "\n ".join("[" + " ".join(map(str, row)) + "]" for row in grid.tolist()) + "]"


_ROW = re.compile(r"\[([0-9 ,]+)\]")


def parse_numpy_text(text: str) -> np.ndarray | None:
    rows = [[int(c) for c in re.split(r"[ ,]+", m.strip()) if c] for m in _ROW.findall(text)]
    return _rectangle([r for r in rows if r])


class ChatTextFormat:
    """Grids as numpy prints inside the chat template; the loss still falls on the answers only."""

    name = "chat"
    system = ("You solve abstract reasoning puzzles. Each example maps an input grid to an output grid "
              "by the same rule. Answer with the output grid for the last input only.")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._allowed = None

    def position_tracker(self):
        return SequentialPositions()

    def positions(self, ids) -> list[int]:
        return list(range(len(ids)))

    def _prompt_text(self, demos, query) -> str:
        shots = "\n\n".join(f"Input:\n{numpy_text(p.input)}\nOutput:\n{numpy_text(p.output)}" for p in demos)
        user = f"{shots}\n\nInput:\n{numpy_text(query)}\nOutput:"
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{self.system}\n\n{user}\n"

    def encode(self, demos, query, answer=None, learn_demo_outputs: bool = False) -> Encoded:
        prompt = self.tokenizer(self._prompt_text(demos, query), add_special_tokens=False)["input_ids"]
        if answer is None:
            return Encoded(prompt, [IGNORE] * len(prompt))
        target = self.answer_ids(answer)
        return Encoded(prompt + target, [IGNORE] * len(prompt) + target)

    def answer_ids(self, answer: np.ndarray) -> list[int]:
        return self.tokenizer(numpy_text(answer), add_special_tokens=False)["input_ids"] + [self.eos_id]

    def allowed_token_ids(self) -> list[int]:
        """Tokens made only of digits, brackets, spaces and newlines (plus end-of-sequence)."""
        if self._allowed is None:
            ok = set("0123456789[] \n,")
            self._allowed = [i for tok, i in self.tokenizer.get_vocab().items()
                             if (text := self.tokenizer.convert_tokens_to_string([tok])) and set(text) <= ok]
            self._allowed.append(self.eos_id)
        return self._allowed

    def max_answer_tokens(self) -> int:
        return self.answer_tokens(MAX_SIZE)

    def answer_tokens(self, side: int) -> int:
        """A generous count for a side x side answer printed numpy-style: a token per cell and per
        separator, brackets and newlines per row, end-of-sequence."""
        return side * (2 * side + 3) + 3

    def parse(self, token_ids) -> np.ndarray | None:
        ids = [int(t) for t in token_ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        try:
            return parse_numpy_text(self.tokenizer.decode(ids, skip_special_tokens=True))
        except Exception:  # a tokenizer can fail on odd ids; an unreadable answer is just invalid
            return None


POSITIONS_KEY = "tta_positions"   # in a grid model's config: "grid", or absent for plain positions


def format_for(tokenizer, config=None):
    if not is_grid_tokenizer(tokenizer):
        return ChatTextFormat(tokenizer)
    return CompactFormat(tokenizer, grid_positions=getattr(config, POSITIONS_KEY, None) == "grid")
