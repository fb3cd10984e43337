"""
Who opened and clicked: the fields the tracker adds to ``open`` and ``click`` events.

``user_agent_parsed`` (SparkPost's fields: the parsed agent, and whether a
proxy or a prefetch made the hit; ``classify`` holds the rules) and, with a
MaxMind database, ``geo_ip``. ``agents`` parses and caches user agents,
``networks`` reads the prefetch networks, ``geo`` the database. Pure: the
tracker passes times and addresses in.
"""

from __future__ import annotations

from typing import Any

from appliance.engagement.agents import parse_agent
from appliance.engagement.classify import RecentHeads, Verdict, classify_click, classify_open
from appliance.engagement.geo import GeoIP
from appliance.engagement.networks import EMPTY, Networks

__all__ = ["Engagement", "user_agent_parsed"]


def user_agent_parsed(user_agent: str, verdict: Verdict) -> dict[str, Any]:
    """SparkPost's ``user_agent_parsed``, in its order and with its value types."""
    agent = parse_agent(user_agent)
    return {
        "agent_family": agent.agent_family,
        "device_brand": agent.device_brand,
        "device_family": agent.device_family,
        "os_family": agent.os_family,
        "os_version": agent.os_version,
        "is_mobile": agent.is_mobile,
        "is_proxy": verdict.is_proxy,
        "is_prefetched": verdict.is_prefetched,
    }


class Engagement:
    """
    What the tracker knows beyond the link: the prefetch networks (replaced
    whole on SIGHUP), the MaxMind database if any, the click rules' settings
    and the recent ``HEAD`` requests.
    """

    def __init__(self, prefetch_networks: Networks = EMPTY, geoip: GeoIP | None = None,
                 click_prefetch_seconds: float = 0.0, heads: RecentHeads | None = None) -> None:
        self.prefetch_networks = prefetch_networks
        self.geoip = geoip
        self.click_prefetch_seconds = click_prefetch_seconds
        self.heads = heads if heads is not None else RecentHeads()

    def open_fields(self, user_agent: str, ip_address: str) -> dict[str, Any]:
        verdict = classify_open(user_agent, ip_address, self.prefetch_networks)
        return self._fields(user_agent, ip_address, verdict)

    def click_fields(self, user_agent: str, ip_address: str, token: bytes, *, issued: int,
                     trap: bool, now: float) -> dict[str, Any]:
        verdict = classify_click(user_agent, after_head=self.heads.after_head(ip_address, token, now),
                                 issued=issued, now=now,
                                 prefetch_seconds=self.click_prefetch_seconds, trap=trap)
        return self._fields(user_agent, ip_address, verdict)

    def head(self, ip_address: str, token: bytes, now: float) -> None:
        """A ``HEAD`` for a click link: the next ``GET`` of it from there is a scanner's."""
        self.heads.note(ip_address, token, now)

    def _fields(self, user_agent: str, ip_address: str, verdict: Verdict) -> dict[str, Any]:
        fields: dict[str, Any] = {"user_agent_parsed": user_agent_parsed(user_agent, verdict)}
        if self.geoip is not None:
            geo = self.geoip.lookup(ip_address)
            if geo is not None:
                fields["geo_ip"] = dict(geo)
        return fields
