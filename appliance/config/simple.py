"""
The tables of a few plain keys each, none of which depends on another table:
``[node]``, ``[engagement_tracker]``, ``[spool]``, ``[tracker]``, ``[links]``,
``[policy]``, ``[events]`` and ``[suppression]``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from appliance.config.tables import Table
from appliance.config.values import Network, show, tcp_listen_address


@dataclass(frozen=True)
class NodeConfig:
    name: str = "appliance1"
    hostname: str = "localhost"
    # Where RCPT TO:<postmaster> (no domain, RFC 5321 §4.5.1) goes; "" reads postmaster@hostname.
    postmaster: str = ""


def read_node(t: Table) -> NodeConfig:
    hostname = t.str("hostname", NodeConfig.hostname, allow_empty=False)
    postmaster = t.str("postmaster", "") or f"postmaster@{hostname}"
    if not re.fullmatch(r"[\x21-\x3b\x3d\x3f-\x7e]+@[A-Za-z0-9.-]+", postmaster):
        t.error("postmaster", f"expected an address like postmaster@example.com, got {show(postmaster)}")
        postmaster = f"postmaster@{hostname}"
    c = NodeConfig(name=t.str("name", NodeConfig.name, allow_empty=False), hostname=hostname,
                   postmaster=postmaster)
    t.finish()
    return c


@dataclass(frozen=True)
class EngagementTrackerConfig:
    click_tracking_include_metadata: bool = True
    max_metadata_len: int = 1000
    # Machine opens and clicks (appliance.engagement): "" leaves the file or database out.
    prefetch_networks_file: str = ""  # RFC 8805 CSV of Apple's iCloud Private Relay egress ranges
    geoip_database: str = ""  # a MaxMind .mmdb: events get SparkPost's geo_ip
    click_prefetch_seconds: float = 10.0  # a click this soon after sending is a scanner's; 0: off
    bot_trap_link: bool = False  # a hidden link first in tracked HTML parts: only machines follow it


def _optional_path(t: Table, name: str) -> str:
    value = t.str(name, "")
    return os.path.abspath(value) if value else ""


def read_engagement_tracker(t: Table) -> EngagementTrackerConfig:
    d = EngagementTrackerConfig
    c = EngagementTrackerConfig(
        click_tracking_include_metadata=t.bool("click_tracking_include_metadata",
                                               d.click_tracking_include_metadata),
        max_metadata_len=t.int("max_metadata_len", d.max_metadata_len, minimum=0, maximum=65536),
        prefetch_networks_file=_optional_path(t, "prefetch_networks_file"),
        geoip_database=_optional_path(t, "geoip_database"),
        click_prefetch_seconds=t.duration("click_prefetch_seconds", d.click_prefetch_seconds),
        bot_trap_link=t.bool("bot_trap_link", d.bot_trap_link),
    )
    if c.click_prefetch_seconds < 0:
        t.error("click_prefetch_seconds", "must be 0 (off) or more seconds")
        c = replace(c, click_prefetch_seconds=d.click_prefetch_seconds)
    t.finish()
    return c


@dataclass(frozen=True)
class SpoolConfig:
    directory: str


def read_spool(t: Table) -> SpoolConfig:
    c = SpoolConfig(directory=t.path_("directory", "var/spool"))
    t.finish()
    return c


@dataclass(frozen=True)
class TrackerLimits:
    """What clients of the tracker may hold (``appliance.tracker.limits`` enforces it)."""

    max_connections: int = 512
    max_connections_per_address: int = 32
    header_timeout: float = 20.0
    keepalive_timeout: float = 5.0
    max_requests_per_connection: int = 1000
    event_rate_limit: int = 10
    event_rate_window: float = 60.0
    event_rate_entries: int = 100_000


@dataclass(frozen=True)
class TrackerConfig:
    endpoint: str = "tcp:8080:interface=127.0.0.1"
    # Peers whose X-Forwarded-For is believed (reverse proxies, load balancers).
    trusted_proxies: tuple[Network, ...] = ()
    limits: TrackerLimits = TrackerLimits()
    # Processes answering hits on the endpoint: this one and processes - 1 children
    # (``appliance.tracker.processes``); "auto" in the file is the number of usable cores.
    processes: int = 1


_TRACKER_DURATIONS = ("header_timeout", "keepalive_timeout", "event_rate_window")


def read_tracker(t: Table) -> TrackerConfig:
    d = TrackerLimits
    c = TrackerLimits(
        max_connections=t.int("max_connections", d.max_connections, minimum=1),
        max_connections_per_address=t.int("max_connections_per_address",
                                          d.max_connections_per_address, minimum=1),
        header_timeout=t.duration("header_timeout", d.header_timeout),
        keepalive_timeout=t.duration("keepalive_timeout", d.keepalive_timeout),
        max_requests_per_connection=t.int("max_requests_per_connection",
                                          d.max_requests_per_connection, minimum=1),
        event_rate_limit=t.int("event_rate_limit", d.event_rate_limit, minimum=1),
        event_rate_window=t.duration("event_rate_window", d.event_rate_window),
        event_rate_entries=t.int("event_rate_entries", d.event_rate_entries, minimum=1),
    )
    for name in _TRACKER_DURATIONS:
        if t.has(name) and getattr(c, name) <= 0:
            t.error(name, "must be more than 0 seconds")
            c = replace(c, **{name: getattr(d, name)})
    endpoint = t.endpoint("endpoint", TrackerConfig.endpoint)
    tracker = TrackerConfig(
        endpoint=endpoint,
        trusted_proxies=t.networks("trusted_proxies", TrackerConfig.trusted_proxies),
        limits=c,
        processes=_tracker_processes(t, endpoint),
    )
    t.finish()
    return tracker


MAX_TRACKER_PROCESSES = 64  # the process index has 6 bits of each event_id (appliance.events)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _tracker_processes(t: Table, endpoint: str) -> int:
    """
    ``processes``: a count, or "auto" for one per usable core. More than one needs a
    ``tcp:`` endpoint (each process opens its own socket on the address); "auto" on
    any other endpoint is 1.
    """
    value = t.data.get("processes", TrackerConfig.processes)
    t.known.add("processes")
    if value == "auto":
        count = min(usable_cores(), MAX_TRACKER_PROCESSES)
        return count if tcp_listen_address(endpoint) is not None else 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TRACKER_PROCESSES:
        t.error("processes", f"expected an integer from 1 to {MAX_TRACKER_PROCESSES} or \"auto\", "
                f"got {show(value)}")
        return TrackerConfig.processes
    if value > 1 and tcp_listen_address(endpoint) is None:
        t.error("processes", f"more than one process needs a tcp: or tcp6: endpoint with a numeric "
                f"interface, such as \"tcp:8080:interface=0.0.0.0\"; tracker.endpoint is {show(endpoint)}")
        return TrackerConfig.processes
    return value


@dataclass(frozen=True)
class LinksConfig:
    keys_file: str
    create_keys_file: bool = True


def read_links(t: Table) -> LinksConfig:
    c = LinksConfig(
        keys_file=t.path_("keys_file", "var/keys/links.keys"),
        create_keys_file=t.bool("create_keys_file", LinksConfig.create_keys_file),
    )
    t.finish()
    return c


@dataclass(frozen=True)
class PolicyConfig:
    """The policy hook: a Python callable consulted once per recipient after DATA."""

    hook: str = ""  # "package.module:function", or "" for none
    path: tuple[str, ...] = ()  # directories searched for the hook's module first
    timeout: float = 30.0


_HOOK_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def read_policy(t: Table) -> PolicyConfig:
    c = PolicyConfig(
        hook=t.str("hook", PolicyConfig.hook),
        path=tuple(os.path.abspath(p) for p in t.str_list("path", PolicyConfig.path)),
        timeout=t.duration("timeout", PolicyConfig.timeout),
    )
    if c.hook and not _HOOK_RE.fullmatch(c.hook):
        t.error("hook", f"expected \"package.module:function\", got {show(c.hook)}")
        c = replace(c, hook="")
    if t.has("timeout") and c.timeout <= 0:
        t.error("timeout", "must be more than 0 seconds")
    t.finish()
    return c


@dataclass(frozen=True)
class EventsConfig:
    log_file: str
    customer_id: str = "1"
    fsync_interval: float = 1.0
    # The mode a new event log file is created with, whatever the umask; an existing one keeps its own.
    file_mode: int = 0o640


def read_events(t: Table) -> EventsConfig:
    mode = t.str("file_mode", "0640")
    file_mode = EventsConfig.file_mode
    if re.fullmatch(r"0?[0-7]{3}", mode) and int(mode, 8) & 0o600 == 0o600:
        file_mode = int(mode, 8)
    else:
        # The appliance and its followers reopen the file: its owner must read and write it.
        t.error("file_mode", f"expected an octal mode with owner read and write, like \"0640\", "
                f"got {show(mode)}")
    c = EventsConfig(
        log_file=t.path_("log_file", "var/log/events.jsonl"),
        customer_id=t.str("customer_id", EventsConfig.customer_id),
        fsync_interval=t.duration("fsync_interval", EventsConfig.fsync_interval),
        file_mode=file_mode,
    )
    t.finish()
    return c


@dataclass(frozen=True)
class SuppressionConfig:
    """The suppression list: who gets no copy, by SparkPost's two scopes."""

    database: str
    # How often the running appliance looks for changes others made to the database
    # (``engage-appliance suppressions``): one cheap read of SQLite's data_version.
    check_interval: float = 1.0


