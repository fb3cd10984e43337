"""
The one reading of a message's header (RFC 5322 §2.2 and §3.6, RFC 2047).

The rewriter, DKIM, the ``X-MSYS-API`` lookup and the injection events all
read header fields here. Were each to split the header its own way, hostile
input could make them disagree, and DKIM sign something other than what the
rewriter understood. The rules:

- A line ends with CRLF, and only with CRLF: a bare CR or LF is a byte of
  its line (the injection server refuses them in new mail anyway).
- The header block ends at the first empty line; the body starts after it.
  A block without one runs to the end, and the body is empty.
- A line that starts with SP or HTAB continues the field above it (folding).
- Any other line is a field: a name of printable ASCII other than the colon
  (§3.6.8), then optionally SP and HTAB (the obsolete syntax of §4.5.3),
  then the colon.
- The first line that is none of these ends the fields: the ones before it
  are what the message has, and ``HeaderBlock.error`` says why it stopped.

Each field keeps its bytes exactly as they stand, so DKIM signs and the
rewriter copies what arrived. Everything here is a pure function of bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message
from email.policy import compat32

FIELD_NAME = re.compile(rb"[!-9;-~]+")
_WSP = b" \t"
# A whole field by the rules above, continuation lines included (group 1 its name): the
# commonest case in one call. A line that is anything else is read line by line.
_LINE_REST = rb"(?:[^\r]++|\r(?!\n))*+(?:\r\n|\Z)"
_FIELD = re.compile(rb"([!-9;-~]++)[ \t]*+:" + _LINE_REST + rb"(?:[ \t]" + _LINE_REST + rb")*+")


def is_field_name(name: str) -> bool:
    """Whether ``name`` may be a header field's name."""
    return name.isascii() and FIELD_NAME.fullmatch(name.encode("ascii")) is not None


@dataclass(slots=True)
class Field:
    """One header field, where it is in the data it was read from and its bytes."""

    name: str  # lower-cased
    start: int
    end: int  # after its CRLF, if it has one
    raw: bytes = b""  # the field as it stands: name, colon, value, folding and CRLF

    @property
    def written_name(self) -> str:
        """The name as written (without white space before the colon)."""
        return self.raw.partition(b":")[0].rstrip(_WSP).decode("ascii")

    @property
    def folded_value(self) -> bytes:
        """What follows the colon, folding intact, without the field's final CRLF."""
        value = self.raw.partition(b":")[2]
        return value[:-2] if value.endswith(b"\r\n") else value

    @property
    def value(self) -> bytes:
        """What follows the colon, unfolded (§2.2.3); its white space is kept."""
        return self.raw.partition(b":")[2].replace(b"\r\n", b"")


@dataclass(slots=True)
class HeaderBlock:
    fields: list[Field]
    # Where the body starts: after the empty line; at the line that is not a field (``error``);
    # else at the end.
    body_start: int
    separated: bool  # whether an empty line ends the block
    error: str = ""  # why the fields stop at a line that is not one

    def get(self, name: str) -> list[Field]:
        """The fields of one (lower-case) name, in order."""
        return [f for f in self.fields if f.name == name]


def read_header(data: bytes, start: int = 0, end: int | None = None) -> HeaderBlock:
    """The header block at ``start`` (of a message, or of a MIME part ending at ``end``)."""
    end = len(data) if end is None else min(end, len(data))
    fields: list[Field] = []
    find = data.find
    field = _FIELD.match
    pos = start
    block = HeaderBlock(fields, end, False)
    while pos < end:
        m = field(data, pos, end)
        if m is not None:
            pos = m.end()
            fields.append(Field(m[1].decode("ascii").lower(), m.start(), pos, m[0]))
            continue
        eol = find(b"\r\n", pos, end)
        stop, line_end = (eol, eol + 2) if eol >= 0 else (end, end)
        if stop == pos:
            block.body_start, block.separated = line_end, True
            break
        if data[pos] in _WSP:
            if not fields:
                block.body_start, block.error = pos, "the header block starts with a continuation line"
                break
            fields[-1].end = line_end
        else:
            colon = find(b":", pos, stop)
            name = data[pos:colon].rstrip(_WSP) if colon >= 0 else b""
            if not FIELD_NAME.fullmatch(name):
                block.body_start = pos
                block.error = f"not a header field: {data[pos:min(stop, pos + 40)]!r}"
                break
            fields.append(Field(name.decode("ascii").lower(), pos, line_end))
        pos = line_end
    for f in fields:  # sliced once each at the end: joining line by line costs quadratic time
        if not f.raw:  # read line by line (a whole field's match took its continuation lines too)
            f.raw = data[f.start:f.end]
    return block


