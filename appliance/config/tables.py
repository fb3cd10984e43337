"""
The reader of one TOML table, which collects problems instead of raising.

Every table's reader in this package goes through ``Table``: it names each
problem by its key path, and it knows which keys were asked for, so the rest
are reported as unknown.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from appliance.config.values import Network, describe, parse_duration, parse_networks, parse_size, show


class Table:
    """
    Typed access to one TOML table that records errors instead of raising.

    Each getter marks its key as known; ``finish`` reports the rest as unknown.
    A getter whose value is wrong returns the default so that reading can go
    on and find the next error too.
    """

    def __init__(self, data: object, path: str, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        self.known: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.error("", f"expected a table, got {describe(data)}")
            data = {}
        self.data: dict[str, Any] = data

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> None:
        self.problems.append((self.key(name) if name else self.path, message))

    def has(self, name: str) -> bool:
        return name in self.data

    def _get(self, name: str, default: Any, convert: Callable[[Any], Any]) -> Any:
        self.known.add(name)
        if name not in self.data:
            return default
        try:
            return convert(self.data[name])
        except ValueError as e:
            self.error(name, str(e))
            return default

    def bool(self, name: str, default: bool) -> bool:
        def convert(v: object) -> bool:
            if isinstance(v, bool):
                return v
            raise ValueError(f"expected true or false, got {show(v)}")

        return self._get(name, default, convert)

    def int(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        def convert(v: object) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"expected an integer, got {show(v)}")
            if v < minimum or (maximum is not None and v > maximum):
                bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
                raise ValueError(f"expected an integer {bound}, got {v}")
            return v

        return self._get(name, default, convert)

    def str(self, name: str, default: str, allow_empty: bool = True) -> str:
        def convert(v: object) -> str:
            if not isinstance(v, str):
                raise ValueError(f"expected a string, got {describe(v)} {show(v)}")
            if not allow_empty and not v:
                raise ValueError("must not be empty")
            return v

        return self._get(name, default, convert)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def convert(v: object) -> str:
            if v not in choices:
                raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {show(v)}")
            return v

        return self._get(name, default, convert)

    def size(self, name: str, default: int) -> int:
        return self._get(name, default, parse_size)

    def duration(self, name: str, default: float) -> float:
        return self._get(name, default, parse_duration)

    def path_(self, name: str, default: str) -> str:
        """A filesystem path, made absolute against the start-up directory."""
        value = self.str(name, default, allow_empty=False)
        return os.path.abspath(value) if value else value

    def str_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        def convert(v: object) -> tuple[str, ...]:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"expected an array of strings, got {show(v)}")
            return tuple(v)

        return self._get(name, default, convert)

    def networks(self, name: str, default: tuple[Network, ...]) -> tuple[Network, ...]:
        return self._get(name, default, parse_networks)

    def endpoint(self, name: str, default: str) -> str:
        """A Twisted server endpoint description, checked for syntax only."""

        def convert(v: object) -> str:
            if not isinstance(v, str) or not v:
                example = '"tcp:2525:interface=127.0.0.1"'
                raise ValueError(f"expected an endpoint such as {example}, got {show(v)}")
            kind = v.split(":", 1)[0]
            if kind not in ("tcp", "tcp6", "ssl", "unix", "systemd"):
                raise ValueError(f"unknown endpoint type {kind!r} in {v!r}")
            return v

        return self._get(name, default, convert)

    def table(self, name: str) -> Table:
        self.known.add(name)
        return type(self)(self.data.get(name), self.key(name), self.problems)

    def entry(self, data: object, path: str) -> Table:
        """
        One table of an array of tables (``webhooks[0]``), its problems recorded with ours.

        Like ``table``, it is made with this table's own class: a subclass given to
        the top table (tests/test_shipped_config.py records keys so) reads them all.
        """
        return type(self)(data, path, self.problems)

    def subtables(self, name: str) -> Iterator[tuple[str, Table]]:
        """The named tables under ``name`` (``[name.a]``, ``[name.b]``) in file order."""
        outer = self.table(name)
        for sub in list(outer.data):
            yield sub, outer.table(sub)
        # Every entry of ``outer`` is a subtable by definition: nothing to finish.

    def finish(self) -> None:
        for name in self.data:
            if name not in self.known:
                self.error(name, "unknown key")


def optional_path(t: Table, name: str, default: str) -> str:
    """A path that may be "" (feature off); absolute against the start-up directory."""
    value = t.str(name, default)
    return os.path.abspath(value) if value else ""
