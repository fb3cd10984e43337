"""Shared test scaffolding: free ports, temporary configurations, a running appliance."""

from __future__ import annotations

import json
import os
import smtplib
import time
from typing import Any

from twisted.internet import defer, reactor, threads

from appliance.build import build
from appliance.config import Config, parse_config
from appliance.service import Appliance
from appliance.spool import entries_on_disk
from tests.fakes import FakeResolver
from tests.ports import free_port
from tests.sink import SinkFactory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_CONFIG = os.path.join(REPO, "etc", "appliance.toml")

# What tests expect of every configuration they build. They are the tests' own, not the
# shipped file's: an operator who edits etc/appliance.toml must not break the tests.
NODE_NAME = "appliance1"
HOSTNAME = "localhost"
TRACKING_DOMAIN = "track.test:8080"


def base_toml(directory: str = "var") -> dict[str, Any]:
    """
    The configuration tests start from, as parsed TOML: only what they rely on.

    Everything else is the code's default. The listeners are on port 0 (no test
    that parses this listens); ``make_config`` gives them free loopback ports.
    """
    return {
        "node": {"name": NODE_NAME, "hostname": HOSTNAME},
        "smtpapi": {"tracking_domain": TRACKING_DOMAIN},
        # No certificate made at start: the tests that want TLS give their own pair.
        "smtp": {"create_certificate": False,
                 "listeners": {"default": {"endpoint": "tcp:0:interface=127.0.0.1"}}},
        "tracker": {"endpoint": "tcp:0:interface=127.0.0.1"},
        "spool": {"directory": os.path.join(directory, "spool")},
        "events": {"log_file": os.path.join(directory, "events.jsonl")},
        "links": {"keys_file": os.path.join(directory, "links.keys")},
        "admin": {"endpoint": "tcp:0:interface=127.0.0.1",
                  "token_file": os.path.join(directory, "admin.token")},
        "suppression": {"database": os.path.join(directory, "suppression.sqlite3")},
        "stats": {"database": os.path.join(directory, "stats.sqlite3")},
    }


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def make_config(directory: str, **changes: Any) -> Config:
    """The tests' configuration on free loopback ports, with its files under ``directory``."""
    data = merge(base_toml(directory), {
        "smtp": {"listeners": {"default": {"endpoint": f"tcp:{free_port()}:interface=127.0.0.1"}}},
        "tracker": {"endpoint": f"tcp:{free_port()}:interface=127.0.0.1"},
        "admin": {"endpoint": f"tcp:{free_port()}:interface=127.0.0.1"},
    })
    return parse_config(merge(data, changes), "test")


def port_of(endpoint: str) -> int:
    return int(endpoint.split(":")[1])


def read_events(config: Config) -> list[dict[str, Any]]:
    try:
        with open(config.events.log_file, "rb") as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        return []


class RunningAppliance:
    """An appliance and a sink, both listening on loopback, for integration tests."""

    def __init__(self, directory: str, resolver: Any = None, **changes: Any) -> None:
        self.sink = SinkFactory()
        self.sink_port = reactor.listenTCP(0, self.sink, interface="127.0.0.1")
        route = f"127.0.0.1:{self.sink_port.getHost().port}"
        routes = {"example.test": route, "example.org": route}
        self.config = make_config(directory, **merge({"delivery": {"routes": routes}}, changes))
        # Never the real DNS in tests: a resolver that knows nothing unless told.
        self.resolver = resolver if resolver is not None else FakeResolver()
        self.appliance = Appliance(build(self.config), reactor, resolver=self.resolver,
                                   handle_sighup=False)
        self.smtp_port = port_of(self.config.smtp.listeners[0].endpoint)
        self.http_port = port_of(self.config.tracker.endpoint)

    def start(self) -> defer.Deferred:
        self.appliance.startService()
        return deferred_sleep(0.05)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.appliance.stopService()
        yield self.sink_port.stopListening()

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.config)

    def spooled(self) -> list[str]:
        """
        What the spool holds, accepted or being received, once the file pool is idle.

        A refused or abandoned message's file is removed in the file pool, a
        moment after its reply; waiting for the pool makes the look exact.
        """
        self.wait_for_file_pool()
        spool = self.config.spool.directory
        return entries_on_disk(spool)

    def wait_for_file_pool(self, timeout: float = 10.0) -> None:
        """Block until the file pool has no job running or queued (its jobs never need the reactor)."""
        pool = self.appliance.file_pool.pool if self.appliance.file_pool is not None else None
        deadline = time.monotonic() + timeout
        while pool is not None and pool.unfinished and time.monotonic() < deadline:
            time.sleep(0.002)

    def settled(self) -> bool:
        """Every SMTP session closed and every accepted copy delivered: nothing left in flight."""
        return self.appliance.smtp_limits.open == 0 and not self.spooled()


def deferred_sleep(seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@defer.inlineCallbacks
def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` on the reactor until it is true; fail the test after ``timeout``."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        yield deferred_sleep(interval)
        waited += interval


def in_thread(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
    """Run a blocking client (smtplib, urllib) without blocking the reactor under test."""
    return threads.deferToThread(f, *args, **kwargs)


@defer.inlineCallbacks
def queue_on_dead_route(running: RunningAppliance, recipients: list[str], message: bytes) -> Any:
    """
    Inject ``message`` to ``recipients`` by SMTP and wait until each copy's first attempt has
    failed (their route leads nowhere): the copies are queued. Fires with the transmission id.
    """
    def send() -> str:
        with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=10) as client:
            client.ehlo()
            client.mail("sender@example.net")
            for r in recipients:
                client.rcpt(r)
            code, text = client.data(message)
            assert code == 250, (code, text)
            return text.rsplit(b" ", 1)[1].decode()

    tid = yield in_thread(send)
    delivery = running.appliance.delivery

    def first_attempts_made() -> bool:
        copies = [c for c in delivery.listing() if c.transmission_id == tid]
        return len(copies) == len(recipients) and all(c.attempts == 1 for c in copies)

    yield wait_until(first_attempts_made)
    return tid
