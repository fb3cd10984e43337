"""
The unsubscribe page in a real browser: headless Chromium, driven over its DevTools protocol.

Chromium opens a copy's ``List-Unsubscribe`` URL as a person who followed it
would: the page loads (and anything the browser prefetches) without
unsubscribing anyone; then its button is clicked, and the browser's POST is
the one-click unsubscribe: a ``list_unsubscribe`` event, the page saying it
is done, the recipient suppressed. The page runs no script of its own (its
Content-Security-Policy forbids any); the click comes from DevTools.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from typing import Any
from urllib.parse import urlparse

from twisted.internet import defer
from twisted.trial import unittest

from tests.helpers import RunningAppliance, free_port, in_thread, wait_until
from tests.test_browser import CHROMIUM, CHROMIUM_FLAGS
from tests.test_unsubscribe_flow import message, send


class DevTools:
    """The least of a WebSocket client (RFC 6455) that Chromium's DevTools protocol needs."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise OSError(f"no WebSocket: {head[:100]!r}")
        self.next_id = 0

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("DevTools closed the connection")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._recv()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        self.sock.sendall(b"\x81" + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _message(self) -> dict[str, Any]:
        data = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(self._read(2), "big")
            elif n == 127:
                n = int.from_bytes(self._read(8), "big")
            payload = self._read(n)
            opcode = first & 0x0F
            if opcode == 8:
                raise EOFError("DevTools closed the WebSocket")
            if opcode in (0, 1):
                data += payload
                if first & 0x80:
                    return json.loads(data)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = self._message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise OSError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"{expression} never became true")

    def close(self) -> None:
        self.sock.close()


def devtools_port(port_file: str, proc: subprocess.Popen) -> int:
    """The port Chromium's DevTools listen on, once it has written it (within 60 s)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with open(port_file) as f:
                first = f.read().split()
            if first:
                return int(first[0])
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError("Chromium did not start its DevTools")
        time.sleep(0.05)


def visit_and_click(url: str, profile: str, between: Any) -> dict[str, Any]:
    """
    Open ``url`` in headless Chromium, call ``between`` once the page has loaded, click its
    button, and say what the page showed before and after.
    """
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "--remote-debugging-port=0", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = devtools_port(os.path.join(profile, "DevToolsActivePort"), proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        try:
            tools.wait_for("document.readyState === 'complete' && location.pathname.startsWith('/u/')")
            shown = {"title": tools.evaluate("document.title"),
                     "form": tools.evaluate("(() => { const f = document.forms[0]; return f && "
                                            "[f.method, f.action, new URLSearchParams(new FormData(f))"
                                            ".toString()]; })()")}
            between()
            tools.evaluate("document.querySelector('#unsubscribe button').click()")
            shown["done"] = tools.wait_for("document.getElementById('done') && "
                                           "document.getElementById('done').textContent")
            shown["after"] = tools.evaluate("[location.href, document.title]")
            return shown
        finally:
            tools.close()
    finally:
        proc.kill()
        proc.wait()


class BrowserUnsubscribeTests(unittest.TestCase):
    if CHROMIUM is None or shutil.which("timeout") is None:
        skip = "chromium is not installed (Debian: apt-get install chromium; .ci/run does this)"

    def setUp(self) -> None:
        port = free_port()
        self.running = RunningAppliance(
            self.mktemp(), tracker={"endpoint": f"tcp:{port}:interface=127.0.0.1"},
            smtpapi={"tracking_domain": f"127.0.0.1:{port}", "list_unsubscribe": True})
        return self.running.start()

    def tearDown(self) -> defer.Deferred:
        return self.running.stop()

    @defer.inlineCallbacks
    def test_the_page_asks_and_its_button_unsubscribes(self) -> defer.Generator:
        yield in_thread(send, self.running.smtp_port, ["ann@example.test"], message())
        [copy] = yield self.running.sink.wait_for(1)
        yield wait_until(self.running.settled)
        header = email.message_from_bytes(copy.data, policy=email.policy.compat32)["List-Unsubscribe"]
        m = re.fullmatch(r"<https://(127\.0\.0\.1:\d+/u/[A-Za-z0-9_-]+)>", header)
        assert m is not None, header
        url = "http://" + m.group(1)  # the tracker itself; TLS is the proxy's in front of it
        seen_before_click: list[list[str]] = []

        def between() -> None:
            seen_before_click.append([e["type"] for e in self.running.events()])

        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)
        shown = yield in_thread(visit_and_click, url, profile, between)
        self.assertEqual(shown["title"], "Unsubscribe")
        self.assertEqual(shown["form"], ["post", url, "List-Unsubscribe=One-Click"])
        # Loading the page (and whatever the browser fetched with it) unsubscribed nobody.
        self.assertNotIn("list_unsubscribe", seen_before_click[0])
        self.assertEqual(shown["done"], "You will not receive these emails any more.")
        self.assertEqual(shown["after"], [url, "You are unsubscribed"])  # answered in place: no redirect

        [event] = [e for e in self.running.events() if e["type"] == "list_unsubscribe"]
        self.assertEqual(event["rcpt_to"], "ann@example.test")
        self.assertIn("HeadlessChrome", event["user_agent"])
        suppression = self.running.appliance.suppression.list
        yield wait_until(lambda: suppression.suppressed("ann@example.test", False) is not None)
