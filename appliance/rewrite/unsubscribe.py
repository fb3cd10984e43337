"""
RFC 8058 one-click unsubscribe: each non-transactional copy's ``List-Unsubscribe`` fields.

The URL is the tracker's ``/u/`` with a token of kind ``unsubscribe`` that
names the copy (``appliance.links``), always HTTPS as RFC 8058 requires. The
fields go at the end of the copy's header, before DKIM signs it
(``appliance.dkim.ALWAYS_SIGNED``). A copy whose sender wrote its own
``List-Unsubscribe`` keeps it and gets none of ours: the sender runs its own
list management there, and RFC 2369 allows one such field.
"""

from __future__ import annotations

from urllib.parse import quote

from appliance.headers import read_header
from appliance.links import LinkCodec, LinkData, unsubscribe_url
from appliance.settings import Tracking

MAX_LINE = 998  # RFC 5322 §2.1.1: octets in a header line, without its CRLF
POST_FIELD = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
_HEAD = "List-Unsubscribe: "


def _token_variants(tracking: Tracking, message_id: str, transmission_id: str,
                    rcpt_to: str) -> list[LinkData]:
    """The token's contents, richest first: metadata and tags are left out where they do not fit."""
    meta = tracking.metadata if tracking.include_metadata else None
    full = LinkData("unsubscribe", tracking.expiry, message_id, transmission_id, rcpt_to,
                    tracking.campaign_id, tracking.tags, meta)
    return [full, full._replace(metadata=None), full._replace(metadata=None, tags=())]


def list_unsubscribe_fields(codec: LinkCodec, tracking: Tracking, message_id: str,
                            transmission_id: str, rcpt_to: str) -> bytes | None:
    """
    ``List-Unsubscribe`` and ``List-Unsubscribe-Post``, each line within 998 octets; ``None`` if off.

    The https URI comes first, the ``mailto:`` form (to the configured
    address, the token in its subject) on a folded line of its own. A token
    too long for one line with the recipient's metadata is made without it,
    then without the tags: the event then carries what the token kept.
    """
    if not tracking.list_unsubscribe:
        return None
    for data in _token_variants(tracking, message_id, transmission_id, rcpt_to):
        token = codec.encode(data)
        lines = [f"{_HEAD}<{unsubscribe_url(tracking.tracking_domain, token)}>"]
        if tracking.list_unsubscribe_mailto:
            lines[0] += ","
            subject = quote(f"unsubscribe {token}", safe="")
            lines.append(f" <mailto:{tracking.list_unsubscribe_mailto}?subject={subject}>")
        if all(len(line) <= MAX_LINE for line in lines):
            return "\r\n".join(lines).encode("ascii") + b"\r\n" + POST_FIELD
    return None


def add_list_unsubscribe(message: bytes, fields: bytes) -> bytes:
    """
    ``message`` with ``fields`` after its last header field, or as it is.

    As it is when the sender wrote a ``List-Unsubscribe`` (or
    ``List-Unsubscribe-Post``) of its own, or the
    header cannot be read as fields (nothing is added to what a reader
    would not take for a header).
    """
    block = read_header(message)
    if (block.error or not block.fields or block.get("list-unsubscribe")
            or block.get("list-unsubscribe-post")):
        return message
    at = block.fields[-1].end
    if not message.endswith(b"\r\n", 0, at):  # a last field without its CRLF (no body follows)
        return message[:at] + b"\r\n" + fields[:-2] + message[at:]
    return message[:at] + fields + message[at:]