class HeaderReader:
    """
    ``read_header`` for a message that arrives in pieces, holding a bounded part of it.

    Fed the message as it comes (``feed``), it reads lines by the same rules
    as ``read_header`` and keeps the fields that start within the first
    ``keep_bytes`` of lines, so a header of any length costs no more memory
    than that; fields named in ``always`` are kept wherever they stand, whole
    (``X-MSYS-API``, which must be checked wherever it is, as the rewriter
    strips it wherever it is). A field's continuation lines past the budget
    are left out of it.
    """

    def __init__(self, keep_bytes: int, always: frozenset[str] = frozenset()) -> None:
        self.keep_bytes = keep_bytes
        self.always = always
        self.fields: list[Field] = []
        self.done = False
        self._kept = 0
        self._pos = 0  # stream offset of the start of the pending line
        self._line = bytearray()  # the pending line, while it may be kept
        self._skipping = False  # the pending line is being dropped: only its end is looked for
        self._cr = False  # the dropped pending line's last byte was CR
        self._need_colon = False  # the dropped pending line is a field only if a colon follows
        self._longest = max(map(len, always), default=0)
        self._current: Field | None = None  # the field continuation lines belong to
        self._current_kept = False
        self._parts: dict[int, list[bytes]] = {}  # id of a kept field -> its lines

    def feed(self, data: bytes) -> None:
        pos = 0
        size = len(data)
        while pos < size and not self.done:
            if self._skipping:
                if self._cr and data[pos:pos + 1] == b"\n":
                    end = pos + 1  # the CRLF was cut between two pieces
                else:
                    eol = data.find(b"\r\n", pos)
                    end = eol + 2 if eol >= 0 else -1
                if self._need_colon and data.find(b":", pos, end if end >= 0 else size) >= 0:
                    self._need_colon = False
                if end < 0:
                    self._cr = data.endswith(b"\r")
                    self._pos += size - pos
                    return
                if self._need_colon:  # a line without a colon is not a field: the header ends
                    self.done = True
                    return
                self._pos += end - pos
                pos = end
                self._skipping = self._cr = False
                continue
            if not self._line and (end := self._whole_field(data, pos)):
                pos = end
                continue
            if self._line.endswith(b"\r") and data[pos:pos + 1] == b"\n":
                end = pos + 1  # the CRLF was cut between two pieces
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self._line += data[pos:]
                    self._maybe_skip()
                    return
                end = eol + 2
            self._line += data[pos:end]
            line = bytes(self._line)
            self._line.clear()
            pos = end
            self._take(line)

    def finish(self) -> list[Field]:
        """The fields, once the whole message was fed (a last line without CRLF counts too)."""
        if not self.done and self._line and not self._skipping:
            self._take(bytes(self._line))
            self._line.clear()
        self.done = True
        for f in self.fields:
            parts = self._parts.pop(id(f), None)
            if parts is not None:
                f.raw = b"".join(parts)
        return self.fields

    def _classify(self, line: bytes | bytearray) -> tuple[str, bytes]:
        """("end" | "continuation" | "field" | "unknown", name) of a line, complete or not."""
        if line[:2] == b"\r\n":
            return "end", b""
        if line[:1] in (b" ", b"\t"):
            return "continuation", b""
        stop = line.find(b"\r\n")
        colon = line.find(b":", 0, stop if stop >= 0 else len(line))
        if colon < 0:
            return "unknown", b""
        return "field", bytes(line[:colon]).rstrip(_WSP)

    def _keeps(self, kind: str, name: bytes, length: int) -> bool:
        if kind == "continuation":
            current = self._current
            return current is not None and self._current_kept and (
                current.name in self.always or self._kept + length <= self.keep_bytes)
        return (name.decode("ascii", "replace").lower() in self.always
                or self._kept + length <= self.keep_bytes)

    def _maybe_skip(self) -> None:
        """Drop a pending line that will not be kept, once that is known: its bytes need no memory."""
        kind, name = self._classify(self._line)
        if kind == "continuation" and self._current is None:
            return
        if kind == "unknown":
            # A name still without its colon: longer than any name kept wherever it stands
            # and past the budget, it is dropped as a field, if a colon ever comes.
            pending = bytes(self._line).rstrip(b" \t\r")
            if (len(pending) > self._longest and FIELD_NAME.fullmatch(pending)
                    and pending == bytes(self._line).rstrip(b"\r")
                    and self._kept + len(self._line) > self.keep_bytes):
                self._start_field(pending, kept=False)
                self._cr = self._line.endswith(b"\r")
                self._pos += len(self._line)
                self._line.clear()
                self._skipping = self._need_colon = True
            return
        if kind == "continuation" or (kind == "field" and FIELD_NAME.fullmatch(name)):
            if not self._keeps(kind, name, len(self._line)):
                if kind == "field":
                    self._start_field(name, kept=False)
                elif self._current is not None:
                    self._current_kept = False  # its later continuations are left out too
                self._cr = self._line.endswith(b"\r")
                self._pos += len(self._line)
                self._line.clear()
                self._skipping = True

    def _whole_field(self, data: bytes, pos: int) -> int:
        """
        Keep a whole field at ``pos`` in one step, as ``_take`` would line by line; 0 if not.

        Only a field known to be whole (its last CRLF is followed by a byte
        that does not continue it) and kept whole by the budget: anything
        else is left to the line-by-line reading.
        """
        m = _FIELD.match(data, pos)
        if m is None:
            return 0
        end = m.end()
        if end >= len(data):  # the next piece may continue it, or the message ends without CRLF
            return 0
        raw = m[0]
        name = m[1].decode("ascii").lower()
        if name not in self.always and self._kept + len(raw) > self.keep_bytes:
            return 0
        field = Field(name, self._pos, self._pos + len(raw))
        self._current, self._current_kept = field, True
        self.fields.append(field)
        self._parts[id(field)] = [raw]
        self._kept += len(raw)
        self._pos += len(raw)
        return end

    def _start_field(self, name: bytes, kept: bool) -> None:
        field = Field(name.decode("ascii").lower(), self._pos, self._pos)
        self._current, self._current_kept = field, kept
        if kept:
            self.fields.append(field)
            self._parts[id(field)] = []

    def _take(self, line: bytes) -> None:
        """One whole line (with its CRLF, unless it is the last of the message)."""
        kind, name = self._classify(line)
        length = len(line)
        if kind == "end":
            self.done = True
        elif kind == "continuation":
            if self._current is None:
                self.done = True
            elif self._keeps(kind, name, length):
                self._parts[id(self._current)].append(line)
                self._current.end = self._pos + length
                self._kept += length
            else:
                self._current_kept = False
        elif kind == "field" and FIELD_NAME.fullmatch(name):
            kept = self._keeps(kind, name, length)
            self._start_field(name, kept)
            if kept:
                assert self._current is not None
                self._parts[id(self._current)].append(line)
                self._current.end = self._pos + length
                self._kept += length
        else:
            self.done = True
        self._pos += length


