"""
Which opens and clicks machines made: every rule in one place.

A machine open or click is still written (SparkPost writes it too); it is
marked, in ``user_agent_parsed``, so counts can leave it out:

- ``is_proxy``: the pixel was fetched by a mailbox provider's image proxy,
  known by its user agent (Gmail's ``GoogleImageProxy``, Yahoo's and AOL's
  ``YahooMailProxy``), or by Apple's Mail Privacy Protection (below). The
  reader may or may not have opened the message: Gmail fetches when it is
  shown, Apple before.
- ``is_prefetched`` on an open: Apple Mail Privacy Protection fetched the
  pixel ahead of any reader. Its fetches come from the iCloud Private Relay
  egress networks (``engagement_tracker.prefetch_networks_file``) and send
  the bare user agent ``Mozilla/5.0``; Apple Mail showing a message to its
  reader sends a full one, so both must hold.
- ``is_prefetched`` on a click: a security scanner followed the link. It is
  known by its user agent (the scanners' own names, and what ua-parser
  calls a spider), by a ``HEAD`` for the same link from the same address
  shortly before (scanners check before they fetch; mail clients and
  browsers do not), by a hit within ``click_prefetch_seconds`` of the copy
  being sent (no reader is that quick; a gateway scanning on arrival is),
  or by a hit on the hidden trap link, which no reader can see.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import NamedTuple

from appliance.engagement.agents import CACHE_SIZE, parse_agent
from appliance.engagement.networks import Networks

# What Mail Privacy Protection's prefetches send, and nothing more.
PREFETCH_AGENT = "Mozilla/5.0"

# Image proxies, by a token of their user agent.
IMAGE_PROXY_TOKENS = (
    "GoogleImageProxy",  # Gmail: "... Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
    "YahooMailProxy",  # Yahoo Mail and AOL: "YahooMailProxy; https://help.yahoo.com/kb/..."
)

# Link scanners and previewers, by a token of their user agent (compared in lower case).
SCANNER_TOKENS = (
    "bingpreview",  # Outlook.com and Microsoft 365 link previews
    "existence discovery",  # Microsoft Office checking that a link exists
    "ms-office",  # Office applications fetching a link themselves, not the browser
    "proofpoint",
    "barracuda",
    "mimecast",
    "headlesschrome",  # sandboxes rendering the target
    "phantomjs",
    "python-requests",
    "go-http-client",
    "curl/",
    "wget/",
)

# How long a HEAD makes the next GET of the same link from the same address a scanner's.
HEAD_WINDOW = 60.0
# How many recent HEADs are remembered; the oldest are forgotten first.
HEAD_MEMORY = 10_000


class Verdict(NamedTuple):
    is_proxy: bool
    is_prefetched: bool


@functools.lru_cache(maxsize=CACHE_SIZE)
def _machine(user_agent: str) -> tuple[bool, bool]:
    """(an image proxy, a link scanner) by the user agent; cached, as the agents come back."""
    lowered = user_agent.lower()
    return (any(token in user_agent for token in IMAGE_PROXY_TOKENS),
            parse_agent(user_agent).spider or any(token in lowered for token in SCANNER_TOKENS))


def is_image_proxy(user_agent: str) -> bool:
    return _machine(user_agent)[0]


def is_scanner(user_agent: str) -> bool:
    """A link scanner by its user agent: one that names itself, or that ua-parser calls a spider."""
    return _machine(user_agent)[1]


def classify_open(user_agent: str, ip_address: str, prefetch_networks: Networks) -> Verdict:
    """Who fetched a pixel: an image proxy, Apple's prefetch, or (neither) a reader's client."""
    prefetched = user_agent.strip() == PREFETCH_AGENT and ip_address in prefetch_networks
    return Verdict(prefetched or is_image_proxy(user_agent), prefetched)


def classify_click(user_agent: str, *, after_head: bool = False, issued: int = 0, now: float = 0.0,
                   prefetch_seconds: float = 0.0, trap: bool = False) -> Verdict:
    """
    Whether a click was a machine's: ``after_head`` that the same address sent a
    ``HEAD`` for the link just before; ``issued`` when the copy was sent (0:
    unknown, a link from before tokens carried it); ``now`` the hit's time.
    """
    proxy, scanner = _machine(user_agent)
    prefetched = (trap or after_head or scanner
                  or (prefetch_seconds > 0 and issued > 0 and now - issued < prefetch_seconds))
    return Verdict(proxy, prefetched)


class RecentHeads:
    """
    The ``HEAD`` requests of the last ``HEAD_WINDOW`` seconds, by address and link.

    Bounded: past ``HEAD_MEMORY`` entries the oldest is forgotten, so a flood
    of ``HEAD`` requests costs memory once and only blurs the rule.
    """

    def __init__(self, window: float = HEAD_WINDOW, limit: int = HEAD_MEMORY) -> None:
        self.window = window
        self.limit = limit
        self._seen: OrderedDict[int, float] = OrderedDict()

    def note(self, ip_address: str, token: bytes, now: float) -> None:
        key = hash((ip_address, token))
        seen = self._seen
        seen[key] = now
        seen.move_to_end(key)
        while len(seen) > self.limit:
            seen.popitem(last=False)

    def after_head(self, ip_address: str, token: bytes, now: float) -> bool:
        """Whether a ``HEAD`` for ``token`` came from ``ip_address`` in the last ``window`` seconds."""
        if not self._seen:
            return False
        at = self._seen.get(hash((ip_address, token)))
        return at is not None and 0 <= now - at <= self.window
