"""
How much password checking the injection server lets clients ask for.

Every AUTH costs a scrypt check, tens of milliseconds of a core on purpose.
Without a bound, clients looping on failed logins keep the password thread
busy and the queue of checks grows without end. ``AuthGuard`` refuses an
attempt, before any check, when the whole server has started
``attempts_per_second`` checks in the current second, or when the client's
address is in its back-off: after each failed login from an address, the
next check from it waits ``backoff`` seconds, doubled per further failure up
to ``backoff_max``. A success, or ``backoff_max`` without failures, forgets
the address.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

Reply = tuple[int, bytes]

BUSY: Reply = (454, b"4.7.0 Too many authentication attempts, try again later")
BACKING_OFF: Reply = (454, b"4.7.0 Too many failed logins from your address, try again later")

# Addresses remembered at most; beyond, those whose back-off is over are forgotten first.
_MAX_REMEMBERED = 10_000


class AuthGuard:
    """The server-wide rate of password checks and each address's back-off after failures."""

    def __init__(self, clock: IReactorTime, attempts_per_second: int, backoff: float,
                 backoff_max: float) -> None:
        self.clock = clock
        self.attempts_per_second = attempts_per_second
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._second = -1
        self._started = 0
        # client -> (failures in a row, the time before which no check is started for it)
        self._failures: dict[str, tuple[int, float]] = {}
        # Since the start, for the admin listener's metrics.
        self.refused_busy = 0  # over attempts_per_second
        self.refused_backing_off = 0  # from an address in its back-off
        self.failed_logins = 0

    def admit(self, client: str) -> Reply | None:
        """``None`` when a check may start now (and counts it), else the reply to send instead."""
        now = self.clock.seconds()
        entry = self._failures.get(client)
        if entry is not None and now < entry[1]:
            self.refused_backing_off += 1
            return BACKING_OFF
        second = int(now)
        if second != self._second:
            self._second, self._started = second, 0
        if self._started >= self.attempts_per_second:
            self.refused_busy += 1
            return BUSY
        self._started += 1
        return None

    def failed(self, client: str) -> None:
        self.failed_logins += 1
        now = self.clock.seconds()
        count, until = self._failures.get(client, (0, now))
        if now - until > self.backoff_max:
            count = 0  # quiet for long enough: start again from the shortest wait
        count += 1
        wait = min(self.backoff_max, self.backoff * 2 ** min(count - 1, 32))
        self._failures[client] = (count, now + wait)
        if len(self._failures) > _MAX_REMEMBERED:
            self._forget_expired(now)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def _forget_expired(self, now: float) -> None:
        for client, (_, until) in list(self._failures.items()):
            if now >= until:
                del self._failures[client]
        while len(self._failures) > _MAX_REMEMBERED:
            del self._failures[next(iter(self._failures))]
