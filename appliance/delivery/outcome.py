"""
What one delivery attempt of one copy came to, in the terms the events use.

An ``Outcome`` is ``delivery``, ``delay`` or ``bounce`` with the reply that
decided it. Replies the appliance makes up itself (no connection, no DNS,
expiry) are written as Momentum writes them, ``421 4.4.1 [internal] ...``,
so they carry an enhanced status code and classify like any remote reply
(``appliance.bounces``).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.eventtypes import BOUNCE, DELAY, DELIVERY

__all__ = ["BOUNCE", "DELAY", "DELIVERY", "Outcome", "internal", "reply_outcome"]


@dataclass(frozen=True)
class Outcome:
    kind: str  # DELIVERY, DELAY or BOUNCE
    code: int = 0  # the SMTP reply code, real or made up; 0 when there is none
    raw_reason: str = ""  # the reply as the server sent it, or our own explanation
    ip_address: str = ""  # the remote MX's address, when one was reached
    tls: bool = False  # whether the attempt ran over TLS
    sending_ip: str = ""  # the appliance's own address on that connection, when one was made

    @property
    def final(self) -> bool:
        return self.kind != DELAY

    def with_kind(self, kind: str) -> Outcome:
        return Outcome(kind, self.code, self.raw_reason, self.ip_address, self.tls, self.sending_ip)


def reply_outcome(code: int, text: str, ip_address: str = "", tls: bool = False,
                  sending_ip: str = "") -> Outcome:
    """A remote server's reply to a transaction: 2xx delivers, 5xx bounces, anything else delays."""
    raw = f"{code} {text}" if code else text
    if 200 <= code < 300:
        kind = DELIVERY
    elif 500 <= code < 600:
        kind = BOUNCE
    else:
        kind = DELAY
    return Outcome(kind, code, raw, ip_address, tls, sending_ip)


def internal(code: int, status: str, text: str, ip_address: str = "", tls: bool = False) -> Outcome:
    """An outcome decided here rather than by a remote reply (``[internal]``, as Momentum marks it)."""
    kind = BOUNCE if 500 <= code < 600 else DELAY
    return Outcome(kind, code, f"{code} {status} [internal] {text}", ip_address, tls)
