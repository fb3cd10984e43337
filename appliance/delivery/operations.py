"""
The delivery queue as operators see it: how they name copies and what a listing shows.

Pure functions over the queue's jobs; ``DeliveryService`` acts on what they
select (flush, hold, release, delete) and ``appliance.admin.queue`` answers
with what they describe.

An id names either a whole message, by the transmission id its ``250 ...
queued as ID`` reply gave, or one recipient's copy, by its ``message_id``,
as the events name them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.delivery.outcome import BOUNCE, Outcome

if TYPE_CHECKING:
    from appliance.delivery.queue import Job

# SparkPost's class for a message failed by an administrative action (Momentum's
# "Admin Failure"): an operator deleted it from the queue.
ADMIN_FAILURE = "25"
DELETED = Outcome(BOUNCE, 554, "554 5.0.0 [internal] deleted from the queue by the operator")

# Where a copy is: waiting for its next attempt, due or being tried, or held by an operator.
WAITING, ACTIVE, HELD = "waiting", "active", "held"


class UnknownIds(LookupError):
    """Ids that name no queued copy."""

    def __init__(self, ids: Sequence[str]) -> None:
        super().__init__(f"not found in the queue: {', '.join(ids)}")
        self.ids = tuple(ids)


@dataclass(frozen=True)
class CopyView:
    """One queued copy, as the listing and ``queue show`` give it."""

    message_id: str
    transmission_id: str
    recipient: str
    domain: str
    received_at: float
    attempts: int
    next_attempt: float | None  # None while held, due or being tried
    last_error: str
    held: bool
    state: str

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "transmission_id": self.transmission_id,
            "recipient": self.recipient,
            "domain": self.domain,
            "received_at": iso_time(self.received_at),
            "age": max(0, int(now - self.received_at)),
            "attempts": self.attempts,
            "next_attempt": None if self.next_attempt is None else iso_time(self.next_attempt),
            "last_error": self.last_error,
            "held": self.held,
            "state": self.state,
        }


def iso_time(ts: float) -> str:
    """A time as SparkPost's API writes one: UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def view(job: Job, state: str) -> CopyView:
    queued = job.queued
    copy = queued.states[job.index]
    return CopyView(
        message_id=queued.envelope.recipients[job.index].message_id,
        transmission_id=queued.envelope.transmission_id,
        recipient=job.address,
        domain=job.domain,
        received_at=queued.envelope.received_at,
        attempts=copy.attempts,
        next_attempt=copy.next_attempt if state == WAITING else None,
        last_error=copy.last_error,
        held=copy.held,
        state=state,
    )


def normal_domain(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


def select(jobs: Iterable[Job], ids: Sequence[str] = (), domain: str | None = None) -> list[Job]:
    """
    The jobs ``ids`` name (each a transmission id or a copy's message_id), or those of
    ``domain`` (the recipient's domain); every job when neither is given.

    Raises ``UnknownIds`` naming each id that matches no job: an operator who
    mistyped one id of several learns which, and nothing is done to the others.
    """
    jobs = list(jobs)
    if domain is not None:
        wanted = normal_domain(domain)
        jobs = [job for job in jobs if job.domain == wanted]
    if not ids:
        return jobs
    by_id: dict[str, list[Job]] = {}
    for job in jobs:
        by_id.setdefault(job.queued.envelope.transmission_id, []).append(job)
        by_id.setdefault(job.queued.envelope.recipients[job.index].message_id, []).append(job)
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise UnknownIds(unknown)
    chosen: dict[tuple[str, int], Job] = {}
    for i in ids:
        for job in by_id[i]:
            chosen[job.key] = job
    return list(chosen.values())