def split_message(message: bytes) -> tuple[HeaderBlock, bytes]:
    """The message's header block and its body."""
    block = read_header(message)
    return block, message[block.body_start:]


def unfold(value: str) -> str:
    """§2.2.3: a line break followed by white space is removed; the white space stays."""
    return _FOLD.sub("", value)


_FOLD = re.compile(r"\r\n(?=[ \t])")


def as_message(fields: Iterable[Field]) -> Message:
    """
    The fields as an ``email.message.Message`` (compat32), for the policy hook and lookups.

    Built from these fields, not parsed again, so it holds exactly the fields
    the rewriter and DKIM see. Values are what compat32's own parser gives:
    folding intact, white space after the colon dropped, 8-bit bytes as
    surrogate escapes.
    """
    message = Message(policy=compat32)
    for f in fields:
        message[f.written_name] = f.folded_value.lstrip(_WSP).decode("ascii", "surrogateescape")
    return message


# -- RFC 2047 encoded words ----------------------------------------------------------------------

# No nested quantifiers, and each run stops at the next "?": linear time on any input.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")
_LINEAR_WHITE_SPACE = " \t\r\n"


class EncodedWordError(ValueError):
    """An encoded word that cannot be decoded (raised only when asked to be strict)."""


@dataclass(slots=True)
class _Word:
    charset: str
    data: bytes | None  # None: the word's own encoding is broken
    written: str
    joined: bool = False  # follows a decodable word with nothing but white space between
    lead: str = ""  # that white space, dropped unless this word fails to decode


