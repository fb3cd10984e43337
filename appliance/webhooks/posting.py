"""
Posting one webhook's sealed batches to its receiver, and what an answer that is not ``2xx`` means.

One batch per webhook is in flight at a time, oldest first; its file is removed
after a ``2xx``. Anything else (another status, no connection, no answer within
``timeout``) puts the webhook into back-off, ``retry_initial`` doubling up to
``retry_max``; after a failed attempt, batches sealed more than
``retry_lifetime`` ago are dropped with an error in the operational log. A
``413`` is not a failure but an answer about size: the batch is split into two
halves, each a batch with its own id in the batch's place, and they are posted
at once; a single event refused with ``413`` is dropped with an error.

Each request carries the webhook's credentials (``appliance.webhooks.auth``). A
``401`` is a failure like any other, but it is logged once per batch, as an
error that names the credentials, not at every retry; with OAuth 2.0 the token
is forgotten, and a batch refused with a token kept from before is posted again
at once with a new one. After every answer, the ``last-answer`` file of the
queue directory says what it was, for ``engage-appliance webhooks list``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from appliance.config import WebhookConfig
from appliance.reactors import Runner
from appliance.retry import RetrySchedule
from appliance.webhooks.auth import Authorizer, TokenError, authorizer
from appliance.webhooks.envelope import batch_body
from appliance.webhooks.http import BytesProducer, describe_failure, read_prefix
from appliance.webhooks.queue import Batch, QueueDirectory

# One namespace for the whole package: operators and tests filter the log on it.
log = Logger(namespace="appliance.webhooks")


class Poster:
    """
    The posting half of a ``WebhookService``: it owns the sealed batches and the back-off.

    Started and stopped by its service; ``track`` is the service's, so a stop
    waits for the file work posting began.
    """

    def __init__(self, config: WebhookConfig, queue: QueueDirectory, clock: IReactorTime,
                 agent: IAgent, run: Runner, track: Callable[[defer.Deferred], defer.Deferred],
                 user_agent: bytes, auth: Authorizer | None = None) -> None:
        """``auth``: how requests prove who sends them; by default ``config``'s auth_type's."""
        self.config = config
        self.queue = queue
        self.schedule = RetrySchedule(config.retry_initial, config.retry_max)
        self.batches: list[Batch] = []  # sealed, oldest first
        self.failures = 0  # failed attempts in a row
        self.running = False
        self._clock = clock
        self._agent = agent
        self._run = run
        self._track = track
        self._user_agent = user_agent
        self._target = config.target.encode("ascii")
        self._inflight: defer.Deferred | None = None
        self._retry_timer: IDelayedCall | None = None
        self.auth = auth if auth is not None else authorizer(config, agent, clock, user_agent)
        self._refused_credentials = ""  # the batch whose 401 was logged

    def start(self, batches: list[Batch]) -> None:
        """Post ``batches`` (the queue's, oldest first) and every batch added later."""
        self.batches = batches
        self.running = True
        self._kick()

    def stop(self) -> None:
        """Stop posting; the batch in flight is posted again after the next start."""
        self.running = False
        if self._retry_timer is not None and self._retry_timer.active():
            self._retry_timer.cancel()
        self._retry_timer = None
        if self._inflight is not None:
            self._inflight.cancel()

    def add(self, batch: Batch) -> None:
        """A batch was sealed: queue it in its place."""
        self.batches.append(batch)
        self.batches.sort(key=lambda b: b.order)
        self._kick()

    def _kick(self) -> None:
        if not self.running or self._inflight is not None or self._retry_timer is not None:
            return
        if not self.batches:
            return
        batch = self.batches[0]
        d = self._run(self.queue.read, batch)
        d.addCallback(self._post, batch)
        self._inflight = d
        d.addBoth(self._posted, batch)

    def _post(self, lines: bytes, batch: Batch) -> defer.Deferred:
        body, count = batch_body(lines)
        return self._attempt(batch, body, count, again=True)

    def _attempt(self, batch: Batch, body: bytes, count: int, again: bool) -> defer.Deferred:
        """One request (after the credentials for it); a 401 to a kept token is tried ``again``."""

        def send(credentials: list[tuple[bytes, bytes]]) -> defer.Deferred:
            headers = Headers({
                b"Content-Type": [b"application/json"],
                b"User-Agent": [self._user_agent],
                b"X-MessageSystems-Batch-ID": [batch.batch_id.encode("ascii")],
            })
            for name, value in credentials:
                headers.addRawHeader(name, value)
            d = self._agent.request(b"POST", self._target, headers, BytesProducer(body))
            d.addCallback(answered)
            d.addTimeout(self.config.timeout, self._clock)
            return d

        def answered(response: IResponse) -> defer.Deferred:
            return read_prefix(response).addCallback(
                lambda prefix: (response.code, response.phrase, prefix, count))

        def refused(result: tuple[int, bytes, bytes, int]) -> Any:
            if result[0] == 401 and self.auth.rejected() and again:
                return self._attempt(batch, body, count, again=False)
            return result

        return self.auth.credentials().addCallback(send).addCallback(refused)

    def _posted(self, result: Any, batch: Batch) -> None:
        self._inflight = None
        if not self.running:
            return  # stopped mid-attempt: the batch is posted again after the next start
        if isinstance(result, Failure):
            if result.check(FileNotFoundError):
                self.batches.remove(batch)
                log.error("webhook {name}: batch file {path} has disappeared; its events are lost",
                          name=self.config.name, path=batch.path)
                self._kick()
                return
            why = str(result.value) if result.check(TokenError) else describe_failure(result)
            self._answered(batch, why, False)
            self._failed(batch, why)
            return
        code, phrase, prefix, count = result
        text = prefix.decode("utf-8", "replace").strip().replace("\n", " ")
        why = f"HTTP {code} {phrase.decode('latin-1')}" + (f": {text}" if text else "")
        self._answered(batch, why, 200 <= code < 300)
        if 200 <= code < 300:
            if self.failures:
                log.info("webhook {name}: {target} accepts batches again after {n} failure(s)",
                         name=self.config.name, target=self.config.target, n=self.failures)
            self.failures = 0
            self.batches.remove(batch)
            self._remove(batch, "posted")
            self._kick()
            return
        if code == 413:
            self._too_large(batch, count, why)
            return
        self._failed(batch, why, credentials_refused=code == 401)

    def _answered(self, batch: Batch, why: str, accepted: bool) -> None:
        """Record the attempt's outcome in the queue directory, for another process to read."""
        record = {"time": int(self._clock.seconds()), "batch_id": batch.batch_id, "accepted": accepted,
                  "answer": why}
        d = self._run(self.queue.write_last_answer, record)
        d.addErrback(lambda f: log.failure("webhook {name}: could not record the last answer", f,
                                           name=self.config.name))
        self._track(d)

    def _too_large(self, batch: Batch, count: int, why: str) -> None:
        """413: post the batch as two halves, at once; a batch of one event cannot be halved."""
        if count <= 1:
            self.batches.remove(batch)
            log.error("webhook {name}: dropping batch {batch_id}: {target} refuses its one event "
                      "as too large ({why})", name=self.config.name, batch_id=batch.batch_id,
                      target=self.config.target, why=why)
            self._remove(batch, "refused")
            self._kick()
            return
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        d = self._run(self.queue.split, batch, first, second)
        self._inflight = d

        def split(halves: tuple[Batch, Batch]) -> None:
            self._inflight = None
            if not self.running:
                return
            i = self.batches.index(batch)
            self.batches[i:i + 1] = halves
            log.warn("webhook {name}: {target} refuses batch {batch_id} of {count} events as too "
                     "large ({why}); posting it as two batches, {first} and {second}",
                     name=self.config.name, target=self.config.target, batch_id=batch.batch_id,
                     count=count, why=why, first=first, second=second)
            self._kick()

        def not_split(failure: Failure) -> None:
            self._inflight = None
            if not self.running:
                return
            log.failure("webhook {name}: could not split batch {batch_id}", failure,
                        name=self.config.name, batch_id=batch.batch_id)
            self._failed(batch, f"{why}; could not split it")

        d.addCallbacks(split, not_split)
        self._track(d)

    def _failed(self, batch: Batch, why: str, credentials_refused: bool = False) -> None:
        self.failures += 1
        now = self._clock.seconds()
        lifetime = self.config.retry_lifetime
        for old in [b for b in self.batches if now >= b.sealed_at + lifetime]:
            self._drop(old, why)
        if not self.batches:
            return
        head = self.batches[0]
        delay = min(self.schedule.delay(self.failures), head.sealed_at + lifetime - now)
        if not credentials_refused:
            log.warn("webhook {name}: batch {batch_id} not accepted by {target} ({why}); "
                     "next attempt in {delay:g}s", name=self.config.name, batch_id=batch.batch_id,
                     target=self.config.target, why=why, delay=delay)
        elif self._refused_credentials != batch.batch_id:
            # Once per batch: a wrong password is refused at every retry, for hours.
            self._refused_credentials = batch.batch_id
            log.error("webhook {name}: {target} refuses the credentials of auth_type {auth_type} "
                      "({why}); batch {batch_id} is tried again with back-off, next in {delay:g}s, "
                      "and this is not logged again for it", name=self.config.name,
                      target=self.config.target, auth_type=self.auth.kind, why=why,
                      batch_id=batch.batch_id, delay=delay)
        self._retry_timer = self._clock.callLater(max(delay, 0.0), self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        self._kick()

    def _drop(self, batch: Batch, why: str) -> None:
        self.batches.remove(batch)
        log.error("webhook {name}: dropping batch {batch_id} (sealed at {sealed_at}): not accepted "
                  "by {target} within {hours:g} hours; last answer: {why}", name=self.config.name,
                  batch_id=batch.batch_id, sealed_at=batch.sealed_at, target=self.config.target,
                  hours=self.config.retry_lifetime / 3600, why=why)
        self._remove(batch, "dropped")

    def _remove(self, batch: Batch, what: str) -> None:
        d = self._run(self.queue.remove, batch)
        d.addErrback(lambda f: log.failure(
            "webhook {name}: could not remove {what} batch {batch_id}; it will be posted again "
            "after a restart", f, name=self.config.name, what=what, batch_id=batch.batch_id))
        self._track(d)

