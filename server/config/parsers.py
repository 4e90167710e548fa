"""The parsers of settings (settings.py): each takes a flag's, a variable's or a TOML
value and returns it typed, or raises a `ConfigError` that names the setting."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from retd.server.config.schema import ConfigError

ZERO_PORT = {"port": "picks a free port", "metrics_port": "no metrics endpoint"}


def integer(name: str, minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if maximum is None and number < minimum:
            raise ConfigError(f"{name}: expected an integer >= {minimum}, got {number}")
        if maximum is not None and not minimum <= number <= maximum:
            note = f" (0: {ZERO_PORT[name]})" if name in ZERO_PORT else ""
            raise ConfigError(f"{name}: expected {minimum}..{maximum}{note}, got {number}")
        return number

    return parse


def positive_int(name: str) -> Callable[[Any], int]:
    return integer(name, 1)


def non_negative_int(name: str) -> Callable[[Any], int]:
    return integer(name, 0)


def port(name: str) -> Callable[[Any], int]:
    return integer(name, 0, 65535)


def _number(name: str, ok: Callable[[float], bool], expected: str) -> Callable[[Any], float]:
    """A number for which `ok` holds; `expected` says which, in the error."""

    def parse(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not ok(number):
            raise ConfigError(f"{name}: expected {expected}, got {value!r}")
        return number

    return parse


def non_negative_float(name: str) -> Callable[[Any], float]:
    return _number(name, lambda number: number >= 0, "a number >= 0")


def positive_float(name: str) -> Callable[[Any], float]:
    return _number(name, lambda number: 0 < number < math.inf, "a number > 0")


def number_in(name: str, low: float, high: float, off: float) -> Callable[[Any], float]:
    """A number in [low, high]; `off` is the value that turns the setting off."""
    expected = f"a number in [{low:g}, {high:g}] ({off:g} = off)"
    return _number(name, lambda number: low <= number <= high, expected)


def choice(name: str, choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value)
        if text.upper() in choices:
            return text.upper()
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")

    return parse


def one_of(name: str, choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text in choices:
            return text
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")

    return parse


AUTO, NONE = "auto", "none"  # worker_cpus: the daemon's choice, or unpinned


def parse_cpus(text: str, name: str = "worker_cpus") -> frozenset[int]:
    """A CPU list as taskset and cgroups write it: "3", "0,2", "2-3", "0,2-3"."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ConfigError(
                f"{name}: expected auto, none or a CPU list such as 1, 2-3 or 0,2; got {text!r}"
            )
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ConfigError(f"{name}: the range {part.strip()!r} runs backwards")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def cpu_list(cpus: Iterable[int]) -> str:
    """`parse_cpus`'s inverse, with ranges: {0, 2, 3} -> "0,2-3"."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def cpus_setting(name: str) -> Callable[[Any], str]:
    """auto, none, or a CPU list (in TOML also an integer, one CPU, or an array of them),
    written as `cpu_list` does."""

    def parse(value: Any) -> str:
        items = value if isinstance(value, list | tuple) else [value]
        text = ",".join(str(item) for item in items).strip().lower()
        if text in (AUTO, NONE):
            return text
        return cpu_list(parse_cpus(text, name))

    return parse


def as_given(value: Any) -> Any:
    """Kept as given: the field's dataclass checks it (`SchedulerConfig.batching`)."""
    return value


def on_off(name: str) -> Callable[[Any], bool]:
    def parse(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("on", "true", "1", "yes"):
            return True
        if text in ("off", "false", "0", "no"):
            return False
        raise ConfigError(f"{name}: expected on or off, got {value!r}")

    return parse


def names(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))


def optional_path(value: Any) -> Path | None:
    return Path(value) if value not in (None, "") else None
