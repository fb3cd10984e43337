"""
SparkPost's classification of a failure reply: ``bounce_class`` and the canonical ``reason``.

Pure functions of the reply, shared by injection (``policy_rejection``) and
delivery (``delay``, ``bounce``), so neither has to import the other.
"""

from __future__ import annotations

import functools
import re

MAX_REASON = 1024  # characters of ``reason``; ``raw_reason`` is kept whole

_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")


# Copies that fail together (a destination down) share one reply: it is read once.
@functools.lru_cache(maxsize=256)
def canonical_reason(raw: str) -> str:
    """
    ``reason``: the raw reply on one line, its IPv4 addresses written ``a.b.c.d``, capped in length.

    SparkPost keeps the reply as sent in ``raw_reason`` and a canonical form in
    ``reason``, which groups alike failures in reports: sending IPs quoted in
    blocklist replies would make every line different.
    """
    text = " ".join(raw.split())
    text = "".join(c for c in text if c.isprintable())
    if "[internal]" not in text:  # our own reasons name the MX, which helps more than it splits
        text = _IPV4.sub("a.b.c.d", text)
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 3] + "..."
    return text


_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")

# SparkPost's bounce classes by enhanced status code (RFC 3463), most specific first.
# A pattern ending in "." matches every code under it; any other matches one code exactly.
BOUNCE_CLASSES: tuple[tuple[str, str, str], ...] = (
    ("5.1.", "10", "Invalid Recipient"),  # bad mailbox, bad domain, null MX (5.1.10)
    ("5.2.1", "10", "Invalid Recipient"),  # mailbox disabled
    ("5.2.2", "22", "Mailbox Full"),
    ("5.2.3", "23", "Too Large"),
    ("5.3.4", "23", "Too Large"),
    ("5.4.4", "21", "DNS Failure"),  # unable to route: no address for the domain
    ("5.4.7", "24", "Timeout"),  # delivery time expired: the queue lifetime is over
    ("5.7.", "50", "Mail Block"),  # security or policy: refused by the receiver
    ("5.", "40", "Generic Bounce"),  # any other permanent failure
    ("4.2.2", "22", "Mailbox Full"),
    ("4.4.3", "21", "DNS Failure"),  # the DNS did not answer
    ("4.", "70", "Transient Failure"),  # any other temporary failure: a delay
)


@functools.lru_cache(maxsize=256)
def bounce_class(code: int, reason: str) -> str:
    """
    SparkPost's ``bounce_class`` from the enhanced status code in ``reason``.

    Without an enhanced code the basic reply code decides (5xx: 40, 4xx: 70);
    with neither, the class is 1, Undetermined.
    """
    m = _ENHANCED.search(reason)
    if m:
        status = ".".join(m.groups())
    elif 400 <= code < 600:
        status = f"{code // 100}."
    else:
        return "1"
    for prefix, klass, _name in BOUNCE_CLASSES:
        if status == prefix or (prefix.endswith(".") and status.startswith(prefix)):
            return klass
    return "1"
