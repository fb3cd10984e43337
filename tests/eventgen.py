"""Made-up event log lines of every type the statistics count, reproducible from a seed."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

START = 1_780_000_000  # 2026-05-28T20:26:40Z
BOUNCE_CLASSES = (1, 10, 20, 21, 22, 23, 24, 25, 30, 40, 50, 51, 52, 53, 54, 60, 70, 90, 100)
LINKS = (("shop", "https://shop.example.com/", "Shop now"), ("", "https://example.com/about", ""),
         ("news", "https://example.com/news", "Read the news"))


def events(count: int, seed: int = 1, campaigns: int = 5, start: int = START,
           span: int = 3 * 86400) -> Iterator[dict[str, Any]]:
    """``count`` events in time order over ``span`` seconds, each copy's life roughly in order."""
    rng = random.Random(seed)
    copies = max(1, count // 4)
    step = span / count
    for i in range(count):
        copy = rng.randrange(copies)
        event: dict[str, Any] = {
            "type": rng.choice(("injection", "injection", "delivery", "delivery", "delay", "bounce",
                                "policy_rejection", "open", "open", "initial_open", "click",
                                "link_unsubscribe")),
            "event_id": str(i), "timestamp": str(start + int(i * step)),
            "message_id": f"m{copy}", "transmission_id": f"t{copy // 3}",
            "campaign_id": "" if copy % 7 == 0 else f"campaign-{copy % campaigns}",
            "rcpt_to": f"user{copy}@example.com",
        }
        if event["type"] == "delivery":
            event["num_retries"] = rng.choice(("0", "0", "1", "3"))
        if event["type"] in ("bounce", "policy_rejection", "delay"):
            event["bounce_class"] = str(rng.choice(BOUNCE_CLASSES))
        if event["type"] in ("open", "initial_open", "click"):
            if rng.random() < 0.5:
                event["user_agent_parsed"] = {"is_prefetched": rng.random() < 0.3}
        if event["type"] in ("click", "link_unsubscribe"):
            name, url, anchor = rng.choice(LINKS)
            event.update(target_link_name=name, target_link_url=url)
            if anchor:
                event["target_link_anchor"] = anchor
        yield event


def lines(count: int, **kwargs: Any) -> list[bytes]:
    return [json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in events(count, **kwargs)]
