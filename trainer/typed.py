"""Turn plain YAML data into typed dataclasses, collecting every problem instead of stopping at the first.

The recipe loader (config.py) uses this; nothing here knows about training. A field's metadata may carry
``doc`` (one line, shown in errors and `validate`), ``min``/``max`` (inclusive bounds) and ``gt`` (exclusive
lower bound).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

MISSING_SOURCE = "default"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where, what was given, and what to do."""

    key: str
    value: Any
    message: str
    source: str = ""

    def render(self) -> str:
        where = f" ({self.source})" if self.source else ""
        shown = _show(self.value)
        return f"{self.key} = {shown}{where}: {self.message}"


def _show(value: Any) -> str:
    text = "null" if value is None else repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def field_doc(cls: type, name: str) -> str:
    """The one-line doc of a dataclass field (empty if none)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("doc", ""))
    return ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(arg)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a section (mapping)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def did_you_mean(name: str, choices: list[str], prefix: str = "") -> str:
    """A did-you-mean hint for a typo, or the list of valid names when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    return f"valid keys here: {', '.join(sorted(choices))}"


class Converter:
    """Builds a dataclass tree from nested dicts and records problems with their dotted keys."""

    def __init__(self, sources: dict[str, str] | None = None) -> None:
        self.problems: list[Problem] = []
        self.sources = sources or {}

    def source(self, key: str) -> str:
        """Where a key's value came from: the command line (an override at or below it), or the recipe."""
        for given, where in self.sources.items():
            if given == key or given.startswith(key + ".") or key.startswith(given + "."):
                return where
        return "recipe"

    def add(self, key: str, value: Any, message: str) -> None:
        self.problems.append(Problem(key, value, message, self.source(key)))

    def build(self, cls: type, data: Any, prefix: str) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.add(prefix, data, f"must be a section (a mapping of keys), not {type(data).__name__}")
            data = {}
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if key not in names:
                self.add(dotted, value, f"unknown key; {did_you_mean(str(key), names, prefix + '.' if prefix else '')}")
                continue
            f = next(f for f in dataclasses.fields(cls) if f.name == key)
            ok, converted = self.convert(hints[key], value, dotted)
            if ok and self._in_range(f, converted, dotted):
                kwargs[key] = converted  # a bad value falls back to the default, so later checks stay quiet
        return cls(**kwargs)

    def _in_range(self, f: dataclasses.Field, value: Any, dotted: str) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return True
        lo, hi, gt = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("gt")
        before = len(self.problems)
        if lo is not None and value < lo:
            self.add(dotted, value, f"must be >= {lo}")
        if hi is not None and value > hi:
            self.add(dotted, value, f"must be <= {hi}")
        if gt is not None and value <= gt:
            self.add(dotted, value, f"must be > {gt}")
        return len(self.problems) == before

    def convert(self, tp: Any, value: Any, key: str) -> tuple[bool, Any]:
        """Returns (ok, value); on failure a problem has been recorded."""
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            return True, self.build(tp, value, key)
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return True, None
            for arg in (a for a in args if a is not type(None)):
                trial = Converter(self.sources)
                ok, out = trial.convert(arg, value, key)
                if ok and not trial.problems:
                    return True, out
            return self._fail(key, value, tp)
        if origin is Literal:
            choices = typing.get_args(tp)
            if value in choices and type(value) is type(choices[choices.index(value)]):
                return True, value
            hint = did_you_mean(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
            msg = f"must be one of: {', '.join(str(c) for c in choices)}"
            self.add(key, value, f"{msg}; {hint}" if hint.startswith("did") else msg)
            return False, None
        if origin is list:
            (arg,) = typing.get_args(tp) or (Any,)
            if not isinstance(value, list):
                return self._fail(key, value, tp)
            out = []
            for i, item in enumerate(value):
                ok, conv = self.convert(arg, item, f"{key}[{i}]")
                if not ok:
                    return False, None
                out.append(conv)
            return True, out
        if origin is dict:
            return (True, dict(value)) if isinstance(value, dict) else self._fail(key, value, tp)
        return self._scalar(tp, value, key)

    def _scalar(self, tp: Any, value: Any, key: str) -> tuple[bool, Any]:
        if tp is Any:
            return True, value
        if tp is bool:
            return (True, value) if isinstance(value, bool) else self._fail(key, value, tp)
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True, value
            if isinstance(value, float) and value.is_integer():
                return True, int(value)
            return self._fail(key, value, tp)
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True, float(value)
            if isinstance(value, str):  # YAML reads 3e-4 as a string (YAML 1.1): accept it
                try:
                    return True, float(value)
                except ValueError:
                    pass
            return self._fail(key, value, tp)
        if tp is str:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return True, str(value)
            return self._fail(key, value, tp)
        raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in the schema, not user input

    def _fail(self, key: str, value: Any, tp: Any) -> tuple[bool, Any]:
        self.add(key, value, f"must be {_type_name(tp)}, got {type(value).__name__}")
        return False, None


def to_dict(obj: Any) -> Any:
    """A dataclass tree back to plain data (for writing the resolved recipe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
