"""Explicit, idempotent pass registry and option introspection.

Registering the same class twice is a no-op; a different class under a taken name raises. Options
are read from the typed keyword-only ``__init__`` parameters, so the CLI can convert ``k=v`` strings
and ``onnxslim-kit passes`` can list every option with its type and default.
"""

from __future__ import annotations

import importlib
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from .errors import InputError

_REGISTRY: dict[str, type] = {}

# Modules under passes/ that register built-in passes when imported.
BUILTIN_PASS_MODULES = ("passes.cleanup", "passes.simplify", "passes.quantize", "passes.equalize",
                        "passes.lowrank", "passes.prune")


def register_pass(cls: type) -> type:
    """Class decorator: ``@register_pass class Cleanup(Pass): name = "cleanup"``."""
    name = getattr(cls, "name", None)
    if not name or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ValueError(f"pass {cls.__qualname__} needs a kebab-case 'name', got {name!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        if (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"pass name '{name}' is already registered by {existing.__module__}."
                             f"{existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


_builtins_loaded = False


def load_builtin_passes() -> None:
    """Import the built-in pass modules (once: the cleanup pipeline looks up its steps every round)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    for module in BUILTIN_PASS_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    _builtins_loaded = True


def available_passes() -> dict[str, type]:
    load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type:
    load_builtin_passes()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise InputError(f"unknown pass '{name}' (available: {', '.join(available_passes()) or 'none'})")
    return cls


@dataclass(frozen=True)
class PassOption:
    name: str
    annotation: Any
    default: Any
    help: str = ""

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)

    def convert(self, text: str, pass_name: str) -> Any:
        try:
            return convert_value(text, self.annotation)
        except ValueError as exc:
            raise InputError(f"pass '{pass_name}': option {self.name}={text!r}: {exc}") from None


def pass_options(cls: type) -> list[PassOption]:
    """Keyword-only ``__init__`` parameters with their resolved annotations and help text.

    Help comes from the class docstring's ``Options:`` block, lines ``name: text``. Computed once per
    class (resolving the annotations was ~2 ms a call, several calls a run).
    """
    return list(_pass_options(cls))


@functools.lru_cache(maxsize=None)
def _pass_options(cls: type) -> tuple[PassOption, ...]:
    init = cls.__init__
    if init is object.__init__:
        return ()
    hints = typing.get_type_hints(init, globalns=vars(inspect.getmodule(cls)))
    helps = _option_help(cls.__doc__ or "")
    out = []
    for param in inspect.signature(init).parameters.values():
        if param.name == "self" or param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"{cls.__qualname__}: option '{param.name}' must be keyword-only")
        if param.default is inspect.Parameter.empty:
            raise TypeError(f"{cls.__qualname__}: option '{param.name}' needs a default")
        out.append(PassOption(param.name, hints.get(param.name, str), param.default,
                              helps.get(param.name, "")))
    return tuple(out)


def _option_help(doc: str) -> dict[str, str]:
    helps: dict[str, str] = {}
    in_block = False
    current = None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.lower().rstrip(":") == "options":
            in_block = True
            continue
        if not in_block:
            continue
        m = re.match(r"^([a-z_][a-z0-9_]*)\s*:\s*(.*)$", stripped)
        if m:
            current = m.group(1)
            helps[current] = m.group(2)
        elif stripped and current:
            helps[current] += " " + stripped
        elif not stripped and helps:
            current = None
    return helps


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _type_name(annotation: Any) -> str:
    inner, optional = _strip_optional(annotation)
    origin = get_origin(inner)
    if origin is Literal:
        name = "|".join(str(a) for a in get_args(inner))
    elif origin in (list, tuple):
        args = get_args(inner)
        name = f"list[{_type_name(args[0]) if args else 'str'}]"
    else:
        name = getattr(inner, "__name__", str(inner))
    return name + ("?" if optional else "")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def convert_value(value: Any, annotation: Any) -> Any:
    """Convert a CLI string (or a TOML value) to ``annotation``; raise ValueError with a reason."""
    inner, optional = _strip_optional(annotation)
    if isinstance(value, str) and optional and value.lower() in ("none", "null", ""):
        return None
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        if isinstance(value, bool):  # a TOML true/false for a choice that spells them "true"/"false"
            value = str(value).lower()
        for choice in choices:
            if str(choice) == str(value):
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        args = get_args(inner)
        item_type = args[0] if args else str
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split("+") if v]
        converted = [convert_value(v, item_type) for v in items]
        return tuple(converted) if origin is tuple else converted
    if inner is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("expected true or false")
    if inner is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError("expected an integer") from None
    if inner is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a number") from None
    if inner is str:
        return str(value)
    return value
