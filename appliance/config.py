"""
The appliance's configuration: ``etc/appliance.toml`` read into frozen objects.

Every table has its own class and its own reader. Readers never raise on the
first problem: they record it against the key path and carry on, so that one
start-up reports every mistake in the file at once. Unknown tables and keys
are errors, because a misspelt key that is silently ignored is a setting the
operator believes in and does not have.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.dkim import DEFAULT_HEADERS
from appliance.eventtypes import EVENT_TYPES
from appliance.headers import is_field_name

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


# -- value syntax ------------------------------------------------------------

_SIZE_RE = re.compile(r"(\d+)\s*([kKmMgG]?)[bB]?")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DURATION_RE = re.compile(r"(\d+)\s*(ms|s|m|h|d|w)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(value: object) -> int:
    """``25M``-style sizes (binary multiples) or a plain count of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 25M, got {_show(value)}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    raise ValueError(f"expected a size such as 25M, got {_show(value)}")


def parse_duration(value: object) -> float:
    """``30s``/``5m``/``4h``/``5d``-style durations, or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected seconds, got {_show(value)}")
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m:
            return int(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    raise ValueError(f"expected seconds, got {_show(value)}")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: object) -> tuple[Network, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"expected an array of networks such as \"127.0.0.0/8\", got {_show(value)}")
    try:
        return tuple(ipaddress.ip_network(x, strict=False) for x in value)
    except ValueError as e:
        raise ValueError(f"not a network: {e}") from None


def _show(value: object) -> str:
    """A value as TOML would write it, so error messages quote the way the file does."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float | list | dict):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
    return repr(value)