def _word(m: re.Match[str]) -> _Word:
    charset, encoding, text = m.groups()
    charset = charset.partition("*")[0]  # RFC 2231 §5: charset*language
    data: bytes | None
    try:
        raw = text.encode("ascii")
        if encoding in "Bb":
            data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
        else:
            data = binascii.a2b_qp(raw, header=True)
    except (ValueError, UnicodeError):
        data = None
    return _Word(charset, data, m.group(0))


def decode_encoded_words(text: str, strict: bool = False) -> str:
    """
    ``text`` with its encoded words decoded; all other text is kept exactly.

    White space between two encoded words goes (§6.2), and adjacent words of
    one charset are decoded together: mailers split a multi-byte character
    across two words. A word that cannot be decoded stays as written, or,
    if ``strict``, raises ``EncodedWordError``. Never raises anything else.
    """
    if "=?" not in text:
        return text
    pieces: list[str | _Word] = []
    pos = 0
    for m in _ENCODED_WORD.finditer(text):
        word = _word(m)
        gap = text[pos:m.start()]
        last = pieces[-1] if pieces else None
        if (not gap.strip(_LINEAR_WHITE_SPACE) and isinstance(last, _Word) and last.data is not None
                and word.data is not None):
            word.joined, word.lead = True, gap
        elif gap:
            pieces.append(gap)
        pieces.append(word)
        pos = m.end()
    pieces.append(text[pos:])
    out: list[str] = []
    i = 0
    while i < len(pieces):
        piece = pieces[i]
        i += 1
        if isinstance(piece, str):
            out.append(piece)
            continue
        run = [piece]
        while (piece.data is not None and i < len(pieces) and isinstance(nxt := pieces[i], _Word)
               and nxt.joined and nxt.charset.lower() == piece.charset.lower()):
            run.append(nxt)
            i += 1
        try:
            if piece.data is None:
                raise ValueError("its encoding is broken")
            decoded = b"".join(w.data or b"" for w in run).decode(piece.charset)
        except (ValueError, LookupError) as e:
            if strict:
                raise EncodedWordError(f"undecodable encoded word {piece.written[:40]!r}: {e}") from None
            out.append("".join(w.lead + w.written for w in run))
        else:
            out.append(decoded)
    return "".join(out)


def readable(value: bytes) -> str:
    """
    A field's value as a person reads it: one line, 8-bit text and encoded words decoded.

    Under 8BITMIME clients send raw UTF-8 in headers (RFC 6532), so raw
    bytes are read as UTF-8, else as Latin-1 (which never fails).
    """
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    return " ".join(decode_encoded_words(" ".join(text.split())).split())
