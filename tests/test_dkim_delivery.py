"""DKIM end to end: copies signed by the appliance on a memory reactor, checked as the sink got them."""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.trial.unittest import SkipTest

from appliance import dkim as appliance_dkim
from appliance.dkim import Signer, SigningKey, body_hash, parse_tags, split_message, verify
from appliance.links import LinkCodec, read_keyring
from tests.memory import MemoryAppliance
from tests.test_dkim import fresh_rsa, record_of, write_pem
from tests.test_tracking import TRACK_ALL, TrackingTestCase, message, send

# An independent verifier: dkimpy shares no code with appliance/dkim.py, so a
# canonicalization bug made on both sides of our own sign/verify cannot pass it.
try:
    import dkim as dkimpy
except ImportError:
    dkimpy = None
try:  # dkimpy checks Ed25519 signatures with PyNaCl
    import nacl.signing  # noqa: F401
    NACL: bool = True
except ImportError:
    NACL = False
NO_DKIMPY = "dkimpy is not installed (it is in the test extra: pip install -e '.[test]')"
NO_NACL = "PyNaCl, which dkimpy needs for Ed25519, is not installed (it is in the test extra)"

# The sender's own signature, as a message arrives with it; the rewrite breaks it.
SENDERS_SIGNATURE = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=sender; h=from:subject;\r\n"
                     b"\tbh=x; b=y\r\n")


