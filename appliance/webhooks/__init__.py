"""
Webhooks: the event log's events, batched and POSTed to HTTP receivers as SparkPost does.

Each ``[[webhooks]]`` table gets a ``WebhookService`` with a queue directory,
``<spool>/webhooks/<name>/``, and a ``Follower`` (``appliance.follower``) that
reads the event log for it from the cursor in that directory. A webhook
without a cursor (new, or a queue written before cursors existed, which
already holds every earlier event) starts at the end of the event log.
Nothing here runs inside the SMTP or HTTP request paths but the append.

The parts, each with what it describes:

- ``envelope``: SparkPost's envelope of an event and the body of a batch;
- ``queue``: the queue directory, its files, seals, splits and recovery;
- ``service``: one webhook collecting its events into batches and sealing them;
- ``posting``: posting the sealed batches, back-off, and what a ``413`` means;
- ``http``: the request body, the start of the answer, and whom HTTPS trusts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import ssl, threads
from twisted.logger import Logger

from appliance.config import WebhookConfig
from appliance.eventtypes import event_class
from appliance.follower import Follower
from appliance.reactors import Reactor, Runner
from appliance.retry import RetrySchedule
from appliance.webhooks.envelope import batch_body, envelope_line
from appliance.webhooks.http import BytesProducer, TrustFile, read_prefix
from appliance.webhooks.posting import Poster
from appliance.webhooks.queue import CURSOR, LAST_ANSWER, Batch, QueueDirectory
from appliance.webhooks.service import WebhookService

__all__ = [
    "CURSOR",
    "Batch",
    "BytesProducer",
    "Poster",
    "QueueDirectory",
    "RetrySchedule",
    "TrustFile",
    "WebhookService",
    "Webhooks",
    "batch_body",
    "envelope_line",
    "event_class",
    "read_prefix",
]

log = Logger()


class Webhooks(MultiService):
    """
    Every configured webhook, each with its queue under ``root`` and its follower of the log.

    The followers are added after the webhooks, so they start once every
    queue is recovered and are stopped first.
    """

    name = "webhooks"

    def __init__(self, configs: tuple[WebhookConfig, ...], root: str, log_path: str,
                 clock: Reactor, run: Runner = threads.deferToThread, poll_interval: float = 1.0,
                 trust: Mapping[str, ssl.IOpenSSLTrustRoot] | None = None, **kwargs: Any) -> None:
        """``trust``: each webhook's ``tls_ca_file`` roots, by webhook name."""
        super().__init__()
        self.root = root
        self.webhooks: list[WebhookService] = []
        self.followers: list[Follower] = []
        for config in configs:
            svc = WebhookService(config, os.path.join(root, config.name), clock=clock, run=run,
                                 trust=(trust or {}).get(config.name), **kwargs)
            svc.setServiceParent(self)
            self.webhooks.append(svc)
        for svc in self.webhooks:
            follower = Follower(log_path, svc, clock, run=run, poll_interval=poll_interval)
            follower.setServiceParent(self)
            self.followers.append(follower)

    def wake(self) -> None:
        """The event log was written to: each follower reads it."""
        for follower in self.followers:
            follower.written()

    def startService(self) -> None:
        if os.path.isdir(self.root):
            known = {svc.config.name for svc in self.webhooks}
            for name in sorted(set(os.listdir(self.root)) - known):
                left = os.path.join(self.root, name)
                if os.path.isdir(left) and set(os.listdir(left)) - {CURSOR, LAST_ANSWER}:
                    log.warn("{path} holds batches of a webhook that is no longer configured; "
                             "they are not posted", path=left)
        super().startService()
