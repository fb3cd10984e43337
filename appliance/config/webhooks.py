"""
The ``[[webhooks]]`` array of tables: one table for each receiver of event batches.

A webhook authenticates itself as SparkPost's do, in one of four ways
(``auth_type``): not at all, with a token header, with HTTP Basic, or with
an OAuth 2.0 bearer token from the client-credentials grant. Credentials
written into the target (``https://user:secret@host/path``), as many
SparkPost consumers tell their users to, are taken out of the URL and sent
as Basic auth, so they never reach a log line, an event or the queue's name.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import NamedTuple

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
    auth_type: str = "none"  # one of AUTH_TYPES, given or implied by the keys that are set
    auth_username: str = ""  # basic: from the key or the target's credentials
    auth_password: str = field(default="", repr=False)  # basic: from the target, or the builder reads
    auth_password_file: str = ""  # ...it from this file
    auth_token_url: str = ""  # oauth2: where the client-credentials grant is POSTed
    auth_client_id: str = ""
    auth_client_secret: str = field(default="", repr=False)  # the builder reads it from the file
    auth_client_secret_file: str = ""
    tls_ca_file: str = ""  # PEM certificate trusted for https targets; "" = the system's CAs
    max_batch_size: int = 10000
    max_batch_bytes: int = 5 * 1024**2  # a body larger than a receiver's proxy takes is refused (413)
    batch_interval: float = 30.0
    timeout: float = 10.0
    retry_initial: float = 30.0
    retry_max: float = 1800.0
    retry_lifetime: float = 8 * 3600.0  # SparkPost's
    where: str = field(default="", compare=False)  # its key path, "webhooks[i]", for errors


AUTH_TYPES = ("none", "token", "basic", "oauth2")

# The keys each way of authenticating uses; a key of another way is a mistake.
_AUTH_KEYS = {
    "token": ("auth_token",),
    "basic": ("auth_username", "auth_password_file"),
    "oauth2": ("auth_token_url", "auth_client_id", "auth_client_secret_file"),
}

_WEBHOOK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Credentials(NamedTuple):
    """What ``split_credentials`` took out of a URL: the URL without them, and them."""

    url: str
    username: str | None
    password: str | None


def split_credentials(url: str) -> Credentials:
    """
    ``url`` without its ``user:password@``, and the two (percent-decoded), or None where absent.

    The URL that is left is the one requests, log lines and the queue's name use.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return Credentials(url, None, None)
    netloc = parts.netloc.rpartition("@")[2]
    bare = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    username = urllib.parse.unquote(parts.username or "")
    password = None if parts.password is None else urllib.parse.unquote(parts.password)
    return Credentials(bare, username, password)


def _check_url(value: str) -> str | None:
    """Why ``value`` cannot be a webhook's URL (credentials apart), or None if it can."""
    try:
        parts = urllib.parse.urlsplit(value)
        shown = show(split_credentials(value).url)  # a password is never repeated in a message
    except ValueError:
        return "expected an http:// or https:// URL"
    if not value.isascii() or any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in value):
        return f"expected an http(s) URL without spaces or non-ASCII characters, got {shown}"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return f"expected an http:// or https:// URL, got {shown}"
    if parts.fragment or value.endswith("#"):
        return f"a URL fragment is never sent; remove it from {shown}"
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return f"bad port in {shown}"
    return None


def _default_webhook_name(target: str) -> str:
    """
    A stable queue name derived from the target: its host, and a hash to tell paths apart.

    ``target`` is the URL without credentials, so changing only a password
    leaves the queue (and the batches waiting in it) where it is.
    """
    host = re.sub(r"[^A-Za-z0-9.-]", "-", urllib.parse.urlsplit(target).hostname or "webhook")
    return f"{host[:40]}-{hashlib.sha256(target.encode()).hexdigest()[:8]}"


def _printable(t: Table, key: str, value: str, why: str) -> None:
    if any(not (32 <= ord(c) < 127) for c in value):
        t.error(key, f"must be printable ASCII ({why})")


