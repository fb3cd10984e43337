"""
The appliance's configuration: ``etc/appliance.toml`` read into frozen objects.

Every table has its own class and its own reader. Readers never raise on the
first problem: they record it against the key path and carry on, so that one
start-up reports every mistake in the file at once. Unknown tables and keys
are errors, because a misspelt key that is silently ignored is a setting the
operator believes in and does not have.

The value syntax is in ``values``, the table reader in ``tables``, and each
group of tables in a module of its own; this module puts them together.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

from appliance.config.admin import AdminConfig, read_admin
from appliance.config.delivery import DeliveryConfig, Route, read_delivery
from appliance.config.dkim import DkimKeyConfig, read_dkim
from appliance.config.simple import (
    ApplianceConfig,
    EngagementTrackerConfig,
    EventsConfig,
    LinksConfig,
    NodeConfig,
    PolicyConfig,
    SpoolConfig,
    SuppressionConfig,
    TrackerConfig,
    TrackerLimits,
    read_appliance,
    read_engagement_tracker,
    read_events,
    read_links,
    read_node,
    read_policy,
    read_spool,
    read_suppression,
    read_tracker,
)
from appliance.config.smtp import LOOPBACK, ListenerConfig, SmtpapiConfig, SmtpConfig, read_smtp, read_smtpapi
from appliance.config.stats import StatsConfig, read_stats
from appliance.config.tables import Table
from appliance.config.values import is_host_port, parse_duration, parse_size
from appliance.config.webhooks import WebhookConfig, read_webhooks
from appliance.eventtypes import EVENT_TYPES

# What the rest of the appliance, its tests and benchmarks import from here.
__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AdminConfig",
    "ApplianceConfig",
    "EVENT_TYPES",
    "LOOPBACK",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "EngagementTrackerConfig",
    "ListenerConfig",
    "Route",
    "SmtpConfig",
    "SmtpapiConfig",
    "SuppressionConfig",
    "StatsConfig",
    "Table",
    "TrackerLimits",
    "WebhookConfig",
    "is_host_port",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "read_config",
    "read_toml",
]


DEFAULT_CONFIG_PATH = "etc/appliance.toml"


class ConfigError(Exception):
    """One or more problems in a configuration file, each with its key path."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "") -> None:
        self.problems = problems
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" in {self.source}" if self.source else ""
        lines = [f"{len(self.problems)} configuration error(s){where}:"]
        lines += [f"  {path}: {message}" if path else f"  {message}" for path, message in self.problems]
        return "\n".join(lines)


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    smtpapi: SmtpapiConfig
    engagement_tracker: EngagementTrackerConfig
    smtp: SmtpConfig
    spool: SpoolConfig
    delivery: DeliveryConfig
    tracker: TrackerConfig
    links: LinksConfig
    events: EventsConfig
    policy: PolicyConfig = PolicyConfig()
    webhooks: tuple[WebhookConfig, ...] = ()
    dkim: tuple[DkimKeyConfig, ...] = ()  # signing keys; empty: copies are not signed
    admin: AdminConfig = AdminConfig()
    suppression: SuppressionConfig = SuppressionConfig("var/suppression.sqlite3")
    stats: StatsConfig = StatsConfig()
    appliance: ApplianceConfig = ApplianceConfig()
    source: str = ""


def parse_config(data: dict[str, Any], source: str = "") -> Config:
    """Build a ``Config`` from parsed TOML, or raise one ``ConfigError`` listing every problem."""
    config, problems = read_config(data, source)
    if problems:
        raise ConfigError(problems, source)
    return config


def read_config(data: dict[str, Any], source: str = "") -> tuple[Config, list[tuple[str, str]]]:
    """
    A ``Config`` from parsed TOML and the problems found in it (key path, message).

    The ``Config`` is returned even with problems, so the builder can add those
    of the files it names and an operator hears of every mistake at once.
    """
    problems: list[tuple[str, str]] = []
    # Every other table is read from ``top`` (``Table.table``, ``Table.entry``) and so
    # is of its class: tests/test_shipped_config.py replaces ``Table`` here to record keys.
    top = Table(data, "", problems)
    smtpapi = read_smtpapi(top.table("smtpapi"), SmtpapiConfig())
    config = Config(
        node=read_node(top.table("node")),
        smtpapi=smtpapi,
        engagement_tracker=read_engagement_tracker(top.table("engagement_tracker")),
        smtp=read_smtp(top.table("smtp"), smtpapi),
        spool=read_spool(top.table("spool")),
        delivery=read_delivery(top.table("delivery")),
        tracker=read_tracker(top.table("tracker")),
        links=read_links(top.table("links")),
        events=read_events(top.table("events")),
        policy=read_policy(top.table("policy")),
        webhooks=read_webhooks(top),
        dkim=read_dkim(top),
        admin=read_admin(top.table("admin")),
        suppression=read_suppression(top.table("suppression")),
        stats=read_stats(top.table("stats")),
        appliance=read_appliance(top.table("appliance")),
        source=source,
    )
    for name in top.data:
        if name not in top.known:
            problems.append((name, "unknown table"))
    return config, problems


def read_toml(path: str) -> dict[str, Any]:
    """The parsed TOML file; a file that cannot be read or parsed is a ``ConfigError``."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError([("", f"cannot read {path}: {e.strerror}")], path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([("", f"not valid TOML: {e}")], path) from None


def load_config(path: str) -> Config:
    """Read and validate a TOML file's shape and values; every failure is a ``ConfigError``."""
    return parse_config(read_toml(path), path)
