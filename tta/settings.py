"""Method settings: dataclass fields with a help string each (peft's style).

Settings are plain dataclasses; a method's config composes shared pieces (views, LoRA) by
inheritance, so every setting stays a flat `--set key=value` key."""
from __future__ import annotations

import dataclasses


_NONE = object()


def setting(default, help: str, before=_NONE):
    """A config field with a help string, mutable defaults handled.

    `before`, for a setting added after runs were recorded: the value that reproduces what the
    method did before the setting existed.  A run directory whose config lacks the setting is
    read as having that value, so it can still be resumed when the value matches (see
    `as_recorded_now`)."""
    metadata = {"help": help} if before is _NONE else {"help": help, "before": before}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def as_recorded_now(config_cls, recorded: dict) -> dict:
    """A config recorded by an earlier version of the method, with every setting added since
    that declares a `before` value filled in with it (what the method then did)."""
    added = {f.name: f.metadata["before"] for f in dataclasses.fields(config_cls)
             if "before" in f.metadata and f.name not in recorded}
    return {**recorded, **added}
