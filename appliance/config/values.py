"""
The value syntax of the configuration file: sizes, durations, networks, host:port.

Apart from the tables, so that the X-MSYS-API settings read a value the way the
file does and fail with the same words.
"""

from __future__ import annotations

import ipaddress
import json
import re

_SIZE_RE = re.compile(r"(\d+)\s*([kKmMgG]?)[bB]?")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DURATION_RE = re.compile(r"(\d+)\s*(ms|s|m|h|d|w)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(value: object) -> int:
    """``25M``-style sizes (binary multiples) or a plain count of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 25M, got {show(value)}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    raise ValueError(f"expected a size such as 25M, got {show(value)}")


def parse_duration(value: object) -> float:
    """``30s``/``5m``/``4h``/``5d``-style durations, or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected seconds, got {show(value)}")
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m:
            return int(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    raise ValueError(f"expected seconds, got {show(value)}")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: object) -> tuple[Network, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"expected an array of networks such as \"127.0.0.0/8\", got {show(value)}")
    try:
        return tuple(ipaddress.ip_network(x, strict=False) for x in value)
    except ValueError as e:
        raise ValueError(f"not a network: {e}") from None


def show(value: object) -> str:
    """A value as TOML would write it, so error messages quote the way the file does."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float | list | dict):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
    return repr(value)


def describe(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def host_port(value: str, default_port: int = 25) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``; raises ValueError with a readable message."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", value)
    if not m:
        raise ValueError(f"expected host or host:port, got {show(value)}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4) or default_port)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


_HOST_PORT_RE = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


def is_host_port(value: str) -> bool:
    """A ``host[:port]`` fit to be put into a tracked link."""
    return bool(_HOST_PORT_RE.fullmatch(value))


def tcp_listen_address(endpoint: str) -> tuple[str, int, int] | None:
    """
    ``(interface, port, backlog)`` of a ``tcp:`` or ``tcp6:`` server endpoint, else ``None``.

    What the tracker needs to open one socket per process on the same address
    (``tracker.processes``); ``\\:`` in the interface is a colon, as Twisted reads it.
    An endpoint without ``interface`` listens on every IPv4 address (``tcp6``: IPv6).
    """
    parts = [p.replace("\0", ":") for p in endpoint.replace("\\:", "\0").split(":")]
    kind, args = parts[0], parts[1:]
    if kind not in ("tcp", "tcp6"):
        return None
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    port_text = named.pop("port", positional[0] if positional else "")
    if len(positional) > (0 if "port" in named else 1) or set(named) - {"interface", "backlog"}:
        return None
    interface = named.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
    try:
        port, backlog = int(port_text), int(named.get("backlog", "50"))
        ipaddress.ip_address(interface)
    except ValueError:
        return None
    if not 0 <= port < 65536 or backlog < 1:
        return None
    return interface, port, backlog
