"""
The ``[[webhooks]]`` array of tables: one table for each receiver of event batches.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from dataclasses import dataclass, field

from appliance.config.tables import Table, optional_path
from appliance.config.values import show
from appliance.eventtypes import EVENT_TYPES


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
        return f"expected an http(s) URL without spaces or non-ASCII characters, got {show(value)}"
    parts = urllib.parse.urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return f"expected an http:// or https:// URL, got {show(value)}"
    if parts.username is not None or parts.password is not None:
        return "credentials in the URL are not supported; use auth_token"
    if parts.fragment or value.endswith("#"):
        return f"a URL fragment is never sent; remove it from {show(value)}"
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return f"bad port in {show(value)}"
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
        t.error("events", f"unknown event type(s) {', '.join(map(show, unknown))}; "
                          f"expected some of {', '.join(EVENT_TYPES)}")
    elif t.has("events") and not events:
        t.error("events", "must name at least one event type")
    token = t.str("auth_token", d.auth_token)
    if any(not (32 <= ord(c) < 127) for c in token):
        t.error("auth_token", "must be printable ASCII (it is sent as an HTTP header)")
    tls_ca_file = optional_path(t, "tls_ca_file", "")
    if tls_ca_file and target and not target.lower().startswith("https:"):
        t.error("tls_ca_file", "set, but the target is not an https:// URL")
    name = t.str("name", "", allow_empty=False)
    if name and not _WEBHOOK_NAME_RE.fullmatch(name):
        t.error("name", f"expected letters, digits, '.', '_' or '-' (at most 64), got {show(name)}")
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


def read_webhooks(top: Table) -> tuple[WebhookConfig, ...]:
    """The ``[[webhooks]]`` array of tables; each table's errors are named ``webhooks[i].key``."""
    top.known.add("webhooks")
    data = top.data.get("webhooks", [])
    if not isinstance(data, list):
        top.error("webhooks", "expected an array of tables, written [[webhooks]]")
        return ()
    webhooks: list[WebhookConfig] = []
    names: dict[str, int] = {}
    for i, item in enumerate(data):
        t = top.entry(item, f"webhooks[{i}]")
        if not isinstance(item, dict):
            continue
        c = _read_webhook(t)
        if c is None:
            continue
        if c.name in names:
            t.error("name", f"{show(c.name)} is also the name of webhooks[{names[c.name]}]; "
                            "give each webhook its own name (it names its queue directory)")
            continue
        names[c.name] = i
        webhooks.append(c)
    return tuple(webhooks)
