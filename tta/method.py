"""The method interface and the registry of methods by name.

A method is a class with a config dataclass and four hooks (after TTAB):
`setup` once per run, then for every task `adapt`, `predict`, `reset`.
The runner owns everything else -- budgets, scoring, results -- so methods
differ only in how they spend compute.  A user's class plugs in with
`@register("name")` in any imported module (``--plugin FILE_OR_MODULE`` imports one), or as
``--method module:Class`` or ``--method path/to/file.py:Class``; docs/plugins.md has the contract.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import numpy as np

from tta.budget import TaskBudget
from tta.model.loading import LoadedModel
from tta.settings import out_of_range, setting  # noqa: F401  (setting re-exported: methods import it from here)
from tta.data.tasks import Task

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

    @classmethod
    def check_tasks(cls, config, tasks: list[Task]) -> None:
        """Refuse a run before any model work (a one-line MethodError or ContaminationError), e.g.
        when the method's own data overlaps the evaluated tasks.  The default accepts any tasks."""

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

    def merged(self):
        """Run prediction inside `with self.merged():` -- the LoRA merged into the base weights
        (fewer ops per decode step, charged as the base model), unmerged when the block ends."""
        from tta.training.finetune import merged
        return merged(self.adapter) if self.adapter is not None else contextlib.nullcontext()

    def reset(self) -> None:
        if self.adapter is not None:
            from tta.training.finetune import detach_lora
            detach_lora(self.lm, self.adapter)
            self.adapter = None


# ---------------------------------------------------------------- lookup and settings

ENTRY_POINT_GROUP = "tta.methods"
_discovered = False
_broken: dict[str, str] = {}   # entry-point name -> why it could not be loaded


