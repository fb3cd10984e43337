"""
What a ``User-Agent`` says: SparkPost's ``user_agent_parsed``, before classification.

Parsing is ``ua-parser``'s, with its native resolver (``ua-parser-rs``) where it
is installed and the pure-Python one otherwise. A parse costs tens to hundreds
of microseconds, while the agents that hit a tracker are few and come back
(every Gmail open is the same proxy string), so results are kept in an LRU
keyed by the string: a repeat costs a dictionary lookup.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import ua_parser
from ua_parser import BasicResolver, Parser, load_builtins, load_lazy_builtins

try:
    from ua_parser.regex import Resolver as RegexResolver
except ImportError:  # ua-parser-rs not installed: the basic resolver
    RegexResolver = None

# Distinct user agents kept parsed; each entry is a few hundred bytes.
CACHE_SIZE = 4096
UNKNOWN = "Other"  # ua-parser's family when nothing matched

# Operating systems whose devices are phones or tablets.
_MOBILE_OS = frozenset({"iOS", "iPadOS", "Android", "Windows Phone", "BlackBerry OS", "KaiOS",
                        "Symbian OS", "Firefox OS", "HarmonyOS", "Tizen", "Chrome OS Mobile"})


class Agent(NamedTuple):
    """The parsed parts of a user agent; ``spider`` is ua-parser's verdict of a crawler."""

    agent_family: str
    device_brand: str
    device_family: str
    os_family: str
    os_version: str
    is_mobile: bool
    spider: bool


def make_parser(native: bool = True) -> Parser:
    """ua-parser with its native resolver where installed (and ``native``), else the basic one."""
    if native and RegexResolver is not None:
        return Parser(RegexResolver(load_lazy_builtins()))
    return Parser(BasicResolver(load_builtins()))


_PARSER: Parser | None = None


def resolver_name() -> str:
    """Which ua-parser resolver parses here: "regex" (native) or "basic"."""
    return "regex" if RegexResolver is not None else "basic"


@functools.lru_cache(maxsize=CACHE_SIZE)
def parse_agent(user_agent: str) -> Agent:
    """The ``Agent`` of a ``User-Agent`` value; cached, and never raises."""
    global _PARSER
    if _PARSER is None:
        _PARSER = make_parser()
    return agent_of(_PARSER, user_agent)


def agent_of(parser: Parser, user_agent: str) -> Agent:
    """What ``parser`` makes of ``user_agent``, in SparkPost's terms."""
    result = parser(user_agent, ua_parser.Domain.ALL)
    ua, os, device = result.user_agent, result.os, result.device
    os_family = os.family if os is not None else UNKNOWN
    # SparkPost's os_version is a string: the version's parts joined with dots ("10.15.7").
    os_version = ".".join(p for p in (os.major, os.minor, os.patch) if p) if os is not None else ""
    device_family = device.family if device is not None else UNKNOWN
    is_mobile = os_family in _MOBILE_OS or device_family in ("iPhone", "iPad", "iPod") or \
        " Mobile" in user_agent
    return Agent(
        agent_family=ua.family if ua is not None else UNKNOWN,
        device_brand=(device.brand or "") if device is not None else "",
        device_family=device_family,
        os_family=os_family,
        os_version=os_version,
        is_mobile=is_mobile,
        spider=device_family == "Spider",
    )
