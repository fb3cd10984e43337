"""
The envelope and the message as a whole: what may be an address, what a command verb, how
often one recipient counts, and how many hops a message may have made.

A whole appliance runs on a memory reactor with the sink behind it (``tests.memory``);
the client sees every reply as sent, and each step has finished before the next.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from tests.memory import MemoryAppliance, sendmail

MESSAGE = b"From: <sender@example.net>\r\nSubject: hello\r\n\r\nbody\r\n"


class EnvelopeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.running = MemoryAppliance(os.path.abspath(self.mktemp()))
        self.running.start()
        self.addCleanup(self.running.stop)

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.running.events() if e["type"] == kind]

    def test_line_breaks_nul_and_8bit_in_addresses_refused(self) -> None:
        def session() -> list[tuple[int, list[bytes]]]:
            c = self.running.smtp()
            c.reply()
            c.command(b"EHLO client.test")
            return [
                c.command(b'MAIL FROM:<"x\nRCPT TO:<hidden@example.org>"@example.net>'),
                c.command(b'MAIL FROM:<"x\x00"@example.net>'),
                c.command(b"MAIL FROM:<sender@example.net>"),
                c.command(b'RCPT TO:<"y\nX-Injected: yes"@example.test>'),
                c.command(b'RCPT TO:<"y\rX-Injected: yes"@example.test>'),
                c.command(b'RCPT TO:<"\xc3\xa9"@example.test>'),
                c.command(b"RCPT TO:<a@example.test>"),
                c.command(b"DATA"),
                c.command(MESSAGE + b"."),
                c.command(b"QUIT"),
            ]

        replies = session()
        sender = (553, [b"553 5.1.7 Sender address contains characters that are not allowed"])
        rcpt = (553, [b"553 5.1.3 Recipient address contains characters that are not allowed"])
        self.assertEqual(replies[:7], [sender, sender, (250, [b"250 2.1.0 Sender OK"]), rcpt, rcpt, rcpt,
                                       (250, [b"250 2.1.5 Recipient OK"])])
        self.assertEqual([r[0] for r in replies[7:]], [354, 250, 221])
        received = self.running.sink.messages
        self.assertEqual(len(received), 1)
        self.assertEqual((received[0].mail_from, received[0].rcpt_to),
                         ("sender@example.net", ["a@example.test"]))
        self.assertNotIn(b"X-Injected", received[0].data)
        self.assertFalse([line for _n, line in self.running.sink.commands if b"hidden" in line])
        self.assertEqual(len(self.of_type("injection")), 1)

    def test_non_ascii_verb_answered_and_the_session_goes_on(self) -> None:
        c = self.running.smtp()
        c.reply()
        c.send(b"\xff\xfe\r\nNOOP\r\n")
        replies = [*c.replies(), c.command(b"QUIT")]
        self.assertEqual(replies, [(500, [b"500 5.5.2 Command not recognised"]), (250, [b"250 2.0.0 OK"]),
                                   (221, [b"221 2.0.0 Bye"])])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_duplicate_recipients_get_one_copy(self) -> None:
        replies = sendmail(self.running.smtp(), "sender@example.net",
                           ["a@example.test", "a@EXAMPLE.Test", "A@example.test", "a@example.test"], MESSAGE)
        self.assertEqual([code for code, _ in replies], [220, 250, 250, 250, 250, 250, 250, 354, 250, 221])
        self.assertEqual(len(self.of_type("delivery")), 2)
        # The local part is compared as written: A@ and a@ may be two mailboxes.
        self.assertEqual(sorted(m.rcpt_to[0] for m in self.running.sink.messages),
                         ["A@example.test", "a@example.test"])
        injections = self.of_type("injection")
        self.assertEqual(sorted(e["raw_rcpt_to"] for e in injections), ["A@example.test", "a@example.test"])
        self.assertEqual(len({e["message_id"] for e in injections}), 2)

    def test_mail_loop_refused(self) -> None:
        hops = b"".join(b"Received: from relay%d.example.net by relay%d.example.net; "
                        b"Tue, 1 Jan 2030 00:00:00 +0000\r\n" % (i, i + 1) for i in range(50))

        def session(message: bytes) -> tuple[int, list[bytes]]:
            """The reply to the end of the message."""
            replies = sendmail(self.running.smtp(), "sender@example.net",
                               ["a@example.test", "b@example.test"], message)
            return replies[-2]

        code, text = session(hops + MESSAGE)
        self.assertEqual((code, text),
                         (554, [b"554 5.4.6 Too many hops (51 Received: headers, at most 50): a mail loop?"]))
        rejections = self.of_type("policy_rejection")
        self.assertEqual(sorted(e["rcpt_to"] for e in rejections), ["a@example.test", "b@example.test"])
        self.assertEqual({e["error_code"] for e in rejections}, {"554"})
        self.assertEqual(self.running.spooled(), [])
        # One hop fewer goes through.
        code, _ = session(hops[hops.index(b"Received: from relay1."):] + MESSAGE)
        self.assertEqual(code, 250)
        received = self.running.sink.messages
        self.assertEqual(len(received), 2)
        self.assertEqual(received[0].data.count(b"Received: "), 50)
        self.assertEqual(self.of_type("injection")[0]["rcpt_to"], "a@example.test")
