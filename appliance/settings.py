"""
Per-message tracking settings: the ``X-MSYS-API`` header and the precedence rules.

Each setting is resolved on its own, highest first: the policy's ``smtpapi_*``
context variable, then the ``X-MSYS-API`` field, then the listener's
``smtpapi`` configuration (SPEC §4). Everything here is a pure function of its
inputs, so every rule can be tested without a server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from email.message import Message
from typing import Any

from appliance.config import EngagementTrackerConfig, SmtpapiConfig, is_host_port, parse_duration
from appliance.headers import decode_encoded_words, unfold

HEADER = "X-MSYS-API"
MAX_CAMPAIGN_ID_BYTES = 64
MAX_TAGS = 10  # Momentum keeps the first ten and ignores the rest
MAX_TAG_BYTES = 64  # SparkPost's limit; every tag rides in every tracked link of the copy
MAX_NESTING = 100  # arrays and objects inside each other; JSON tools recurse on them
# The fields of X-MSYS-API the appliance reads; any other is ignored, and named in the
# injection event (``msys_api_unknown_fields``) so a misspelt one is seen.
KNOWN_FIELDS = frozenset({"campaign_id", "metadata", "tags", "options"})
KNOWN_OPTIONS = frozenset({"open_tracking", "click_tracking", "initial_open", "transactional"})


class MsysApiError(ValueError):
    """A refused ``X-MSYS-API`` header; ``str()`` is the SMTP reply text after ``5.6.0``."""


class PolicyValueError(ValueError):
    """A policy set an ``smtpapi_*`` context variable to a value that is not allowed."""


@dataclass(frozen=True)
class MsysApi:
    """What a valid ``X-MSYS-API`` header says; ``None`` where it says nothing."""

    open_tracking: bool | None = None
    click_tracking: bool | None = None
    campaign_id: str | None = None
    metadata: dict[str, Any] | None = None
    tags: tuple[str, ...] | None = None
    transactional: bool | None = None
    initial_open: bool | None = None  # whether the copy gets the pixel at the top as well
    # What Momentum's limits left out rather than refuse: how many tags past the tenth were
    # ignored, whether the metadata is too long to ride in links, and the fields not read.
    tags_ignored: int = 0
    metadata_oversized: bool = False
    unknown_fields: tuple[str, ...] = ()


# -- X-MSYS-API -------------------------------------------------------------------

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads with an option builds a decoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _loads(text: str) -> Any:
    return _DECODER.decode(text)


def _compact_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def _string_problem(value: Any) -> str | None:
    """
    What is wrong with the strings and numbers of a parsed JSON value, if anything.

    A CR or LF could end a header line; a lone surrogate (``"\\ud800"``) is
    not text and fails wherever the value is written as UTF-8 (spool, event
    log, links); a number too large for a float (``1e999``) parses as
    infinity, which strict JSON cannot write back. Walked without recursion, and nesting is bounded, because
    everything that later serialises the value recurses.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\r" in item or "\n" in item:
                return "must not contain CR or LF"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "must not contain a lone surrogate (not Unicode text)"
        elif isinstance(item, float) and not math.isfinite(item):
            return "must not contain a number out of range (it would be Infinity)"
        elif isinstance(item, dict | list):
            if depth >= MAX_NESTING:
                return f"must not be nested more than {MAX_NESTING} levels deep"
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
    return None


def _check_tags(tags: list[str]) -> str | None:
    if any(len(t.encode()) > MAX_TAG_BYTES for t in tags):
        return f"must not contain a tag longer than {MAX_TAG_BYTES} bytes"
    return None


def _field_name(name: str) -> str:
    """A field name fit for an SMTP reply: printable ASCII, not too long."""
    clean = "".join(c if " " <= c <= "~" and c != "'" else "?" for c in name)
    return clean[:64]


def header_values(headers: Message) -> list[str]:
    """The raw values of every ``X-MSYS-API`` field (``get_all`` would wrap 8-bit ones)."""
    return [v for k, v in headers.raw_items() if k.lower() == "x-msys-api"]


