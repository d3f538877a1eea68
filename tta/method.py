"""The method interface and the registry of methods by name.

A method is a class with a config dataclass and four hooks (after TTAB):
`setup` once per run, then for every task `adapt`, `predict`, `reset`.
The runner owns everything else -- budgets, scoring, results -- so methods
differ only in how they spend compute.  A user's class plugs in with
`@register("name")` in any imported module, or as ``--method module:Class``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from typing import ClassVar

import numpy as np

from tta.budget import TaskBudget
from tta.models import LoadedModel
from tta.settings import setting  # noqa: F401  (re-exported: methods import it from here)
from tta.tasks import Task

REGISTRY: dict[str, type["Method"]] = {}


class MethodError(ValueError):
    """Unknown method or bad setting; the message is one line."""


def register(name: str):
    def add(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return add


@dataclasses.dataclass
class NoConfig:
    pass


class Method:
    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    needs_model: ClassVar[bool] = True
    # How the method turns a bigger cap into more of its own work (shown by `tta methods`).  A
    # method compared on equal compute should have an answer; where it has none, say so.
    spends: ClassVar[str] = ""

    def __init__(self, config, lm: LoadedModel | None, seed: int = 0):
        self.config = config
        self.lm = lm
        self.seed = seed

    def setup(self, tasks: list[Task]) -> dict | None:
        """One-off work before the first task (e.g. a data store); returns its cost record, if any."""
        return None

    def adapt(self, task: Task, budget: TaskBudget, seed: int) -> dict:
        """Spend compute on the task before predicting (e.g. train an adapter); returns a record.
        `budget` answers what is left and prices work (see tta.budget.TaskBudget); the harness
        charges every forward and backward of the model whatever the method does."""
        return {}

    def predict(self, task: Task, budget: TaskBudget, seed: int) -> tuple[list[list[np.ndarray | None]], dict]:
        """Two attempts for every test input, and a record of how they were made."""
        raise NotImplementedError

    def reset(self) -> None:
        """Undo whatever `adapt` changed, so the next task starts from the base model."""


class AdapterMethod(Method):
    """A method whose `adapt` attaches a per-task adapter (kept in `self.adapter`); `reset`
    removes it, leaving the base weights as they were."""
    adapter = None

    def reset(self) -> None:
        if self.adapter is not None:
            from tta.training import detach_lora
            detach_lora(self.lm, self.adapter)
            self.adapter = None


# ---------------------------------------------------------------- lookup and settings

def _load_builtins() -> None:
    import methods  # noqa: F401  (importing the package registers the built-in methods)


def get_method(name: str) -> type[Method]:
    _load_builtins()
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise MethodError(f"cannot import method {name} ({e})") from None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise MethodError(f"{name} is not a subclass of tta.method.Method")
        cls.name = cls.name or class_name
        return cls
    raise MethodError(f"unknown method {name!r} (known: {', '.join(sorted(REGISTRY))}; or module:Class)")


def _coerce(field: dataclasses.Field, text: str):
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    if kind == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    if kind == "int":
        return int(float(text)) if "e" in text.lower() else int(text)
    if kind == "float":
        return float(text)
    if kind == "str":
        return text
    return json.loads(text)  # lists and anything else: JSON


def make_config(cls: type[Method], overrides: list[str] | dict | None = None):
    """The method's config with `key=value` overrides applied; unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides or []:
            if "=" not in item:
                raise MethodError(f"--set {item!r}: expected key=value")
            key, value = item.split("=", 1)
            items.append((key.strip(), value.strip()))
    values = {}
    for key, value in items:
        if key not in fields:
            raise MethodError(f"--set {key}: {cls.name} has no setting {key!r} (settings: {', '.join(fields) or 'none'})")
        try:
            values[key] = _coerce(fields[key], value) if isinstance(value, str) else value
        except (ValueError, json.JSONDecodeError) as e:
            raise MethodError(f"--set {key}={value}: {e}") from None
    try:
        return cls.Config(**values)
    except ValueError as e:   # a config's own check (e.g. an unknown transform name)
        raise MethodError(f"{cls.name}: {e}") from None


def describe(cls: type[Method]) -> list[tuple[str, str, object, str]]:
    """(name, type, default, help) for every setting: what `tta methods` prints."""
    rows = []
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f.name, kind, default, f.metadata.get("help", "")))
    return rows
