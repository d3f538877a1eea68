"""Method settings: dataclass fields with a help string each (peft's style).

Settings are plain dataclasses; a method's config composes shared pieces (views, LoRA) by
inheritance, so every setting stays a flat `--set key=value` key."""
from __future__ import annotations

import dataclasses


_NONE = object()


def setting(default, help: str, before=_NONE, at_least=None, at_most=None):
    """A config field with a help string, mutable defaults handled.

    `at_least` / `at_most`: the values that make sense (inclusive); another value given with
    `--set` or in an experiment file is a one-line error (`out_of_range`).
    `before`, for a setting added after runs were recorded: the value that reproduces what the
    method did before the setting existed.  A run directory whose config lacks the setting is
    read as having that value, so it can still be resumed when the value matches (see
    `as_recorded_now`).  A setting whose effect depends on the run's budget may give a function
    of the recorded budget (`{"flops": ..., "seconds": ...}`) instead."""
    metadata = {"help": help}
    if before is not _NONE:
        metadata["before"] = before
    if at_least is not None:
        metadata["at_least"] = at_least
    if at_most is not None:
        metadata["at_most"] = at_most
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def as_recorded_now(config_cls, recorded: dict, budget: dict | None = None) -> dict:
    """A config recorded by an earlier version of the method, under `budget`, with every setting
    added since that declares a `before` value filled in with it (what the method then did)."""
    def before(f):
        value = f.metadata["before"]
        return value(budget or {}) if callable(value) else value

    added = {f.name: before(f) for f in dataclasses.fields(config_cls)
             if "before" in f.metadata and f.name not in recorded}
    return {**recorded, **added}


def out_of_range(config) -> str | None:
    """`key=value: expected ...` for the first setting outside its `at_least`/`at_most`, else None."""
    for f in dataclasses.fields(config):
        value, low, high = getattr(config, f.name), f.metadata.get("at_least"), f.metadata.get("at_most")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            expected = (f"between {low} and {high}" if low is not None and high is not None
                        else f"at least {low}" if low is not None else f"at most {high}")
            return f"{f.name}={value}: expected {expected}"
    return None
