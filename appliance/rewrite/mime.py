"""
The MIME walk and the transfer encodings: which parts to track, and how to write them back.

``find_parts`` finds the first ``text/html`` and ``text/plain`` parts that
are not attachments, by their positions in the message's bytes (nothing is
parsed into objects and written out again). A part's body is decoded from
its Content-Transfer-Encoding and charset, and a changed part is written
back in the same encoding, or as quoted-printable when it no longer fits
7bit (with its header saying so).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from dataclasses import dataclass
from email.message import Message

from appliance.headers import Field, read_header
from appliance.rewrite.errors import MimeError, PartSkipped

MAX_DEPTH = 20  # multipart nesting
MAX_PART_BYTES = 8 * 1024 * 1024  # larger parts are delivered as they are
MAX_LINE = 998


@dataclass
class Candidate:
    """A part worth tracking: where it is, its header fields and its content headers."""

    kind: str  # "html" or "text"
    start: int
    body_start: int
    end: int
    fields: list[Field]
    info: Message


def _content_info(fields: list[Field], default_type: str) -> Message:
    info = Message()
    info.set_default_type(default_type)
    for f in fields:
        if f.name in ("content-type", "content-disposition", "content-transfer-encoding"):
            info[f.name] = " ".join(f.value.decode("latin-1").split())
    return info


def _delimiters(data: bytes, start: int, end: int, boundary: bytes) -> list[re.Match[bytes]]:
    pattern = re.compile(rb"^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$", re.MULTILINE)
    return list(pattern.finditer(data, start, end))


def find_parts(data: bytes, start: int = 0) -> tuple[list[Candidate], list[str]]:
    """The first text/html and text/plain parts that are not attachments, in message order."""
    found: dict[str, Candidate] = {}
    notes: list[str] = []
    _walk(data, start, len(data), 0, "text/plain", found, notes)
    return sorted(found.values(), key=lambda c: c.start), notes


def _walk(data: bytes, start: int, end: int, depth: int, default_type: str,
          found: dict[str, Candidate], notes: list[str]) -> None:
    if len(found) == 2:
        return
    block = read_header(data, start, end)
    if block.error:
        raise MimeError(block.error)
    fields, body_start = block.fields, block.body_start
    info = _content_info(fields, default_type)
    ctype = info.get_content_type()
    maintype, subtype = ctype.split("/", 1)
    if maintype == "multipart":
        if subtype in ("signed", "encrypted"):
            notes.append(f"a {ctype} entity is never changed (it would break the signature)")
            return
        if depth >= MAX_DEPTH:
            raise MimeError(f"multipart nested more than {MAX_DEPTH} levels deep")
        boundary = info.get_boundary()
        if not boundary:
            raise MimeError(f"{ctype} without a boundary")
        try:
            b = boundary.encode("ascii")
        except UnicodeError:
            raise MimeError(f"{ctype} with a non-ASCII boundary") from None
        delimiters = _delimiters(data, body_start, end, b)
        if not delimiters:
            raise MimeError(f"{ctype} boundary {boundary!r} never appears")
        closing = next((i for i, m in enumerate(delimiters) if m.group(1)), None)
        if closing is None:
            raise MimeError(f"{ctype} boundary {boundary!r} is never closed")
        child_default = "message/rfc822" if subtype == "digest" else "text/plain"
        for m, following in zip(delimiters[:closing], delimiters[1:closing + 1], strict=True):
            part_start = min(m.end() + 1, end)
            part_end = max(part_start, following.start() - 2)
            _walk(data, part_start, part_end, depth + 1, child_default, found, notes)
        return
    if maintype != "text" or subtype not in ("html", "plain"):
        return  # message/rfc822 and every other type are not looked into
    if info.get_content_disposition() == "attachment":
        return
    kind = "html" if subtype == "html" else "text"
    if kind not in found:
        found[kind] = Candidate(kind, start, body_start, end, fields, info)


_CTE_FIELD = b"Content-Transfer-Encoding: quoted-printable\r\n"


def qp_header(data: bytes, c: Candidate, top_level: bool) -> bytes:
    """The part's header block, saying quoted-printable (and MIME, if it did not)."""
    out = []
    for f in c.fields:
        if f.name == "content-transfer-encoding":
            continue
        out.append(data[f.start:f.end])
    names = {f.name for f in c.fields}
    if "content-type" not in names:
        out.append(b"Content-Type: text/plain; charset=us-ascii\r\n")
    if top_level and "mime-version" not in names:
        out.append(b"MIME-Version: 1.0\r\n")
    out.append(_CTE_FIELD)
    out.append(data[c.fields[-1].end if c.fields else c.start:c.body_start])
    return b"".join(out)


def decode_body(body: bytes, cte: str) -> bytes:
    if cte in ("7bit", "8bit", "binary"):
        return body
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    if cte == "base64":
        try:
            return binascii.a2b_base64(re.sub(rb"[\t\r\n ]+", b"", body), strict_mode=True)
        except binascii.Error as e:
            raise PartSkipped(f"its base64 does not decode ({e})") from None
    raise PartSkipped(f"unknown Content-Transfer-Encoding {cte!r}")


def charset_of(info: Message) -> str:
    charset = info.get_content_charset() or "us-ascii"
    try:
        codec = codecs.lookup(charset)
    except LookupError:
        raise PartSkipped(f"unknown charset {charset!r}") from None
    probe = '<a href="https://x/?a=1&b=2#c">{}</a>[]\r\n'
    try:
        if probe.encode(codec.name) != probe.encode("ascii"):
            raise PartSkipped(f"charset {charset!r} is not ASCII-compatible")
    except UnicodeError:
        raise PartSkipped(f"charset {charset!r} is not ASCII-compatible") from None
    return codec.name


# -- re-encoding ------------------------------------------------------------------------------


def encode_qp(raw: bytes, bare_newlines: bool | None = None, has_crlf: bool | None = None) -> bytes:
    """
    Quoted-printable with CRLF line ends only; bare CR and LF in the text become =0D/=0A.

    A caller that knows whether ``raw`` has bare newlines or any CRLF says so,
    which saves scanning it.
    """
    if bare_newlines is None or has_crlf is None:
        crlf = raw.count(b"\r\n")
        bare_newlines = raw.count(b"\r") != crlf or raw.count(b"\n") != crlf
        has_crlf = crlf > 0
    if not bare_newlines:
        out = binascii.b2a_qp(raw, quotetabs=False, istext=True)
        if not has_crlf:
            out = out.replace(b"\n", b"\r\n")  # only soft line breaks here, written as LF
        return out
    lines = []
    for line in raw.split(b"\r\n"):
        enc = binascii.b2a_qp(line, quotetabs=False, istext=False)
        lines.append(enc.replace(b"=\r\n", b"=\n").replace(b"=\n", b"=\r\n"))
    return b"\r\n".join(lines)


def encode_base64(raw: bytes) -> bytes:
    return base64.encodebytes(raw).replace(b"\n", b"\r\n")


def fits_7bit(raw: bytes) -> bool:
    return raw.isascii() and max(map(len, raw.split(b"\r\n"))) <= MAX_LINE