def parse_msys_api(values: list[str], max_metadata_len: int) -> MsysApi:
    """
    The header's settings, or ``MsysApiError`` naming the field at fault.

    ``values`` are the raw values of every ``X-MSYS-API`` field of the
    message, as the header parser gives them (folding intact, 8-bit text as
    surrogate escapes).
    """
    if not values:
        return MsysApi()
    if len(values) > 1:
        raise MsysApiError(f"{HEADER} must not appear more than once")
    raw = values[0]
    try:
        raw = raw.encode("ascii", "surrogateescape").decode("utf-8")
    except UnicodeError:
        raise MsysApiError(f"{HEADER} is not valid UTF-8") from None
    try:
        text = decode_encoded_words(unfold(raw), strict=True)
    except ValueError:
        raise MsysApiError(f"{HEADER} has an encoded word that cannot be decoded") from None
    try:
        data = _loads(text)
    except RecursionError:
        raise MsysApiError(f"{HEADER} is nested too deeply") from None
    except ValueError:
        raise MsysApiError(f"{HEADER} is not valid JSON") from None
    if not isinstance(data, dict):
        raise MsysApiError(f"{HEADER} must be of type 'json object'")

    def wrong(name: str, kind: str) -> MsysApiError:
        return MsysApiError(f"{HEADER} '{name}' must be of type '{kind}'")

    for name, value in data.items():
        problem = _string_problem(name) or _string_problem(value)
        if problem:
            raise MsysApiError(f"{HEADER} '{_field_name(name)}' {problem}")

    options = data.get("options", {})
    if not isinstance(options, dict):
        raise wrong("options", "json object")
    unknown = [_field_name(k) for k in data if k not in KNOWN_FIELDS]
    unknown += [f"options.{_field_name(k)}" for k in options if k not in KNOWN_OPTIONS]
    flags: dict[str, bool | None] = {}
    for name in ("open_tracking", "click_tracking", "initial_open", "transactional"):
        value = options.get(name)
        if value is not None and not isinstance(value, bool):
            raise wrong(f"options.{name}", "boolean")
        flags[name] = value

    campaign_id = data.get("campaign_id")
    if campaign_id is not None:
        if not isinstance(campaign_id, str):
            raise wrong("campaign_id", "string")
        if len(campaign_id.encode()) > MAX_CAMPAIGN_ID_BYTES:
            raise MsysApiError(f"{HEADER} 'campaign_id' must not be longer than "
                               f"{MAX_CAMPAIGN_ID_BYTES} bytes")

    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise wrong("metadata", "json object")

    tags = data.get("tags")
    ignored = 0
    if tags is not None:
        if not isinstance(tags, list):
            raise wrong("tags", "array")
        if not all(isinstance(t, str) for t in tags):
            raise MsysApiError(f"{HEADER} 'tags' must be an array of strings")
        tags, ignored = tuple(tags[:MAX_TAGS]), max(0, len(tags) - MAX_TAGS)
        problem = _check_tags(list(tags))
        if problem:
            raise MsysApiError(f"{HEADER} 'tags' {problem}")

    return MsysApi(open_tracking=flags["open_tracking"], click_tracking=flags["click_tracking"],
                   initial_open=flags["initial_open"], campaign_id=campaign_id, metadata=metadata,
                   tags=tags, tags_ignored=ignored,
                   metadata_oversized=metadata is not None and _compact_size(metadata) > max_metadata_len,
                   unknown_fields=tuple(unknown), transactional=flags["transactional"])


# -- policy context variables ---------------------------------------------------------

CONTEXT_VARIABLES = (
    "smtpapi_open_tracking",
    "smtpapi_click_tracking",
    "smtpapi_campaign_id",
    "smtpapi_metadata",
    "smtpapi_tags",
    "smtpapi_open_tracking_scheme",
    "smtpapi_click_tracking_scheme",
    "smtpapi_tracking_domain",
    "smtpapi_tracking_link_expiry",
    "smtpapi_transactional",
)

_TRUE = ("1", "true")
_FALSE = ("0", "false")


def _context_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise PolicyValueError(f"{name} must be \"1\", \"0\", \"true\" or \"false\", got {value!r}")


