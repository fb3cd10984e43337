"""
Where each tracking setting of a copy came from: the policy, the header, or the configuration.

``settings.resolve`` decides the values; this module says, for each, which
of its inputs won, in the same order (SPEC §4): the policy's ``smtpapi_*``
variable, then the ``X-MSYS-API`` field, then the listener's ``smtpapi``
table, then ``[smtpapi]``, then the default. The configuration's part is
read from the TOML file itself, because a listener that repeats the global
value still set it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.config import Config, ListenerConfig
from appliance.settings import ContextSettings, MsysApi, Tracking


@dataclass(frozen=True)
class SettingRow:
    name: str
    value: str  # as an operator reads it
    source: str


def _table(data: Mapping[str, Any], *path: str) -> Mapping[str, Any]:
    for key in path:
        value = data.get(key)
        if not isinstance(value, Mapping):
            return {}
        data = value
    return data


def config_source(toml: Mapping[str, Any], listener: str, key: str) -> str:
    """Which table of the configuration file set ``smtpapi.<key>`` for this listener."""
    if key in _table(toml, "smtp", "listeners", listener, "smtpapi"):
        return f"listener configuration (smtp.listeners.{listener}.smtpapi.{key})"
    if key in _table(toml, "smtpapi"):
        return f"configuration (smtpapi.{key})"
    return f"default (smtpapi.{key})"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict | list | tuple):
        return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False,
                          separators=(",", ":"))
    return str(value) if value != "" else "(none)"


def setting_rows(toml: Mapping[str, Any], listener: ListenerConfig, config: Config, header: MsysApi,
                 context: ContextSettings, tracking: Tracking) -> list[SettingRow]:
    """Every setting of the copy with the input it came from; values are ``tracking``'s own."""
    name = listener.name

    def pick(setting: str, policy_value: Any, header_field: str | None, header_value: Any,
             config_key: str | None) -> str:
        if policy_value is not None:
            return f"policy hook (smtpapi_{setting})"
        if header_field is not None and header_value is not None:
            return f"X-MSYS-API {header_field}"
        if config_key is None:
            return "not set"
        return config_source(toml, name, config_key)

    expiry = context.tracking_link_expiry
    expiry_source = ("policy hook (smtpapi_tracking_link_expiry)" if expiry is not None
                     else config_source(toml, name, "tracking_link_expiry"))
    expires = datetime.fromtimestamp(tracking.expiry, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    include = ("configuration (engagement_tracker.click_tracking_include_metadata)"
               if "click_tracking_include_metadata" in _table(toml, "engagement_tracker")
               else "default (engagement_tracker.click_tracking_include_metadata)")
    max_links = ("configuration (smtpapi.max_tracked_links)" if "max_tracked_links" in _table(toml, "smtpapi")
                 else "default (smtpapi.max_tracked_links)")
    rows = [
        ("open_tracking", tracking.open_tracking,
         pick("open_tracking", context.open_tracking, "options.open_tracking", header.open_tracking,
              "open_tracking_enabled")),
        ("click_tracking", tracking.click_tracking,
         pick("click_tracking", context.click_tracking, "options.click_tracking", header.click_tracking,
              "click_tracking_enabled")),
        ("campaign_id", tracking.campaign_id,
         pick("campaign_id", context.campaign_id, "campaign_id", header.campaign_id, None)),
        ("metadata", tracking.metadata,
         pick("metadata", context.metadata, "metadata", header.metadata, None)),
        ("tags", tracking.tags, pick("tags", context.tags, "tags", header.tags, None)),
        ("open_tracking_scheme", tracking.open_tracking_scheme,
         pick("open_tracking_scheme", context.open_tracking_scheme, None, None, "open_tracking_scheme")),
        ("click_tracking_scheme", tracking.click_tracking_scheme,
         pick("click_tracking_scheme", context.click_tracking_scheme, None, None, "click_tracking_scheme")),
        ("tracking_domain", tracking.tracking_domain,
         pick("tracking_domain", context.tracking_domain, None, None, "tracking_domain")),
        ("link expiry", f"{expires} ({tracking.expiry})", expiry_source),
        ("initial_open", tracking.initial_open, config_source(toml, name, "initial_open")),
        ("metadata in click links", tracking.include_metadata, include),
        ("max_tracked_links", config.smtpapi.max_tracked_links, max_links),
    ]
    return [SettingRow(setting, _show(value), source) for setting, value, source in rows]