def _describe(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


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
            self.error("", f"expected a table, got {_describe(data)}")
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
            raise ValueError(f"expected true or false, got {_show(v)}")

        return self._get(name, default, convert)

    def int(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        def convert(v: object) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"expected an integer, got {_show(v)}")
            if v < minimum or (maximum is not None and v > maximum):
                bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
                raise ValueError(f"expected an integer {bound}, got {v}")
            return v

        return self._get(name, default, convert)

    def str(self, name: str, default: str, allow_empty: bool = True) -> str:
        def convert(v: object) -> str:
            if not isinstance(v, str):
                raise ValueError(f"expected a string, got {_describe(v)} {_show(v)}")
            if not allow_empty and not v:
                raise ValueError("must not be empty")
            return v

        return self._get(name, default, convert)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def convert(v: object) -> str:
            if v not in choices:
                raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {_show(v)}")
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
                raise ValueError(f"expected an array of strings, got {_show(v)}")
            return tuple(v)

        return self._get(name, default, convert)

    def networks(self, name: str, default: tuple[Network, ...]) -> tuple[Network, ...]:
        return self._get(name, default, parse_networks)

    def endpoint(self, name: str, default: str) -> str:
        """A Twisted server endpoint description, checked for syntax only."""

        def convert(v: object) -> str:
            if not isinstance(v, str) or not v:
                example = '"tcp:2525:interface=127.0.0.1"'
                raise ValueError(f"expected an endpoint such as {example}, got {_show(v)}")
            kind = v.split(":", 1)[0]
            if kind not in ("tcp", "tcp6", "ssl", "unix", "systemd"):
                raise ValueError(f"unknown endpoint type {kind!r} in {v!r}")
            return v

        return self._get(name, default, convert)

    def table(self, name: str) -> Table:
        self.known.add(name)
        return Table(self.data.get(name), self.key(name), self.problems)

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


def host_port(value: str, default_port: int = 25) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``; raises ValueError with a readable message."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", value)
    if not m:
        raise ValueError(f"expected host or host:port, got {_show(value)}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4) or default_port)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


# -- the tables ----------------------------------------------------------------


@dataclass(frozen=True)
class NodeConfig:
    name: str = "appliance1"
    hostname: str = "localhost"


def _read_node(t: Table) -> NodeConfig:
    c = NodeConfig(name=t.str("name", NodeConfig.name, allow_empty=False),
                   hostname=t.str("hostname", NodeConfig.hostname, allow_empty=False))
    t.finish()
    return c


@dataclass(frozen=True)
class SmtpapiConfig:
    """Momentum's ``smtpapi`` options, names kept as Momentum spells them."""

    open_tracking_enabled: bool = False
    click_tracking_enabled: bool = False
    open_tracking_scheme: str = "http"
    click_tracking_scheme: str = "http"
    tracking_domain: str = "localhost:8080"
    tracking_link_expiry: float = 31536000.0
    initial_open: bool = True


_HOST_PORT_RE = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


def is_host_port(value: str) -> bool:
    """A ``host[:port]`` fit to be put into a tracked link."""
    return bool(_HOST_PORT_RE.fullmatch(value))


def _read_smtpapi(t: Table, base: SmtpapiConfig) -> SmtpapiConfig:
    """Read ``smtpapi`` keys over ``base``, so a listener inherits what it does not set."""
    schemes = ("http", "https")
    c = replace(
        base,
        open_tracking_enabled=t.bool("open_tracking_enabled", base.open_tracking_enabled),
        click_tracking_enabled=t.bool("click_tracking_enabled", base.click_tracking_enabled),
        open_tracking_scheme=t.choice("open_tracking_scheme", base.open_tracking_scheme, schemes),
        click_tracking_scheme=t.choice("click_tracking_scheme", base.click_tracking_scheme, schemes),
        tracking_domain=t.str("tracking_domain", base.tracking_domain, allow_empty=False),
        tracking_link_expiry=t.duration("tracking_link_expiry", base.tracking_link_expiry),
        initial_open=t.bool("initial_open", base.initial_open),
    )
    if t.has("tracking_domain") and not is_host_port(c.tracking_domain):
        t.error("tracking_domain", f"expected host[:port], got {_show(c.tracking_domain)}")
        c = replace(c, tracking_domain=base.tracking_domain)
    t.finish()
    return c


@dataclass(frozen=True)
class EngagementTrackerConfig:
    click_tracking_include_metadata: bool = True
    max_metadata_len: int = 1000


def _read_engagement_tracker(t: Table) -> EngagementTrackerConfig:
    d = EngagementTrackerConfig
    c = EngagementTrackerConfig(
        click_tracking_include_metadata=t.bool("click_tracking_include_metadata",
                                               d.click_tracking_include_metadata),
        max_metadata_len=t.int("max_metadata_len", d.max_metadata_len, minimum=0, maximum=65536),
    )
    t.finish()
    return c


LOOPBACK = parse_networks(["127.0.0.0/8", "::1/128"])

TLS_MODES = ("off", "starttls", "required", "implicit")


@dataclass(frozen=True)
class ListenerConfig:
    """One SMTP injection listener; its ``smtpapi`` is the global table with its overrides."""

    name: str
    endpoint: str
    smtpapi: SmtpapiConfig
    relay_networks: tuple[Network, ...]
    max_message_size: int
    max_recipients: int
    # "off": no STARTTLS; "starttls": offered; "required": MAIL needs TLS first;
    # "implicit": TLS from the first byte (RFC 8314, port 465).
    tls: str = "off"
    tls_certificate: str = ""
    tls_key: str = ""
    # Even clients in relay_networks must authenticate (a submission port).
    require_auth: bool = False


@dataclass(frozen=True)
class SmtpConfig:
    listeners: tuple[ListenerConfig, ...]
    relay_networks: tuple[Network, ...]
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 1000
    timeout: float = 300.0
    command_timeout: float = 60.0
    data_timeout: float = 1800.0
    max_connections: int = 200
    max_connections_per_client: int = 20
    tls_certificate: str = ""
    tls_key: str = ""
    users_file: str = ""
    # Received: headers a message may carry, the appliance's own included (mail loops).
    max_hops: int = 50


def _optional_path(t: Table, name: str, default: str) -> str:
    """A path that may be "" (feature off); absolute against the start-up directory."""
    value = t.str(name, default)
    return os.path.abspath(value) if value else ""


def _check_tls_pair(t: Table, certificate: str, key: str) -> bool:
    """Both or neither; errors name the key of ``t``. The builder loads the pair."""
    if bool(certificate) != bool(key):
        t.error("tls_key" if certificate else "tls_certificate",
                "tls_certificate and tls_key must be set together")
        return False
    return True


def _read_smtp(t: Table, smtpapi: SmtpapiConfig) -> SmtpConfig:
    d = SmtpConfig
    relay = t.networks("relay_networks", LOOPBACK)
    size = t.size("max_message_size", d.max_message_size)
    rcpts = t.int("max_recipients", d.max_recipients, minimum=1)
    max_hops = t.int("max_hops", d.max_hops, minimum=1)
    timeout = t.duration("timeout", d.timeout)
    command_timeout = t.duration("command_timeout", d.command_timeout)
    data_timeout = t.duration("data_timeout", d.data_timeout)
    max_connections = t.int("max_connections", d.max_connections, minimum=1)
    per_client = t.int("max_connections_per_client", d.max_connections_per_client, minimum=1)
    certificate = _optional_path(t, "tls_certificate", "")
    key = _optional_path(t, "tls_key", "")
    _check_tls_pair(t, certificate, key)
    users_file = _optional_path(t, "users_file", "")
    for name, value in (("timeout", timeout), ("command_timeout", command_timeout),
                        ("data_timeout", data_timeout)):
        if t.has(name) and value <= 0:
            t.error(name, "must be more than 0 seconds")
    listeners = []
    for name, lt in t.subtables("listeners"):
        l_cert = _optional_path(lt, "tls_certificate", certificate)
        l_key = _optional_path(lt, "tls_key", key)
        endpoint = lt.endpoint("endpoint", "")
        if endpoint.startswith("ssl:"):
            # TLS comes from the endpoint string itself (its privateKey/certKey): a pair
            # named here would be checked and then never served, so it is refused.
            for pair_key in ("tls_certificate", "tls_key"):
                if lt.has(pair_key):
                    lt.error(pair_key, "not with an ssl: endpoint, whose privateKey= and certKey= give "
                                   'the certificate (or use a tcp: endpoint with tls = "implicit")')
            l_cert = l_key = ""
            if lt.has("tls"):
                lt.error("tls", "not with an ssl: endpoint, which is implicit TLS already")
            lt.known.add("tls")
            tls = "implicit"
        else:
            if lt.has("tls_certificate") or lt.has("tls_key"):
                _check_tls_pair(lt, l_cert, l_key)
            tls = lt.choice("tls", "starttls" if l_cert else "off", TLS_MODES)
            if tls != "off" and not (l_cert and l_key):
                lt.error("tls", f"tls = {_show(tls)} needs smtp.tls_certificate and smtp.tls_key")
        require_auth = lt.bool("require_auth", False)
        if require_auth and not users_file:
            lt.error("require_auth", "needs smtp.users_file")
        if require_auth and tls == "off":
            lt.error("require_auth", "needs TLS on this listener: AUTH is only offered over TLS")
        listeners.append(
            ListenerConfig(
                name=name,
                endpoint=endpoint,
                smtpapi=_read_smtpapi(lt.table("smtpapi"), smtpapi),
                relay_networks=lt.networks("relay_networks", relay),
                max_message_size=lt.size("max_message_size", size),
                max_recipients=lt.int("max_recipients", rcpts, minimum=1),
                tls=tls,
                tls_certificate=l_cert,
                tls_key=l_key,
                require_auth=require_auth,
            )
        )
        if not lt.has("endpoint"):
            lt.error("endpoint", "missing: every listener needs an endpoint")
        lt.finish()
    if not listeners:
        t.error("listeners", "at least one SMTP listener is needed ([smtp.listeners.NAME])")
    t.finish()
    return SmtpConfig(listeners=tuple(listeners), relay_networks=relay, max_message_size=size,
                      max_recipients=rcpts, timeout=timeout, command_timeout=command_timeout,
                      data_timeout=data_timeout, max_connections=max_connections,
                      max_connections_per_client=per_client, tls_certificate=certificate,
                      tls_key=key, users_file=users_file, max_hops=max_hops)


@dataclass(frozen=True)
class SpoolConfig:
    directory: str


def _read_spool(t: Table) -> SpoolConfig:
    c = SpoolConfig(directory=t.path_("directory", "var/spool"))
    t.finish()
    return c


@dataclass(frozen=True)
class Route:
    host: str
    port: int


@dataclass(frozen=True)
class DeliveryConfig:
    routes: dict[str, Route] = field(default_factory=dict)
    smarthost: Route | None = None
    smarthost_username: str = ""
    smarthost_password: str = field(default="", repr=False)  # the builder reads it from the file
    smarthost_password_file: str = ""
    helo_name: str = ""
    tls: str = "opportunistic"
    tls_verify: bool = False
    tls_ca_file: str = ""
    dns_servers: tuple[tuple[str, int], ...] = ()
    address_preference: str = "any"
    mx_address_limit: int = 5
    retry_initial: float = 300.0
    retry_max: float = 4000.0
    max_queue_lifetime: float = 5 * 86400.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    max_connections: int = 50
    max_connections_per_destination: int = 20
    max_messages_per_connection: int = 100


def _read_route(t: Table, name: str, value: object) -> Route | None:
    if not isinstance(value, str):
        t.error(name, f"expected \"host:port\", got {_show(value)}")
        return None
    try:
        return Route(*host_port(value))
    except ValueError as e:
        t.error(name, str(e))
        return None


def _read_delivery(t: Table) -> DeliveryConfig:
    d = DeliveryConfig
    routes: dict[str, Route] = {}
    rt = t.table("routes")
    for domain, value in rt.data.items():
        key = domain.lower().rstrip(".")
        if not re.fullmatch(r"(\*\.)?[a-z0-9._\-]+", key):
            rt.error(domain, "expected a domain name or *.domain")
            continue
        route = _read_route(rt, domain, value)
        if route:
            routes[key] = route
    smarthost = None
    t.known.add("smarthost")
    if t.has("smarthost") and t.data["smarthost"] != "":
        smarthost = _read_route(t, "smarthost", t.data["smarthost"])
    dns_servers: list[tuple[str, int]] = []
    for server in t.str_list("dns_servers", ()):
        try:
            host, port = host_port(server, default_port=53)
            ipaddress.ip_address(host)
        except ValueError:
            t.error("dns_servers", f"expected IP addresses such as \"192.0.2.53\", got {_show(server)}")
            continue
        dns_servers.append((host, port))
    username = t.str("smarthost_username", d.smarthost_username)
    password_file = t.str("smarthost_password_file", "")
    password_file = os.path.abspath(password_file) if password_file else ""
    if bool(username) != bool(password_file):
        t.error("smarthost_username" if password_file else "smarthost_password_file",
                "smarthost AUTH needs both smarthost_username and smarthost_password_file")
    if username and smarthost is None:
        t.error("smarthost_username", "set, but there is no smarthost")
    tls_ca_file = t.str("tls_ca_file", "")
    tls_ca_file = os.path.abspath(tls_ca_file) if tls_ca_file else ""
    c = DeliveryConfig(
        routes=routes,
        smarthost=smarthost,
        smarthost_username=username,
        smarthost_password_file=password_file,
        helo_name=t.str("helo_name", d.helo_name),
        tls=t.choice("tls", d.tls, ("opportunistic", "required", "none")),
        tls_verify=t.bool("tls_verify", d.tls_verify),
        tls_ca_file=tls_ca_file,
        dns_servers=tuple(dns_servers),
        address_preference=t.choice("address_preference", d.address_preference,
                                    ("any", "ipv4", "ipv6")),
        mx_address_limit=t.int("mx_address_limit", d.mx_address_limit, minimum=1),
        retry_initial=t.duration("retry_initial", d.retry_initial),
        retry_max=t.duration("retry_max", d.retry_max),
        max_queue_lifetime=t.duration("max_queue_lifetime", d.max_queue_lifetime),
        connect_timeout=t.duration("connect_timeout", d.connect_timeout),
        command_timeout=t.duration("command_timeout", d.command_timeout),
        data_timeout=t.duration("data_timeout", d.data_timeout),
        max_connections=t.int("max_connections", d.max_connections, minimum=1),
        max_connections_per_destination=t.int("max_connections_per_destination",
                                              d.max_connections_per_destination, minimum=1),
        max_messages_per_connection=t.int("max_messages_per_connection",
                                          d.max_messages_per_connection, minimum=1),
    )
    if c.retry_initial <= 0:
        t.error("retry_initial", "must be more than 0 seconds")
    if c.retry_max < c.retry_initial:
        t.error("retry_max", "must not be less than retry_initial")
    for name in ("connect_timeout", "command_timeout", "data_timeout"):
        if getattr(c, name) <= 0:
            t.error(name, "must be more than 0 seconds")
    if c.smarthost_username and c.tls == "none":
        t.error("smarthost_username", 'credentials are only sent over TLS, and tls = "none"; '
                                      'use "opportunistic" or "required"')
    if c.tls_ca_file and not (c.tls_verify or c.smarthost_username):
        # Smarthost credentials go only to a server whose certificate is checked; nothing
        # else reads the file, and a setting that seems to protect but does not is a trap.
        t.error("tls_ca_file", "set, but tls_verify is false and there is no smarthost_username, "
                               "so no certificate is checked")
    if c.tls_verify and c.tls != "required":
        # A failed check would only fall back to plaintext, which no check can make safer.
        t.error("tls_verify", 'needs tls = "required"')
    t.finish()
    return c


@dataclass(frozen=True)
class TrackerConfig:
    endpoint: str = "tcp:8080:interface=127.0.0.1"
    # Peers whose X-Forwarded-For is believed (reverse proxies, load balancers).
    trusted_proxies: tuple[Network, ...] = ()


def _read_tracker(t: Table) -> TrackerConfig:
    c = TrackerConfig(endpoint=t.endpoint("endpoint", TrackerConfig.endpoint),
                      trusted_proxies=t.networks("trusted_proxies", TrackerConfig.trusted_proxies))
    t.finish()
    return c


@dataclass(frozen=True)
class LinksConfig:
    keys_file: str
    create_keys_file: bool = True


def _read_links(t: Table) -> LinksConfig:
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


def _read_policy(t: Table) -> PolicyConfig:
    c = PolicyConfig(
        hook=t.str("hook", PolicyConfig.hook),
        path=tuple(os.path.abspath(p) for p in t.str_list("path", PolicyConfig.path)),
        timeout=t.duration("timeout", PolicyConfig.timeout),
    )
    if c.hook and not _HOOK_RE.fullmatch(c.hook):
        t.error("hook", f"expected \"package.module:function\", got {_show(c.hook)}")
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


def _read_events(t: Table) -> EventsConfig:
    c = EventsConfig(
        log_file=t.path_("log_file", "var/log/events.jsonl"),
        customer_id=t.str("customer_id", EventsConfig.customer_id),
        fsync_interval=t.duration("fsync_interval", EventsConfig.fsync_interval),
    )
    t.finish()
    return c


@dataclass(frozen=True)
class WebhookConfig:
    """One ``[[webhooks]]`` table: where batches of events are POSTed, and how."""

    name: str
    target: str
    events: frozenset[str] = frozenset(EVENT_TYPES)
    auth_token: str = ""  # sent as X-MessageSystems-Webhook-Token, as SparkPost does
    tls_ca_file: str = ""  # PEM certificate trusted for https targets; "" = the system's CAs
    max_batch_size: int = 10000
    max_batch_bytes: int = 5 * 1024**2  # a body larger than a receiver's proxy takes is refused (413)
    batch_interval: float = 30.0
    timeout: float = 10.0
    retry_initial: float = 30.0
    retry_max: float = 1800.0
    retry_lifetime: float = 4 * 3600.0
    where: str = field(default="", compare=False)  # its key path, "webhooks[i]", for errors


_WEBHOOK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_target(value: str) -> str | None:
    """Why ``value`` cannot be a webhook target, or None if it can."""
    if not value.isascii() or any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in value):
        return f"expected an http(s) URL without spaces or non-ASCII characters, got {_show(value)}"
    parts = urllib.parse.urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return f"expected an http:// or https:// URL, got {_show(value)}"
    if parts.username is not None or parts.password is not None:
        return "credentials in the URL are not supported; use auth_token"
    if parts.fragment or value.endswith("#"):
        return f"a URL fragment is never sent; remove it from {_show(value)}"
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return f"bad port in {_show(value)}"
    return None