def _context_json(name: str, value: str, kind: type) -> Any:
    try:
        data = _loads(value)
    except RecursionError:
        raise PolicyValueError(f"{name} is nested too deeply") from None
    except ValueError:
        raise PolicyValueError(f"{name} is not valid JSON: {value[:80]!r}") from None
    if not isinstance(data, kind):
        raise PolicyValueError(f"{name} must be a JSON {'object' if kind is dict else 'array'}")
    problem = _string_problem(data)
    if problem:
        raise PolicyValueError(f"{name} {problem}")
    return data


@dataclass(frozen=True)
class ContextSettings:
    """The policy's ``smtpapi_*`` variables, checked and typed; ``None`` where unset."""

    open_tracking: bool | None = None
    click_tracking: bool | None = None
    campaign_id: str | None = None
    metadata: dict[str, Any] | None = None
    tags: tuple[str, ...] | None = None
    open_tracking_scheme: str | None = None
    click_tracking_scheme: str | None = None
    tracking_domain: str | None = None
    tracking_link_expiry: float | None = None
    transactional: bool | None = None
    tags_ignored: int = 0  # as ``MsysApi``'s
    metadata_oversized: bool = False


def parse_context(context: Mapping[str, Any], max_metadata_len: int) -> ContextSettings:
    """Check the variables a policy set; raises ``PolicyValueError`` naming the first bad one."""
    values: dict[str, Any] = {}
    for name in CONTEXT_VARIABLES:
        if name not in context:
            continue
        value = context[name]
        if not isinstance(value, str):
            raise PolicyValueError(f"{name} must be a string, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PolicyValueError(f"{name} must not contain a lone surrogate (not Unicode text)") from None
        key = name.removeprefix("smtpapi_")
        if key in ("open_tracking", "click_tracking", "transactional"):
            values[key] = _context_bool(name, value)
        elif key == "campaign_id":
            if "\r" in value or "\n" in value:
                raise PolicyValueError(f"{name} must not contain CR or LF")
            if len(value.encode()) > MAX_CAMPAIGN_ID_BYTES:
                raise PolicyValueError(f"{name} must not be longer than {MAX_CAMPAIGN_ID_BYTES} bytes")
            values[key] = value
        elif key == "metadata":
            metadata = _context_json(name, value, dict)
            values["metadata_oversized"] = _compact_size(metadata) > max_metadata_len
            values[key] = metadata
        elif key == "tags":
            tags = _context_json(name, value, list)
            if not all(isinstance(t, str) for t in tags):
                raise PolicyValueError(f"{name} must be a JSON array of strings")
            values[key] = tuple(tags[:MAX_TAGS])
            values["tags_ignored"] = max(0, len(tags) - MAX_TAGS)
            problem = _check_tags(list(values[key]))
            if problem:
                raise PolicyValueError(f"{name} {problem}")
        elif key in ("open_tracking_scheme", "click_tracking_scheme"):
            if value not in ("http", "https"):
                raise PolicyValueError(f"{name} must be \"http\" or \"https\", got {value!r}")
            values[key] = value
        elif key == "tracking_domain":
            if not is_host_port(value):
                raise PolicyValueError(f"{name} must be host[:port], got {value!r}")
            values[key] = value
        elif key == "tracking_link_expiry":
            try:
                values[key] = parse_duration(value)
            except ValueError as e:
                raise PolicyValueError(f"{name}: {e}") from None
    return ContextSettings(**values)


# -- resolution -----------------------------------------------------------------------


@dataclass(frozen=True)
class Tracking:
    """
    One recipient's resolved settings: what its copy is made with.

    Stored in the spool envelope (``Recipient.tracking``), so a copy made
    after a restart is the same copy. ``to_json`` is that stored form; the
    spool's ``appliance.envelope.ENVELOPE_SCHEMA`` changes whenever it does.
    """

    open_tracking: bool = False
    click_tracking: bool = False
    campaign_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    open_tracking_scheme: str = "http"
    click_tracking_scheme: str = "http"
    tracking_domain: str = "localhost:8080"
    expiry: int = 0  # absolute Unix time at which the copy's links stop producing events
    initial_open: bool = True
    include_metadata: bool = True
    # SparkPost's options.transactional: a transactional copy gets no List-Unsubscribe and
    # only a transactional suppression stops it.
    transactional: bool = False
    # The copy carries RFC 8058's one-click List-Unsubscribe (never a transactional one),
    # with a mailto: form to this address when it is not "".
    list_unsubscribe: bool = False
    list_unsubscribe_mailto: str = ""
    # False when the metadata is longer than ``max_metadata_len``: events carry it, links do not.
    metadata_in_links: bool = True

    @property
    def enabled(self) -> bool:
        return self.open_tracking or self.click_tracking

    def to_json(self) -> dict[str, Any]:
        """
        The record as a JSON object, every field by name, to be serialised as it is.

        Its metadata is the record's own, not a copy: ``dataclasses.asdict``'s
        deep copy cost 25 us for every recipient spooled, twenty times the rest.
        """
        d = {name: getattr(self, name) for name in _TRACKING_FIELDS}
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Tracking:
        """
        The record ``to_json`` wrote; a field it lacks keeps its default.

        An empty object is the default record: what envelope schema 1 stored
        for a recipient built without settings.
        """
        d = dict(d)
        if "tags" in d:
            d["tags"] = tuple(d["tags"])
        return cls(**d)


_TRACKING_FIELDS = tuple(f.name for f in fields(Tracking))


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def is_transactional(header: MsysApi, context: ContextSettings) -> bool:
    """SparkPost's ``options.transactional``: the policy's, else the header's, else false."""
    return bool(_first(context.transactional, header.transactional, False))


def resolve(config: SmtpapiConfig, tracker: EngagementTrackerConfig, header: MsysApi,
            context: ContextSettings, received_at: float) -> Tracking:
    """
    Each setting on its own: policy, then header, then configuration.

    A transactional message (policy or header) gets no List-Unsubscribe,
    whatever the listener's or the global ``list_unsubscribe`` says.
    """
    transactional = is_transactional(header, context)
    list_unsubscribe = config.list_unsubscribe and not transactional
    oversized = context.metadata_oversized if context.metadata is not None else header.metadata_oversized
    return Tracking(
        open_tracking=_first(context.open_tracking, header.open_tracking, config.open_tracking_enabled),
        click_tracking=_first(context.click_tracking, header.click_tracking,
                              config.click_tracking_enabled),
        campaign_id=_first(context.campaign_id, header.campaign_id, ""),
        metadata=_first(context.metadata, header.metadata, {}),
        tags=_first(context.tags, header.tags, ()),
        open_tracking_scheme=_first(context.open_tracking_scheme, config.open_tracking_scheme),
        click_tracking_scheme=_first(context.click_tracking_scheme, config.click_tracking_scheme),
        tracking_domain=_first(context.tracking_domain, config.tracking_domain),
        expiry=int(received_at + _first(context.tracking_link_expiry, config.tracking_link_expiry)),
        initial_open=_first(header.initial_open, config.initial_open),
        include_metadata=tracker.click_tracking_include_metadata and not oversized,
        metadata_in_links=not oversized,
        transactional=transactional,
        list_unsubscribe=list_unsubscribe,
        list_unsubscribe_mailto=config.list_unsubscribe_mailto if list_unsubscribe else "",
    )


def limit_notes(header: MsysApi, context: ContextSettings) -> dict[str, Any]:
    """
    What the injection event says Momentum's limits left out of one recipient's settings.

    ``rcpt_tags_ignored``: tags past the tenth, ignored; ``rcpt_meta_left_out_of_links``:
    metadata longer than ``max_metadata_len``, carried by events but not by links;
    ``msys_api_unknown_fields``: X-MSYS-API fields the appliance does not read.
    """
    notes: dict[str, Any] = {}
    ignored = context.tags_ignored if context.tags is not None else header.tags_ignored
    if ignored:
        notes["rcpt_tags_ignored"] = ignored
    if context.metadata_oversized if context.metadata is not None else header.metadata_oversized:
        notes["rcpt_meta_left_out_of_links"] = True
    if header.unknown_fields:
        notes["msys_api_unknown_fields"] = list(header.unknown_fields)
    return notes