def discover() -> None:
    """Register every method listed under the `tta.methods` entry-point group -- the built-ins
    and any installed package's -- once.  An entry point names a Method class (registered under
    the entry point's name) or a module whose `@register` decorators run on import.  One that
    fails to load is remembered and reported only when asked for by name."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    from importlib.metadata import entry_points

    found = list(entry_points(group=ENTRY_POINT_GROUP))
    for ep in found:
        try:
            target = ep.load()
        except Exception as e:
            _broken[ep.name] = f"entry point {ep.name} = {ep.value} cannot be loaded ({_one_line(e)})"
            continue
        if isinstance(target, type) and issubclass(target, Method):
            target.name = target.__dict__.get("name") or ep.name   # its own, not a parent method's
            REGISTRY.setdefault(ep.name, target)
    if not any(ep.value.startswith("methods.") for ep in found):
        # Running from a source tree that was never installed: no entry points, so import the
        # built-in package by name (importing it registers every method in it).
        importlib.import_module("methods")


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def _import_file(path: Path) -> ModuleType:
    """Import a Python file as a module of its own (no PYTHONPATH needed); the same file twice is
    the same module, so `--plugin f.py` and `--method f.py:Class` do not register it twice."""
    if not path.is_file():
        raise MethodError(f"{path}: no such plugin file")
    resolved = path.resolve()
    name = f"tta_plugin_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # before running it: dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise MethodError(f"{path}: cannot import ({_one_line(e)})") from None
    return module


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def load_plugin(spec: str) -> ModuleType:
    """Import a plugin -- a file (`path/to/mine.py`) or a module name (`my_package.methods`) --
    so that its `@register("name")` methods run by name and show in `tta methods`."""
    discover()
    if _is_file(spec):
        return _import_file(Path(spec))
    try:
        return importlib.import_module(spec)
    except ImportError as e:
        raise MethodError(f"cannot import plugin {spec} ({_one_line(e)})") from None
    except Exception as e:
        raise MethodError(f"cannot import plugin {spec} ({_one_line(e)})") from None


def load_plugins(specs) -> None:
    for spec in specs or ():
        load_plugin(spec)


def get_method(name: str) -> type[Method]:
    """A method by its registered name, or `module:Class`, or `path/to/file.py:Class`."""
    discover()
    if name in REGISTRY:
        return REGISTRY[name]
    if name in _broken:
        raise MethodError(_broken[name])
    if ":" in name:
        module_name, _, class_name = name.rpartition(":")
        if _is_file(module_name):
            module = _import_file(Path(module_name))
        else:
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                hint = (f"; a file is named by its path, e.g. ./{module_name}.py:{class_name}"
                        if Path(module_name + ".py").exists() else "")
                raise MethodError(f"cannot import method {name} ({_one_line(e)}){hint}") from None
            except Exception as e:
                raise MethodError(f"cannot import method {name} ({_one_line(e)})") from None
        cls = getattr(module, class_name, None)
        if cls is None:
            found = sorted(k for k, v in vars(module).items()
                           if isinstance(v, type) and issubclass(v, Method) and v.__module__ == module.__name__)
            raise MethodError(f"{module_name} has no class {class_name!r} (methods there: {', '.join(found) or 'none'})")
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise MethodError(f"{name} is not a subclass of tta.method.Method")
        cls.name = cls.__dict__.get("name") or class_name   # its own: a subclass of ttt_lora is not ttt_lora
        return cls
    raise MethodError(f"unknown method {name!r} (known: {', '.join(sorted(REGISTRY))}; or module:Class, "
                      "path/to/file.py:Class, or --plugin FILE_OR_MODULE)")


def _kind(field: dataclasses.Field) -> str:
    """The annotation as text: `int`, `list`, `list[int]`, `dict[str, float]`, ..."""
    if isinstance(field.type, str):
        return field.type
    if getattr(field.type, "__origin__", None) is not None:   # list[int], typing.List[int]
        return str(field.type).replace("typing.", "")
    return getattr(field.type, "__name__", str(field.type))


def _element(kind: str, text: str):
    """One item of a comma-separated list setting, typed by `list[int]`-style annotations."""
    inner = kind[kind.find("[") + 1:-1].strip() if "[" in kind else ""
    if inner == "int":
        return int(text)
    if inner == "float":
        return float(text)
    if inner in ("", "Any"):   # untyped: a number or true/false as JSON reads it, else the text
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(text)
    return text


def _optional(kind: str) -> str | None:
    """The X of an `Optional[X]` or `X | None` annotation, else None."""
    if kind.startswith("Optional[") and kind.endswith("]"):
        return kind[len("Optional["):-1]
    parts = [part.strip() for part in kind.split("|")]
    if len(parts) == 2 and "None" in parts:
        return parts[1 - parts.index("None")]
    return None


def _whole_number(name: str, value, given) -> int:
    """`value` as an int if it is a whole number (an int, not a bool, or an integral float)."""
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{name} takes a whole number, not {given!r}")


def _coerce(field: dataclasses.Field, text: str):
    return _coerce_kind(field.name, _kind(field), text)


def _coerce_kind(name: str, kind: str, text: str):
    inner = _optional(kind)
    if inner is not None:   # none/null clears it, as --budget-flops none does
        return None if text.strip().lower() in ("none", "null") else _coerce_kind(name, inner, text)
    if kind == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    if kind == "int":
        with contextlib.suppress(ValueError):
            return int(text)   # exact, however large
        try:
            number = float(text)   # 1e4
        except ValueError:
            number = None
        return _whole_number(name, number, text)
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name} takes a number, not {text!r}") from None
    if kind == "str":
        return text
    if kind in ("Path", "pathlib.Path"):
        return Path(text)
    if kind.split("[")[0] in ("list", "tuple", "List", "Tuple"):
        # JSON (["identity", "rot90"]) or plain comma-separated text (identity,rot90)
        if not text.strip():
            value = []
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = [_element(kind, item.strip()) for item in text.split(",") if item.strip()]
        value = value if isinstance(value, list) else [value]
        return tuple(value) if kind.split("[")[0] in ("tuple", "Tuple") else value
    if kind.split("[")[0] in ("dict", "Dict"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} takes a JSON object such as '{{\"key\": 1}}' ({e.msg} at char {e.pos})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{name} takes a JSON object such as '{{\"key\": 1}}', not {text!r}")
        return value
    try:
        return json.loads(text)  # anything else: JSON
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} ({kind}) takes a JSON value ({e.msg} at char {e.pos})") from None


def _checked(field: dataclasses.Field, value):
    """A value an experiment file gives as TOML (not text), checked against the setting's type: a
    float for a whole-number setting ran as given (k = 2.5)."""
    kind = _kind(field)
    inner = _optional(kind)
    if inner is not None:
        if value is None:
            return None
        kind = inner
    if kind == "int":
        return _whole_number(field.name, value, value)
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    wanted = {"int": int, "float": float, "bool": bool, "str": str}.get(kind)
    if wanted is not None and not isinstance(value, wanted):
        raise ValueError(f"{field.name} takes a {kind}, not {value!r}")
    if kind.split("[")[0] in ("tuple", "Tuple") and isinstance(value, list):
        return tuple(value)
    return value


def make_config(cls: type[Method], overrides: list[str] | dict | None = None):
    """The method's config with `key=value` overrides applied; unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    flag = "" if isinstance(overrides, dict) else "--set "   # a dict: an experiment file's table
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
            raise MethodError(f"{flag}{key}: {cls.name} has no setting {key!r} (settings: {', '.join(fields) or 'none'})")
        try:
            values[key] = _coerce(fields[key], value) if isinstance(value, str) else _checked(fields[key], value)
        except (ValueError, json.JSONDecodeError) as e:
            raise MethodError(f"{flag}{key}={value}: {e}") from None
    try:
        config = cls.Config(**values)
    except ValueError as e:   # a config's own check (e.g. an unknown transform name)
        raise MethodError(f"{cls.name}: {e}") from None
    problem = out_of_range(config) if dataclasses.is_dataclass(config) else None
    if problem:
        raise MethodError(f"{flag}{problem}")
    return config


def describe(cls: type[Method]) -> list[tuple[str, str, object, str]]:
    """(name, type, default, help) for every setting: what `tta methods` prints."""
    rows = []
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kind = _kind(f)
        rows.append((f.name, kind, default, f.metadata.get("help", "")))
    return rows