def _default_webhook_name(target: str) -> str:
    """A stable queue name derived from the target: its host, and a hash to tell paths apart."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", urllib.parse.urlsplit(target).hostname or "webhook")
    return f"{host[:40]}-{hashlib.sha256(target.encode()).hexdigest()[:8]}"


def _read_webhook(t: Table) -> WebhookConfig | None:
    """The table as a ``WebhookConfig``, or None if it has problems (already recorded)."""
    d = WebhookConfig
    known_problems = len(t.problems)
    target = t.str("target", "", allow_empty=False)
    if not t.has("target"):
        t.error("target", "missing: the http(s) URL that receives the batches")
    elif target:
        problem = _check_target(target)
        if problem:
            t.error("target", problem)
            target = ""
    events = t.str_list("events", tuple(EVENT_TYPES))
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown:
        t.error("events", f"unknown event type(s) {', '.join(map(_show, unknown))}; "
                          f"expected some of {', '.join(EVENT_TYPES)}")
    elif t.has("events") and not events:
        t.error("events", "must name at least one event type")
    token = t.str("auth_token", d.auth_token)
    if any(not (32 <= ord(c) < 127) for c in token):
        t.error("auth_token", "must be printable ASCII (it is sent as an HTTP header)")
    tls_ca_file = _optional_path(t, "tls_ca_file", "")
    if tls_ca_file and target and not target.lower().startswith("https:"):
        t.error("tls_ca_file", "set, but the target is not an https:// URL")
    name = t.str("name", "", allow_empty=False)
    if name and not _WEBHOOK_NAME_RE.fullmatch(name):
        t.error("name", f"expected letters, digits, '.', '_' or '-' (at most 64), got {_show(name)}")
    c = WebhookConfig(
        where=t.path,
        name=name or (_default_webhook_name(target) if target else ""),
        target=target,
        events=frozenset(events),
        auth_token=token,
        tls_ca_file=tls_ca_file,
        max_batch_size=t.int("max_batch_size", d.max_batch_size, minimum=1, maximum=10000),
        max_batch_bytes=t.size("max_batch_bytes", d.max_batch_bytes),
        batch_interval=t.duration("batch_interval", d.batch_interval),
        timeout=t.duration("timeout", d.timeout),
        retry_initial=t.duration("retry_initial", d.retry_initial),
        retry_max=t.duration("retry_max", d.retry_max),
        retry_lifetime=t.duration("retry_lifetime", d.retry_lifetime),
    )
    for key in ("batch_interval", "timeout", "retry_initial"):
        if getattr(c, key) <= 0:
            t.error(key, "must be more than 0 seconds")
    if t.has("max_batch_bytes") and c.max_batch_bytes <= 0:
        t.error("max_batch_bytes", "must be more than 0 bytes")
    if c.retry_max < c.retry_initial:
        t.error("retry_max", "must not be less than retry_initial")
    t.finish()
    return c if len(t.problems) == known_problems else None


def _read_webhooks(top: Table) -> tuple[WebhookConfig, ...]:
    """The ``[[webhooks]]`` array of tables; each table's errors are named ``webhooks[i].key``."""
    top.known.add("webhooks")
    data = top.data.get("webhooks", [])
    if not isinstance(data, list):
        top.error("webhooks", "expected an array of tables, written [[webhooks]]")
        return ()
    webhooks: list[WebhookConfig] = []
    names: dict[str, int] = {}
    for i, item in enumerate(data):
        t = Table(item, f"webhooks[{i}]", top.problems)
        if not isinstance(item, dict):
            continue
        c = _read_webhook(t)
        if c is None:
            continue
        if c.name in names:
            t.error("name", f"{_show(c.name)} is also the name of webhooks[{names[c.name]}]; "
                            "give each webhook its own name (it names its queue directory)")
            continue
        names[c.name] = i
        webhooks.append(c)
    return tuple(webhooks)