class DkimDeliveryTests(TrackingTestCase):
    """The appliance signs for example.net with an RSA and an Ed25519 key."""

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.keys = {"rsa": fresh_rsa(), "ed": ed25519.Ed25519PrivateKey.generate()}
        self.key_files = {name: write_pem(os.path.join(directory, f"{name}.pem"), key)
                          for name, key in self.keys.items()}
        dkim = [{"domain": "example.net", "selector": name, "key_file": path}
                for name, path in self.key_files.items()]
        self.running = MemoryAppliance(os.path.join(directory, "appliance"), dkim=dkim)
        self.codec = LinkCodec(read_keyring(self.running.config.links.keys_file))
        self.running.start()
        self.addCleanup(self.running.stop)

    def lookup(self, domain: str, selector: str) -> str | None:
        key = self.keys.get(selector) if domain == "example.net" else None
        return record_of(key) if key is not None else None

    def ours(self, data: bytes) -> list[Any]:
        return [r for r in verify(data, self.lookup) if r.selector in self.keys]

    def test_tracked_copies_are_signed_after_the_rewrite(self) -> None:
        send(self.running, ["a@example.test", "b@example.org"],
                        message(TRACK_ALL, SENDERS_SIGNATURE))
        copies = self.running.sink.messages
        self.assertEqual(len(copies), 2)
        tokens = []
        for copy in copies:
            self.assertEqual([(r.selector, r.ok, r.reason) for r in self.ours(copy.data)],
                             [("rsa", True, ""), ("ed", True, "")])
            fields, body = split_message(copy.data)
            signatures = [parse_tags(raw.partition(b":")[2].decode()) for name, raw in fields
                          if name == "dkim-signature"]
            # Ours on top, then the sender's own, kept as it came.
            self.assertEqual([s["s"] for s in signatures], ["rsa", "ed", "sender"])
            # The body hash is the hash of the body as delivered: the rewritten one.
            self.assertEqual({s["bh"] for s in signatures[:2]}, {body_hash(body)})
            links = self.tokens(copy.data)
            self.assertEqual(len(links), 4)
            self.assertEqual({d.rcpt_to for d in links}, {copy.rcpt_to[0]})
            tokens.append(body)
        self.assertNotEqual(tokens[0], tokens[1])  # two different copies, each signed on its own
        injections = self.events("injection")
        self.assertEqual(len(injections), 2)
        for event in injections:
            self.assertNotIn("dkim_broken", event)  # the appliance re-signs (SPEC §5)
        self.delivered(2)

    def published(self) -> dict[bytes, bytes]:
        """The TXT records ``engage-appliance-dkim-key record`` prints, as DNS would answer them."""
        records = {}
        for selector, path in self.key_files.items():
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = appliance_dkim.main(["record", path, "--domain", "example.net",
                                            "--selector", selector])
            self.assertEqual(code, 0)
            name, text = out.getvalue().split(" IN TXT ", 1)
            # A TXT record of several strings is their concatenation (RFC 6376 section 3.6.2.2).
            records[name.encode()] = "".join(re.findall(r'"([^"]*)"', text)).encode()
        return records

    def check_with_dkimpy(self, index: int, selector: str) -> None:
        """Copies, tracked and untracked, pass dkimpy's check of the signature at ``index``."""
        records = self.published()
        asked: list[bytes] = []

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            asked.append(name)
            return records.get(name)

        tracked = message(TRACK_ALL, SENDERS_SIGNATURE)
        send(self.running, ["a@example.test"], tracked)
        send(self.running, ["b@example.org"], message(None))
        copies = self.running.sink.messages
        self.assertEqual(len(copies), 2)
        for copy in copies:
            fields, _ = split_message(copy.data)
            signatures = [parse_tags(raw.partition(b":")[2].decode()) for name, raw in fields
                          if name == "dkim-signature"]
            self.assertEqual(signatures[index]["s"], selector)
            verifier = dkimpy.DKIM(copy.data)
            self.assertTrue(verifier.verify(idx=index, dnsfunc=dnsfunc),
                            f"dkimpy refuses the {selector} signature of {copy.data[:2000]!r}")
            # A copy changed in transit fails: the check is not vacuous.
            altered = copy.data.replace(b"Subject: ", b"Subject: Re: ", 1)
            self.assertNotEqual(altered, copy.data)
            self.assertFalse(dkimpy.DKIM(altered).verify(idx=index, dnsfunc=dnsfunc))
        self.assertEqual(set(asked), {f"{selector}._domainkey.example.net.".encode()})
        self.delivered(2)

    def test_rsa_signatures_pass_dkimpy(self) -> None:
        if dkimpy is None:
            raise SkipTest(NO_DKIMPY)
        self.check_with_dkimpy(0, "rsa")

    def test_ed25519_signatures_pass_dkimpy(self) -> None:
        if dkimpy is None:
            raise SkipTest(NO_DKIMPY)
        if not NACL:
            raise SkipTest(NO_NACL)
        self.check_with_dkimpy(1, "ed")

    def test_untracked_copies_are_signed_too(self) -> None:
        data = message(None)
        send(self.running, ["a@example.test"], data)
        [copy] = self.running.sink.messages
        self.assertEqual([r.ok for r in self.ours(copy.data)], [True, True])
        self.assertTrue(copy.data.endswith(data))  # signatures and Received on top, nothing else changed
        self.delivered(1)

    def test_other_from_domains_are_not_signed(self) -> None:
        data = message(TRACK_ALL, SENDERS_SIGNATURE).replace(b"<s@example.net>", b"<s@elsewhere.example>")
        send(self.running, ["a@example.test"], data)
        [copy] = self.running.sink.messages
        self.assertEqual(self.ours(copy.data), [])
        self.assertEqual(len(self.tokens(copy.data)), 4)
        [event] = self.events("injection")
        self.assertTrue(event["dkim_broken"])  # the sender's signature is broken, and not replaced
        self.delivered(1)

    def test_a_copy_that_cannot_be_signed_waits(self) -> None:
        """A signing failure defers the copy: it is never sent without the signature it should have."""

        class BrokenKey:
            def sign(self, data: bytes) -> bytes:
                raise RuntimeError("the key is gone")

        self.patch(self.running.appliance.copies, "signer",
                   Signer([SigningKey("example.net", "broken", BrokenKey())]))  # type: ignore[arg-type]
        send(self.running, ["a@example.test"], message(None))
        [delay] = self.events("delay")
        self.assertEqual(delay["error_code"], "451")
        self.assertIn("could not make the copy: the key is gone", delay["reason"])
        self.assertEqual(self.running.sink.messages, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
