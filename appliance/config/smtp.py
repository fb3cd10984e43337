"""
The ``[smtp]`` table with its listeners, and ``[smtpapi]``, which a listener may override.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from appliance.config.tables import Table, optional_path
from appliance.config.values import Network, is_host_port, parse_networks, show


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
    max_tracked_links: int = 1000  # per part; copies are made at delivery, so appliance-wide
    # RFC 8058 one-click List-Unsubscribe on every non-transactional copy, and the address of
    # its mailto: form ("" for none).
    list_unsubscribe: bool = False
    list_unsubscribe_mailto: str = ""


# An address that stands in a mailto: URI as it is: no characters a URI or a header field
# would take for something else (RFC 6068 reserves "?", "&", "%", "#", "<", ">", ",").
_MAILTO_ADDRESS = re.compile(r"[A-Za-z0-9!$'*+\-./=^_`{|}~]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def read_smtpapi(t: Table, base: SmtpapiConfig, listener: bool = False) -> SmtpapiConfig:
    """
    Read ``smtpapi`` keys over ``base``, so a listener inherits what it does not set.

    ``max_tracked_links`` binds the copies delivery makes, which do not know
    their listener: a listener's table may not set it.
    """
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
        max_tracked_links=t.int("max_tracked_links", base.max_tracked_links, minimum=0),
        list_unsubscribe=t.bool("list_unsubscribe", base.list_unsubscribe),
        list_unsubscribe_mailto=t.str("list_unsubscribe_mailto", base.list_unsubscribe_mailto),
    )
    if c.list_unsubscribe_mailto and not _MAILTO_ADDRESS.fullmatch(c.list_unsubscribe_mailto):
        t.error("list_unsubscribe_mailto", "expected an address like unsubscribe@example.com, got "
                f"{show(c.list_unsubscribe_mailto)}")
        c = replace(c, list_unsubscribe_mailto=base.list_unsubscribe_mailto)
    if listener and t.has("max_tracked_links"):
        t.error("max_tracked_links", "set it in [smtpapi]: it applies to every message")
        c = replace(c, max_tracked_links=base.max_tracked_links)
    if t.has("tracking_domain") and not is_host_port(c.tracking_domain):
        t.error("tracking_domain", f"expected host[:port], got {show(c.tracking_domain)}")
        c = replace(c, tracking_domain=base.tracking_domain)
    t.finish()
    return c


LOOPBACK = parse_networks(["127.0.0.0/8", "::1/128"])

# Where the first start puts the self-signed pair of smtp.create_certificate (relative to the
# start-up directory, like every relative path; the same as engage-appliance-certificate's).
CREATED_CERTIFICATE = os.path.join("var", "tls", "certificate.pem")
CREATED_KEY = os.path.join("var", "tls", "key.pem")

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
    # This listener's own connection budget (a full public listener leaves a trusted one working).
    max_connections: int = 200
    max_connections_per_client: int = 20
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
    # With no tls_certificate: make a self-signed pair for node.hostname at the first start
    # (CREATED_CERTIFICATE, CREATED_KEY) and use it; certificate_created says the pair is that one.
    create_certificate: bool = True
    certificate_created: bool = False
    users_file: str = ""
    # Received: headers a message may carry, the appliance's own included (mail loops).
    max_hops: int = 50
    # Per session, Postfix's smtpd_junk_command_limit and smtpd_hard_error_limit: 421 4.7.0 past them.
    junk_command_limit: int = 100
    hard_error_limit: int = 20
    # Password checks: started per second, server-wide; an address's wait after a failed login,
    # doubled per further failure up to the maximum. Over either: 454 4.7.0 without a check.
    auth_attempts_per_second: int = 10
    auth_failure_backoff: float = 1.0
    auth_failure_backoff_max: float = 60.0


def _check_tls_pair(t: Table, certificate: str, key: str) -> bool:
    """Both or neither; errors name the key of ``t``. The builder loads the pair."""
    if bool(certificate) != bool(key):
        t.error("tls_key" if certificate else "tls_certificate",
                "tls_certificate and tls_key must be set together")
        return False
    return True


def read_smtp(t: Table, smtpapi: SmtpapiConfig) -> SmtpConfig:
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
    junk_limit = t.int("junk_command_limit", d.junk_command_limit, minimum=1)
    error_limit = t.int("hard_error_limit", d.hard_error_limit, minimum=1)
    auth_rate = t.int("auth_attempts_per_second", d.auth_attempts_per_second, minimum=1)
    backoff = t.duration("auth_failure_backoff", d.auth_failure_backoff)
    backoff_max = t.duration("auth_failure_backoff_max", d.auth_failure_backoff_max)
    if backoff > backoff_max:
        t.error("auth_failure_backoff", "must not be more than auth_failure_backoff_max")
    certificate = optional_path(t, "tls_certificate", "")
    key = optional_path(t, "tls_key", "")
    _check_tls_pair(t, certificate, key)
    create_certificate = t.bool("create_certificate", d.create_certificate)
    created = create_certificate and not certificate and not key
    if created:
        certificate, key = os.path.abspath(CREATED_CERTIFICATE), os.path.abspath(CREATED_KEY)
    users_file = optional_path(t, "users_file", "")
    for name, value in (("timeout", timeout), ("command_timeout", command_timeout),
                        ("data_timeout", data_timeout)):
        if t.has(name) and value <= 0:
            t.error(name, "must be more than 0 seconds")
    listeners = []
    for name, lt in t.subtables("listeners"):
        l_cert = optional_path(lt, "tls_certificate", certificate)
        l_key = optional_path(lt, "tls_key", key)
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
                lt.error("tls", f"tls = {show(tls)} needs smtp.tls_certificate and smtp.tls_key")
        require_auth = lt.bool("require_auth", False)
        if require_auth and not users_file:
            lt.error("require_auth", "needs smtp.users_file")
        if require_auth and tls == "off":
            lt.error("require_auth", "needs TLS on this listener: AUTH is only offered over TLS")
        listeners.append(
            ListenerConfig(
                name=name,
                endpoint=endpoint,
                smtpapi=read_smtpapi(lt.table("smtpapi"), smtpapi, listener=True),
                relay_networks=lt.networks("relay_networks", relay),
                max_message_size=lt.size("max_message_size", size),
                max_recipients=lt.int("max_recipients", rcpts, minimum=1),
                max_connections=lt.int("max_connections", max_connections, minimum=1),
                max_connections_per_client=lt.int("max_connections_per_client", per_client, minimum=1),
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
                      tls_key=key, users_file=users_file, max_hops=max_hops,
                      junk_command_limit=junk_limit, hard_error_limit=error_limit,
                      auth_attempts_per_second=auth_rate, auth_failure_backoff=backoff,
                      auth_failure_backoff_max=backoff_max, create_certificate=create_certificate,
                      certificate_created=created)