@dataclass(frozen=True)
class DkimKeyConfig:
    """One DKIM signing identity: copies From ``domain`` (or under it) get its signature."""

    domain: str
    selector: str
    key_file: str
    headers: tuple[str, ...]
    where: str = field(default="", compare=False)  # its key path, "dkim" or "dkim[i]", for errors


_DOMAIN_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
_SELECTOR_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_SELECTOR_RE = re.compile(rf"{_SELECTOR_LABEL}(\.{_SELECTOR_LABEL})*")


def _read_dkim_key(t: Table) -> tuple[DkimKeyConfig, bool]:
    """The key's table, and whether it is right; a wrong one is kept for the builder to check its file."""
    domain = t.str("domain", "", allow_empty=False).lower().rstrip(".")
    selector = t.str("selector", "", allow_empty=False)
    key_file = _optional_path(t, "key_file", "")
    headers = tuple(h.strip().lower() for h in t.str_list("headers", DEFAULT_HEADERS))
    ok = True
    for name in ("domain", "selector", "key_file"):
        if not t.has(name):
            t.error(name, "missing: a DKIM key needs domain, selector and key_file")
            ok = False
    if domain and not _DOMAIN_RE.fullmatch(domain):
        t.error("domain", f"expected a domain name such as \"example.com\", got {_show(domain)}")
        ok = False
    if selector and not _SELECTOR_RE.fullmatch(selector):
        t.error("selector", f"expected a selector such as \"s2025\", got {_show(selector)}")
        ok = False
    bad = [h for h in headers if not is_field_name(h)]
    if bad:
        t.error("headers", f"not header field names: {', '.join(map(_show, bad))}")
        ok = False
    elif "from" not in headers:
        t.error("headers", "must include \"From\" (RFC 6376 requires it to be signed)")
        ok = False
    elif len(set(headers)) != len(headers):
        t.error("headers", "lists a field twice (every instance of a field is signed anyway)")
        ok = False
    t.finish()
    return DkimKeyConfig(domain, selector, key_file, headers, t.path), ok