def read_suppression(t: Table) -> SuppressionConfig:
    c = SuppressionConfig(
        database=t.path_("database", "var/suppression.sqlite3"),
        check_interval=t.duration("check_interval", SuppressionConfig.check_interval),
    )
    if t.has("check_interval") and c.check_interval <= 0:
        t.error("check_interval", "must be more than 0 seconds")
        c = replace(c, check_interval=SuppressionConfig.check_interval)
    t.finish()
    return c


# The most helper processes a configuration may ask for: each holds a Python interpreter
# (about 40 MB), and past the machine's cores more only cost memory.
MAX_HELPERS = 64


@dataclass(frozen=True)
class ApplianceConfig:
    """The process as a whole: ``helpers`` is how many child processes make copies."""

    # A count, or "auto": one less than the cores this process may run on. 0 by default:
    # on two cores, where the load generator and the receiver share the machine,
    # bench/helpers_bench.py measured one helper at 0.88x the msgs/s of none.
    helpers: int | str = 0

    def helper_count(self, cores: int | None = None) -> int:
        """The number of helpers to run: 0 runs the same work in threads of the owner."""
        if isinstance(self.helpers, int):
            return self.helpers
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(MAX_HELPERS, max(0, cores - 1))


def read_appliance(t: Table) -> ApplianceConfig:
    def convert(v: object) -> int | str:
        if v == "auto":
            return "auto"
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_HELPERS:
            return v
        raise ValueError(f"expected \"auto\" or an integer from 0 to {MAX_HELPERS}, got {show(v)}")

    c = ApplianceConfig(helpers=t._get("helpers", ApplianceConfig.helpers, convert))
    t.finish()
    return c
