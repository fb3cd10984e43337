"""
The networks machine opens come from, read from an RFC 8805 geofeed.

Apple publishes the egress ranges of iCloud Private Relay, which Mail Privacy
Protection fetches remote content through, as an RFC 8805 CSV
(``prefix,country,region,city,postal``). Only the prefix matters here. The
ranges are kept per address family as sorted, merged ``(start, end)`` integer
intervals, so a lookup is one bisection whatever the size of the list
(Apple's has hundreds of thousands of lines).
"""

from __future__ import annotations

import bisect
import socket
from dataclasses import dataclass, field


class NetworksFileError(ValueError):
    """The file cannot be read, or a line of it is not an RFC 8805 entry."""


@dataclass(frozen=True)
class _Ranges:
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    def contains(self, ip: int) -> bool:
        i = bisect.bisect_right(self.starts, ip) - 1
        return i >= 0 and ip <= self.ends[i]


def _merged(intervals: list[tuple[int, int]]) -> _Ranges:
    intervals.sort()
    ranges = _Ranges()
    for start, end in intervals:
        if ranges.ends and start <= ranges.ends[-1] + 1:
            if end > ranges.ends[-1]:
                ranges.ends[-1] = end
        else:
            ranges.starts.append(start)
            ranges.ends.append(end)
    return ranges


@dataclass(frozen=True)
class Networks:
    """Sets of IPv4 and IPv6 networks; ``count`` is how many prefixes were read."""

    v4: _Ranges = field(default_factory=_Ranges)
    v6: _Ranges = field(default_factory=_Ranges)
    count: int = 0

    def __contains__(self, address: str) -> bool:
        """Whether the address (text, as events write it) is in one of the networks."""
        if not self.count:
            return False
        try:
            if ":" not in address:
                return self.v4.contains(int.from_bytes(socket.inet_pton(socket.AF_INET, address)))
            packed = socket.inet_pton(socket.AF_INET6, address)
        except OSError:
            return False
        if packed[:12] == _V4_MAPPED:
            return self.v4.contains(int.from_bytes(packed[12:]))
        return self.v6.contains(int.from_bytes(packed))


_V4_MAPPED = bytes(10) + b"\xff\xff"


EMPTY = Networks()


def parse_networks(text: str, source: str = "networks file") -> Networks:
    """
    The networks of an RFC 8805 feed: one ``prefix[,country,region,city,postal]`` a line.

    ``#`` starts a comment, blank lines are skipped; anything else that is not
    a prefix is an error naming the line, so a truncated or wrong download is
    noticed instead of silently matching nothing.
    """
    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    for number, line in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        prefix = line.split("#", 1)[0].split(",", 1)[0].strip()
        if not prefix:
            continue
        interval = _interval(prefix)
        if interval is None:
            raise NetworksFileError(f"{source}, line {number}: expected an IP prefix like "
                                    f"172.224.224.0/27 first, got {prefix[:60]!r}")
        (v6 if ":" in prefix else v4).append(interval)
    return Networks(_merged(v4), _merged(v6), len(v4) + len(v6))


def _interval(prefix: str) -> tuple[int, int] | None:
    """The first and last address of ``address/length`` (host bits ignored); ``None`` if malformed."""
    address, slash, length_text = prefix.partition("/")
    family, bits = (socket.AF_INET6, 128) if ":" in address else (socket.AF_INET, 32)
    try:
        start = int.from_bytes(socket.inet_pton(family, address))
    except OSError:
        return None
    if not slash:
        return start, start
    if not (length_text.isdigit() and len(length_text) <= 3 and int(length_text) <= bits):
        return None
    host = (1 << (bits - int(length_text))) - 1
    start &= ~host
    return start, start | host


def read_networks(path: str) -> Networks:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise NetworksFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NetworksFileError(f"{path}: cannot read it: {e}") from None
    return parse_networks(text, path)
