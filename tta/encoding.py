"""Turning tasks into token sequences and model outputs back into grids.

Two formats share one interface (`encode`, `parse`, `allowed_token_ids`):

* `CompactFormat` for the embedded model: one token per cell, one per row end,
  markers for input/output, an end-of-sequence after every output.  16 tokens.
* `ChatTextFormat` for general chat LLMs: grids printed the way numpy prints
  them (the paper's format, ``[[0 0 5]\\n [0 5 5]]``) inside the model's chat
  template when it has one.

Parsing never raises: text that is not a rectangular grid of digits is None,
which the scorer counts as an invalid attempt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from tta.tasks import MAX_SIZE, Pair

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

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

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


def format_for(tokenizer):
    return CompactFormat(tokenizer) if is_grid_tokenizer(tokenizer) else ChatTextFormat(tokenizer)
