"""Settings declared as class annotations with their checks: `name: Annotated[T, Check(convert)] = default`.

A small frozen record rather than a validation library: the deploy imports its settings on every run, and a
library's import and schema building cost about 0.1 s of CPU each time (docs/performance.md). tasks/config.py
declares the deploy's settings with it; each check converts a value as written or raises ValueError saying what
is expected, and every problem of a set of settings is raised at once, each at its place (`models[1].revision`).
"""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from typing import Any, Callable, ClassVar, Iterable, NamedTuple, get_type_hints


class Check:
    """`Annotated[T, Check(convert)]`: CONVERT takes a setting's value as written and returns it as a T, or raises
    ValueError saying what is expected (SettingsError: the problems of an entry's own settings)."""

    __slots__ = ("convert",)

    def __init__(self, convert: Callable[[Any], Any]):
        self.convert = convert


KEY = "[key]"  # the last part of a problem's place when the problem is a mapping's key itself


class Problem(NamedTuple):
    place: tuple  # where the value is: ("models", 1, "revision"); a mapping's key ends with KEY
    kind: str  # "invalid", "missing" or "unknown"
    expected: str = ""  # for "invalid": what a valid value is
    known: tuple[str, ...] = ()  # for "unknown": the settings known there

    def below(self, *place: Any) -> Problem:
        return self._replace(place=(*place, *self.place))


class SettingsError(ValueError):
    """Every problem of one set of settings, found at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, problem.place))}: {problem.expected or problem.kind}"
                                   for problem in problems))


MISSING = object()  # a setting not given, without a default


def _checked(items: Iterable[tuple[tuple, Any, Callable[[Any], Any]]]) -> list:
    """Each (place, value, convert) converted, in order; SettingsError with every problem, each at its place."""
    results, problems = [], []
    for place, value, convert in items:
        if value is MISSING:
            problems.append(Problem(place, "missing"))
            continue
        try:
            results.append(convert(value))
        except SettingsError as error:
            problems += [problem.below(*place) for problem in error.problems]
        except ValueError as error:
            problems.append(Problem(place, "invalid", str(error)))
    if problems:
        raise SettingsError(problems)
    return results


class Settings:
    """Settings declared as class annotations, `name: Annotated[T, Check(convert)] = default` (no default: the
    setting is required), made from keyword data: every value, defaults included, goes through its check, and
    every problem is raised at once (SettingsError). Frozen, compared and hashed by value."""

    _checks: ClassVar[dict[str, Callable[[Any], Any]]]
    _defaults: ClassVar[dict[str, Any]]

    def __init_subclass__(cls) -> None:
        hints = {name: hint for name, hint in get_type_hints(cls, include_extras=True).items()
                 if not name.startswith("_")}
        checks = {name: [item.convert for item in getattr(hint, "__metadata__", ()) if isinstance(item, Check)]
                  for name, hint in hints.items()}
        unchecked = [name for name, found in checks.items() if len(found) != 1]
        if unchecked:
            raise TypeError(f"{cls.__name__}: each setting needs one Check: {', '.join(unchecked)}")
        cls._checks = {name: found[0] for name, found in checks.items()}
        cls._defaults = {name: vars(cls)[name] for name in cls._checks if name in vars(cls)}

    def __init__(self, **data: Any):
        values = {name: data.get(name, self._defaults.get(name, MISSING)) for name in self._checks}
        unknown = [Problem((name,), "unknown", known=tuple(self._checks)) for name in data if name not in self._checks]
        try:
            converted = _checked(((name,), value, self._checks[name]) for name, value in values.items())
        except SettingsError as error:
            raise SettingsError(error.problems + unknown) from None
        if unknown:
            raise SettingsError(unknown)
        for name, value in zip(values, converted, strict=True):
            object.__setattr__(self, name, value)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each optional setting's default, as written."""
        return dict(cls._defaults)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(cls._checks)

    def dump(self) -> dict[str, Any]:
        """The settings as plain data (entries' own settings as mappings)."""
        return {name: _plain(value) for name, value in vars(self).items()}

    def dump_json(self) -> str:
        """`dump()` as compact JSON, text as it is: what a release records a host's settings by."""
        return json.dumps(self.dump(), separators=(",", ":"), ensure_ascii=False)

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to {name}: settings are frozen")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete {name}: settings are frozen")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), *vars(self).values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{name}={value!r}' for name, value in vars(self).items())})"


def _plain(value: Any) -> Any:
    if isinstance(value, Settings):
        return value.dump()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def written(value: Any) -> Any:
    """A default as one writes it (a mode's text), which its setting's check turns into the setting's type:
    what DEFAULTS hands pyinfra and the settings table shows."""
    return value




def items(convert: Callable[[Any], Any], expected: str) -> Callable[[Any], list]:
    """A check of lists whose every item CONVERT checks, each problem at its item's index; EXPECTED: what the
    whole is when it is not a list."""

    def check(value: Any) -> list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(expected)
        return _checked(((index,), item, convert) for index, item in enumerate(value))

    return check


def mapping(key: Callable[[Any], Any], value: Callable[[Any], Any], expected: str) -> Callable[[Any], dict]:
    """A check of mappings whose keys KEY checks and whose values VALUE does, each problem at its key (or at the
    key itself); EXPECTED: what the whole is when it is not a mapping."""

    def check(given: Any) -> dict:
        if not isinstance(given, dict):
            raise ValueError(expected)
        checked = _checked([*(((name, KEY), name, key) for name in given),
                            *(((name,), item, value) for name, item in given.items())])
        return dict(zip(checked[:len(given)], checked[len(given):], strict=True))

    return check


def entry(spec: type[Settings]) -> Callable[[Any], Settings]:
    """A check of one entry of SPEC's settings (a mapping, or an entry already made)."""

    def check(value: Any) -> Settings:
        if isinstance(value, spec):
            return value
        if not isinstance(value, dict) or not all(isinstance(name, str) for name in value):
            raise ValueError(f"expected a mapping of {', '.join(spec.names())}")
        return spec(**value)

    return check


def text(expected: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(expected)
        return value

    return check
