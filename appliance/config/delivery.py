"""
The ``[delivery]`` table: routes, the smarthost and its TLS, DNS, retries and limits.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from appliance.config.tables import Table
from appliance.config.values import host_port, show


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
    # How long a connection with nothing to send stays open for the next copy to its
    # destination (Postfix's connection cache keeps them 2s); 0: closed at once.
    connection_reuse_time: float = 2.0
    # Copies in the queue (not yet delivered or bounced) above which injection answers
    # 452 4.3.1: each costs memory until it leaves.
    max_queued_copies: int = 100_000


def _read_route(t: Table, name: str, value: object) -> Route | None:
    if not isinstance(value, str):
        t.error(name, f"expected \"host:port\", got {show(value)}")
        return None
    try:
        return Route(*host_port(value))
    except ValueError as e:
        t.error(name, str(e))
        return None


def read_delivery(t: Table) -> DeliveryConfig:
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
            t.error("dns_servers", f"expected IP addresses such as \"192.0.2.53\", got {show(server)}")
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
        connection_reuse_time=t.duration("connection_reuse_time", d.connection_reuse_time),
        max_queued_copies=t.int("max_queued_copies", d.max_queued_copies, minimum=1),
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
