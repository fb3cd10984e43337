"""
``[dkim]`` for one signing key, or ``[[dkim]]`` tables for several.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from appliance.config.tables import Table, optional_path
from appliance.config.values import describe, show
from appliance.dkim import DEFAULT_HEADERS
from appliance.headers import is_field_name


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
    key_file = optional_path(t, "key_file", "")
    headers = tuple(h.strip().lower() for h in t.str_list("headers", DEFAULT_HEADERS))
    ok = True
    for name in ("domain", "selector", "key_file"):
        if not t.has(name):
            t.error(name, "missing: a DKIM key needs domain, selector and key_file")
            ok = False
    if domain and not _DOMAIN_RE.fullmatch(domain):
        t.error("domain", f"expected a domain name such as \"example.com\", got {show(domain)}")
        ok = False
    if selector and not _SELECTOR_RE.fullmatch(selector):
        t.error("selector", f"expected a selector such as \"s2025\", got {show(selector)}")
        ok = False
    bad = [h for h in headers if not is_field_name(h)]
    if bad:
        t.error("headers", f"not header field names: {', '.join(map(show, bad))}")
        ok = False
    elif "from" not in headers:
        t.error("headers", "must include \"From\" (RFC 6376 requires it to be signed)")
        ok = False
    elif len(set(headers)) != len(headers):
        t.error("headers", "lists a field twice (every instance of a field is signed anyway)")
        ok = False
    t.finish()
    return DkimKeyConfig(domain, selector, key_file, headers, t.path), ok


def read_dkim(top: Table) -> tuple[DkimKeyConfig, ...]:
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
        top.error("dkim", f"expected a table or an array of tables, got {describe(data)}")
        return ()
    keys: list[DkimKeyConfig] = []
    unchecked: list[DkimKeyConfig] = []
    for path, item in entries:
        t = top.entry(item, path)
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
