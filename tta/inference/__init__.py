"""Answers from a model: batched constrained decoding (`decoding`), depth-first search over
answers (`search`), augmented views and the vote over them (`predict`, `voting`)."""
