"""SIGHUP: one handler for every part that re-reads something; retired link keys stop at once."""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from appliance.build import build
from appliance.links import (
    InvalidToken,
    Keyring,
    LinkCodec,
    LinkData,
    click_suffix,
    read_keyring,
    write_keyring,
)
from appliance.service import Appliance
from appliance.sighup import SighupService
from appliance.spool import run_synchronously
from tests.helpers import make_config
from tests.test_wiring import FromThreads

LINK = LinkData("click", 2_000_000_000, "m", "t", "r@x.test", "", (), None, "Raw URL", "https://x.example/")
OLD, NEW = (7, b"o" * 32), (8, b"n" * 32)


class SignalCase(SynchronousTestCase):
    def setUp(self) -> None:
        if not hasattr(signal, "SIGHUP"):
            self.skipTest("no SIGHUP here")
        self.previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, self.previous)


class SighupServiceTests(SignalCase):
    def test_callbacks_run_on_the_reactor_and_the_handler_before_still_runs(self) -> None:
        earlier: list[int] = []

        def before(signum: int, frame: FrameType | None) -> None:
            earlier.append(signum)

        signal.signal(signal.SIGHUP, before)  # as the event log installs its own
        threads = FromThreads()
        service = SighupService(threads)
        ran: list[str] = []
        service.add(lambda: ran.append("one"))
        service.add(lambda: 1 / 0)
        service.add(lambda: ran.append("three"))
        service.startService()
        signal.raise_signal(signal.SIGHUP)
        self.assertEqual((ran, earlier), ([], [signal.SIGHUP]))  # nothing inside the handler
        [run] = threads.calls
        run()
        self.assertEqual(ran, ["one", "three"])  # a failing callback does not stop the others
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)


def logged() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    return events


class KeyReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "links.keys")
        os.makedirs(os.path.dirname(self.path))
        write_keyring(self.path, Keyring((NEW, OLD)))
        self.old_token = LinkCodec(Keyring((OLD,))).encode(LINK)
        self.log = logged()
        self.addCleanup(globalLogPublisher.removeObserver, self.log.append)

    def test_a_retired_key_stops_verifying(self) -> None:
        codec = LinkCodec(read_keyring(self.path))
        self.assertEqual(codec.decode(self.old_token), LINK)
        write_keyring(self.path, Keyring((NEW,)))
        self.assertTrue(codec.reload(self.path))
        self.assertRaises(InvalidToken, codec.decode, self.old_token)
        self.assertEqual(codec.decode(codec.encode(LINK)), LINK)
        self.assertEqual(codec.keyring.signing, NEW)

    def test_a_rotated_key_signs_new_links(self) -> None:
        codec = LinkCodec(read_keyring(self.path))
        write_keyring(self.path, Keyring((OLD, NEW)))
        codec.reload(self.path)
        self.assertEqual(LinkCodec(Keyring((OLD,))).decode(codec.encode(LINK)), LINK)
        encode = codec.click_encoder(LINK)
        self.assertEqual(codec.decode(LinkCodec(Keyring((OLD,))).encode(LINK)), LINK)
        self.assertEqual(codec.decode(encode(click_suffix("Raw URL", "https://x.example/", False))), LINK)

    def test_a_bad_key_file_keeps_the_keys_and_says_why(self) -> None:
        codec = LinkCodec(read_keyring(self.path))
        with open(self.path, "w", encoding="ascii") as f:
            f.write("not a key file\n")
        self.assertFalse(codec.reload(self.path))
        self.assertEqual(codec.decode(self.old_token), LINK)
        os.remove(self.path)
        self.assertFalse(codec.reload(self.path))
        self.assertEqual(codec.decode(self.old_token), LINK)
        errors = [e for e in self.log if e.get("log_format", "").startswith("kept the link keys")]
        self.assertEqual(len(errors), 2)
        self.assertIn(self.path, errors[0]["error"])
        self.assertIn("no such key file", errors[1]["error"])


class ApplianceTests(SignalCase):
    def test_sighup_rereads_the_appliances_key_file(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = make_config(directory)
        appliance = Appliance(build(config), MemoryReactorClock(), run=run_synchronously)
        path = config.links.keys_file
        keyring = read_keyring(path)
        token = appliance.links.encode(LINK)
        write_keyring(path, Keyring((NEW, *keyring.keys)))
        assert appliance.sighup is not None
        appliance.sighup._run()  # what SIGHUP hands the reactor thread
        self.assertEqual(appliance.links.keyring.signing, NEW)
        write_keyring(path, Keyring((NEW,)))
        appliance.sighup._run()
        self.assertRaises(InvalidToken, appliance.links.decode, token)
        # The tracker and the copy maker verify and sign with that same codec.
        self.assertIs(appliance.copies.codec, appliance.links)

    def test_sighup_reopens_the_appliances_event_log(self) -> None:
        """One handler: the event log's reopen is a callback of the same dispatcher."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = make_config(directory)
        appliance = Appliance(build(config), MemoryReactorClock(), run=run_synchronously)
        appliance.events.open()
        self.addCleanup(appliance.events.close)
        path = config.events.log_file
        os.rename(path, path + ".1")  # logrotate's rename
        assert appliance.sighup is not None
        appliance.sighup._run()
        appliance.events.emit("open")
        self.assertTrue(os.path.exists(path))
        self.assertEqual(os.path.getsize(path + ".1"), 0)

    def test_no_handler_in_tests_that_ask_for_none(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        appliance = Appliance(build(make_config(directory)), MemoryReactorClock(), run=run_synchronously,
                              handle_sighup=False)
        self.assertIsNone(appliance.sighup)