def _read_dkim(top: Table) -> tuple[DkimKeyConfig, ...]:
    """``[dkim]`` for one signing key, or ``[[dkim]]`` tables for several; absent: no signing."""
    top.known.add("dkim")
    data = top.data.get("dkim")
    if data is None:
        return ()
    if isinstance(data, dict):
        entries = [("dkim", data)]
    elif isinstance(data, list):
        entries = [(f"dkim[{i}]", item) for i, item in enumerate(data)]
    else:
        top.error("dkim", f"expected a table or an array of tables, got {_describe(data)}")
        return ()
    keys: list[DkimKeyConfig] = []
    unchecked: list[DkimKeyConfig] = []
    for path, item in entries:
        t = Table(item, path, top.problems)
        key, ok = _read_dkim_key(t)
        if not ok:
            if key.key_file:
                unchecked.append(key)  # only a Config with problems holds it: never used to sign
            continue
        if any((k.domain, k.selector) == (key.domain, key.selector) for k in keys):
            t.error("selector", f"{key.selector}._domainkey.{key.domain} has a key already")
            continue
        keys.append(key)
    return tuple(keys + unchecked)


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
    top = Table(data, "", problems)
    smtpapi = _read_smtpapi(top.table("smtpapi"), SmtpapiConfig())
    config = Config(
        node=_read_node(top.table("node")),
        smtpapi=smtpapi,
        engagement_tracker=_read_engagement_tracker(top.table("engagement_tracker")),
        smtp=_read_smtp(top.table("smtp"), smtpapi),
        spool=_read_spool(top.table("spool")),
        delivery=_read_delivery(top.table("delivery")),
        tracker=_read_tracker(top.table("tracker")),
        links=_read_links(top.table("links")),
        events=_read_events(top.table("events")),
        policy=_read_policy(top.table("policy")),
        webhooks=_read_webhooks(top),
        dkim=_read_dkim(top),
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
