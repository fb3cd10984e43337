"""Enhanced status codes (RFC 2034, RFC 3463) for replies written without one."""

from __future__ import annotations

import re

# Replies whose text carries no enhanced status code get this one (RFC 2034, RFC 3463).
_DEFAULT_ENHANCED = {
    221: b"2.0.0", 235: b"2.7.0", 250: b"2.0.0", 252: b"2.5.2",
    421: b"4.3.0", 451: b"4.3.0", 452: b"4.5.3", 454: b"4.7.0",
    500: b"5.5.2", 501: b"5.5.4", 502: b"5.5.1", 503: b"5.5.1", 504: b"5.5.4",
    530: b"5.7.0", 535: b"5.7.8", 538: b"5.7.11", 550: b"5.0.0", 552: b"5.3.4",
    553: b"5.1.7", 554: b"5.0.0", 555: b"5.5.4",
}
_ENHANCED_RE = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}(?: |$)")


def with_enhanced_code(code: int, message: bytes) -> bytes:
    """``message`` with every line starting with an enhanced status code; 3xx replies carry none."""
    if not (200 <= code < 300 or 400 <= code < 600):
        return message
    default = _DEFAULT_ENHANCED.get(code, b"%d.0.0" % (code // 100))
    return b"\n".join(
        line if _ENHANCED_RE.match(line) else default + (b" " + line if line else b"")
        for line in (message.splitlines() or [b""])
    )
