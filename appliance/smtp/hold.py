"""
The input hold: a session that waits on itself reads nothing more.

While a message is being committed or a password checked, the next reply is
not known yet. A client may pipeline without being offered PIPELINING, so
whatever it sends meanwhile must wait, unread, or replies would come out of
order. The transport stops reading (so a client cannot fill memory) and
anything already received is kept, to be handled once the reply is out.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer


class InputHold:
    """Pauses a transport and keeps what arrives, until the decision is made."""

    def __init__(self) -> None:
        self._held: list[bytes] | None = None

    @property
    def active(self) -> bool:
        return self._held is not None

    def start(self, transport: IPushProducer) -> None:
        self._held = []
        transport.pauseProducing()

    def keep(self, data: bytes) -> None:
        """Input that arrived while holding (it was read before the transport paused)."""
        assert self._held is not None
        self._held.append(data)

    def end(self, transport: IPushProducer) -> bytes:
        """Read again; returns what was kept meanwhile, to be handled now."""
        held, self._held = self._held or [], None
        transport.resumeProducing()
        return b"".join(held)

    def abandon(self, transport: IPushProducer) -> None:
        """
        Drop what was kept, but read again: the session is closing, and a paused
        transport would never notice the client's close (or its TLS close_notify).
        """
        self._held = None
        transport.resumeProducing()
