"""Validation of notebook parameters.

Notebooks call :func:`validate` right after their papermill ``parameters`` cell::

    validate(globals(), N_REQUESTS=Int(1, 100_000), POLICY=Choice("fcfs", "sjf"), INTERACTIVE=Bool())

A bad value (wrong type, out of range, unknown choice) raises one :class:`ParameterError` that
names the parameter, the value it got and what is allowed, so a papermill run fails with a
message a user can act on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ParameterError", "Spec", "Int", "Float", "Bool", "Str", "Choice", "ListOf", "validate"]


class ParameterError(ValueError):
    """A notebook parameter has a value the notebook cannot run with."""


class Spec:
    """What a parameter may be. ``check`` returns an error string, or None when the value is fine."""

    def check(self, value: Any) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Int(Spec):
    lo: int | None = None
    hi: int | None = None

    def check(self, value):
        if not _is_int(value):
            return f"expected an integer {self._range()}".rstrip()
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            return f"expected an integer {self._range()}"
        return None

    def _range(self) -> str:
        if self.lo is None and self.hi is None:
            return ""
        if self.hi is None:
            return f">= {self.lo}"
        if self.lo is None:
            return f"<= {self.hi}"
        return f"in [{self.lo}, {self.hi}]"

    def describe(self):
        return f"integer {self._range()}".strip()


@dataclass(frozen=True)
class Float(Spec):
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"expected a finite number {self._range()}".rstrip()
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return f"expected a number {self._range()}"
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return f"expected a number {self._range()}"
        return None

    def _range(self) -> str:
        if self.lo is None and self.hi is None:
            return ""
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"in {left}{lo}, {hi}{right}"

    def describe(self):
        return f"number {self._range()}".strip()


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value):
        return None if isinstance(value, bool) else "expected True or False"

    def describe(self):
        return "True or False"


@dataclass(frozen=True)
class Str(Spec):
    nonempty: bool = True

    def check(self, value):
        if not isinstance(value, str):
            return "expected a string"
        if self.nonempty and not value:
            return "expected a non-empty string"
        return None

    def describe(self):
        return "string"


class Choice(Spec):
    def __init__(self, *options: Any):
        if not options:
            raise ValueError("Choice needs at least one option")
        self.options = tuple(options)

    def check(self, value):
        for o in self.options:
            if type(value) is type(o) and value == o:
                return None
        return f"expected one of {', '.join(map(repr, self.options))}"

    def describe(self):
        return "one of " + ", ".join(map(repr, self.options))


class ListOf(Spec):
    def __init__(self, item: Spec, *, min_len: int = 0, max_len: int | None = None):
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def check(self, value):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return f"expected a list of {self.item.describe()}"
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            hi = "" if self.max_len is None else f" and at most {self.max_len}"
            return f"expected a list of at least {self.min_len}{hi} items"
        for i, v in enumerate(value):
            err = self.item.check(v)
            if err:
                return f"item {i} = {v!r}: {err}"
        return None

    def describe(self):
        return f"list of {self.item.describe()}"


def validate(namespace: Mapping[str, Any], /, **specs: Spec) -> None:
    """Check notebook parameters held in ``namespace`` (a notebook passes ``globals()``).

    Raises :class:`ParameterError` naming the first parameter that is missing or bad, with the
    value it got and what is allowed. Unknown spec types are a programming error (TypeError).
    """
    for name, spec in specs.items():
        if not isinstance(spec, Spec):
            raise TypeError(f"validate: spec for {name!r} must be a Spec, got {type(spec).__name__}")
        if name not in namespace:
            raise ParameterError(f"parameter {name!r} is not defined (allowed: {spec.describe()})")
        value = namespace[name]
        err = spec.check(value)
        if err:
            raise ParameterError(f"parameter {name!r} = {value!r}: {err}")
