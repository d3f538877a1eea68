"""Method settings: dataclass fields with a help string each (peft's style).

Settings are plain dataclasses; a method's config composes shared pieces (views, LoRA) by
inheritance, so every setting stays a flat `--set key=value` key."""
from __future__ import annotations

import dataclasses


def setting(default, help: str):
    """A config field with a help string, mutable defaults handled."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