def _read_auth(t: Table, credentials: Credentials) -> dict[str, str]:
    """
    The table's authentication as WebhookConfig fields; each combination that cannot work
    is an error naming its key. Without ``auth_type``, the keys that are set say which it is.
    """
    given = {key: t.str(key, "") for keys in _AUTH_KEYS.values() for key in keys}
    in_url = credentials.username is not None
    auth_type = t.choice("auth_type", "", AUTH_TYPES)
    implied_by = ""
    if not t.has("auth_type"):
        for kind, keys in _AUTH_KEYS.items():
            first = next((key for key in keys if given[key]), "")
            if first or (kind == "basic" and in_url):
                auth_type, implied_by = kind, first or "the target's credentials"
                break
        else:
            auth_type = "none"
    elif not auth_type:
        return {}  # not one of AUTH_TYPES: already an error
    because = f" (set auth_type, or it follows from {implied_by})" if implied_by else ""
    for kind, keys in _AUTH_KEYS.items():
        for key in keys:
            if kind != auth_type and given[key]:  # "" is the same as not set
                t.error(key, f'not used with auth_type "{auth_type}"{because}')
    if in_url and auth_type != "basic":
        t.error("target", f'credentials in the URL are sent as HTTP Basic auth, not with auth_type '
                          f'"{auth_type}"{because}')
    out = {"auth_type": auth_type}
    if auth_type == "token":
        token = given["auth_token"]
        if not token:
            t.error("auth_token", 'missing: auth_type "token" sends it as X-MessageSystems-Webhook-Token')
        _printable(t, "auth_token", token, "it is sent as an HTTP header")
        out["auth_token"] = token
    elif auth_type == "basic":
        username, password_file = given["auth_username"], given["auth_password_file"]
        if in_url and (username or password_file):
            t.error("auth_username" if username else "auth_password_file",
                    "the target carries credentials already; give them in one place")
        elif in_url:
            username, password = credentials.username or "", credentials.password or ""
            if not username:
                t.error("target", "the credentials in the URL have no user name")
            out["auth_password"] = password
        elif not username:
            t.error("auth_username", 'missing: auth_type "basic" needs auth_username and '
                                     "auth_password_file, or credentials in the target")
        elif not password_file:
            t.error("auth_password_file", "missing: the file that holds auth_username's password")
        where = "target" if in_url else "auth_username"
        if ":" in username:
            t.error(where, "the user name must not contain ':' (HTTP Basic auth, RFC 7617)")
        if any(ord(c) < 32 or ord(c) == 127 for c in username):
            t.error(where, "the user name must not contain control characters")
        out["auth_username"] = username
        out["auth_password_file"] = os.path.abspath(password_file) if password_file else ""
    elif auth_type == "oauth2":
        for key in _AUTH_KEYS["oauth2"]:
            if not given[key]:
                t.error(key, 'missing: auth_type "oauth2" needs auth_token_url, auth_client_id and '
                             "auth_client_secret_file")
        token_url = given["auth_token_url"]
        if token_url:
            problem = _check_url(token_url)
            if problem is None and split_credentials(token_url).username is not None:
                problem = "must not hold credentials; the client's are auth_client_id and its secret file"
            if problem:
                t.error("auth_token_url", problem)
        if any(ord(c) < 32 or ord(c) == 127 for c in given["auth_client_id"]):
            t.error("auth_client_id", "must not contain control characters")
        secret_file = given["auth_client_secret_file"]
        out.update(auth_token_url=token_url, auth_client_id=given["auth_client_id"],
                   auth_client_secret_file=os.path.abspath(secret_file) if secret_file else "")
    return out


def _read_webhook(t: Table) -> WebhookConfig | None:
    """The table as a ``WebhookConfig``, or None if it has problems (already recorded)."""
    d = WebhookConfig
    known_problems = len(t.problems)
    written = t.str("target", "", allow_empty=False)
    credentials = Credentials("", None, None)
    target = ""
    if not t.has("target"):
        t.error("target", "missing: the http(s) URL that receives the batches")
    elif written:
        problem = _check_url(written)
        if problem:
            t.error("target", problem)
        else:
            credentials = split_credentials(written)
            target = credentials.url
    events = t.str_list("events", tuple(EVENT_TYPES))
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown:
        t.error("events", f"unknown event type(s) {', '.join(map(show, unknown))}; "
                          f"expected some of {', '.join(EVENT_TYPES)}")
    elif t.has("events") and not events:
        t.error("events", "must name at least one event type")
    auth = _read_auth(t, credentials)
    tls_ca_file = optional_path(t, "tls_ca_file", "")
    if tls_ca_file and target and not target.lower().startswith("https:") and not (
            auth.get("auth_token_url", "").lower().startswith("https:")):
        t.error("tls_ca_file", "set, but the target is not an https:// URL")
    name = t.str("name", "", allow_empty=False)
    if name and not _WEBHOOK_NAME_RE.fullmatch(name):
        t.error("name", f"expected letters, digits, '.', '_' or '-' (at most 64), got {show(name)}")
    c = WebhookConfig(
        where=t.path,
        name=name or (_default_webhook_name(target) if target else ""),
        target=target,
        events=frozenset(events),
        tls_ca_file=tls_ca_file,
        max_batch_size=t.int("max_batch_size", d.max_batch_size, minimum=1, maximum=10000),
        max_batch_bytes=t.size("max_batch_bytes", d.max_batch_bytes),
        batch_interval=t.duration("batch_interval", d.batch_interval),
        timeout=t.duration("timeout", d.timeout),
        retry_initial=t.duration("retry_initial", d.retry_initial),
        retry_max=t.duration("retry_max", d.retry_max),
        retry_lifetime=t.duration("retry_lifetime", d.retry_lifetime),
        **auth,
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
