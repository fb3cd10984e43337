"""The DATA reader: the message text of one transaction, read whole and checked as it comes."""

from __future__ import annotations

from collections.abc import Callable

MAX_LINE = 998  # RFC 5321 §4.5.3.1.6, without the CRLF

class DataReader:
    """
    Reads the message text of one DATA command, up to the lone ``.`` line.

    Pure byte handling, no I/O: ``feed`` passes dot-unstuffed text to
    ``sink`` and notes, instead of acting on, every problem (a line over 998
    octets, a bare CR or LF, more bytes than allowed). Once a problem is noted
    nothing more reaches the sink, but reading goes on to the real end of the
    message, so no line of the body is ever taken for a command. Only CRLF . CRLF
    ends the text: ``<LF>.<LF>`` and friends are data (and bare newlines).
    """

    def __init__(self, sink: Callable[[bytes], None], max_size: int) -> None:
        self.sink = sink
        self.max_size = max_size
        self.size = 0
        self.line_too_long = False
        self.bare_newline = False
        self.too_big = False
        self._buffer = b""
        # False while the buffer holds the middle of a line whose start was dropped.
        self._at_line_start = True

    @property
    def refused(self) -> bool:
        return self.line_too_long or self.bare_newline or self.too_big

    def refusal(self) -> tuple[int, bytes] | None:
        """The reply to the final dot of a message that is not taken, the worst problem first."""
        if self.too_big:
            return 552, b"5.3.4 Message too big"
        if self.bare_newline:
            return 554, b"5.6.0 Bare CR or LF in message text is not allowed"
        if self.line_too_long:
            return 554, b"5.6.0 Message has a line longer than 998 octets"
        return None

    def feed(self, data: bytes) -> bytes | None:
        """Take more bytes; returns ``None`` until the end, then whatever follows it."""
        buf = self._buffer + data
        if self._at_line_start and buf.startswith(b".\r\n"):
            end, rest = 0, buf[3:]
        else:
            i = buf.find(b"\r\n.\r\n")
            end, rest = (i + 2, buf[i + 5 :]) if i >= 0 else (-1, None)
        if rest is not None:
            self._buffer = b""
            self._take(buf[:end])
            return rest
        j = buf.rfind(b"\r\n")
        cut = j + 2 if j >= 0 else 0
        # The unfinished last line stays buffered: it may be the start of the final ".".
        self._take(buf[:cut])
        tail = buf[cut:]
        if len(tail) > MAX_LINE + 1:  # 998 octets and possibly the CR of its CRLF
            self.line_too_long = True
            self.size += len(tail) - 1
            tail = tail[-1:]
            self._at_line_start = False
        self._buffer = tail
        return None

    def _take(self, text: bytes) -> None:
        """Check and pass on ``text``, which ends at a line end (or is empty)."""
        if not text:
            return
        at_start, self._at_line_start = self._at_line_start, True
        self.size += len(text)
        if self.size > self.max_size:
            self.too_big = True
        crlf = text.count(b"\r\n")
        if text.count(b"\r") != crlf or text.count(b"\n") != crlf:
            self.bare_newline = True
        if max(map(len, text.split(b"\n"))) > MAX_LINE + 1:
            self.line_too_long = True
        if self.refused:
            return
        if at_start and text[:1] == b".":
            text = text[1:]
        self.sink(text.replace(b"\r\n.", b"\r\n"))
