"""
What the Twisted adapters rely on, checked against the installed Twisted.

``appliance/smtp/twisted_server.py`` and ``appliance/delivery/twisted_client.py``
are the only code that uses private members of ``twisted.mail.smtp``'s
``ESMTP``, ``SMTPClient`` and ``ESMTPClient``, and the session and client
classes override many of their undocumented hooks. These tests check that
every such member still exists with the signature the adapters were written
for, and still behaves as their docstrings say. A failure after a Twisted
upgrade names the member and the version: read the adapter's docstring for
that member before changing anything else.
"""

from __future__ import annotations

import inspect
from typing import Any

from twisted.copyright import version as twisted_version
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail import smtp
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from appliance.delivery.twisted_client import ESMTPClientAdapter
from appliance.smtp.twisted_server import ACCEPTED_AGAIN, ESMTPAdapter

WRITTEN_FOR = "26.10.0"


def _broken(what: str, adapter: str) -> str:
    return (f"Twisted {twisted_version} (the adapters were written for {WRITTEN_FOR}): {what}; "
            f"see {adapter}, which relies on it")


SERVER = "appliance/smtp/twisted_server.py"
CLIENT = "appliance/delivery/twisted_client.py"

# Members the server classes override or call, with their parameters (self left out).
SERVER_MEMBERS: dict[str, list[str]] = {
    "__init__": ["chal", "contextFactory"],
    "_cbFromValidate": ["fromEmail", "code", "msg"],
    "_cbToValidate": ["to", "user", "code", "msg"],
    "lineReceived": ["line"],
    "state_COMMAND": ["line"],
    "lookupMethod": ["command"],
    "lineLengthExceeded": ["line"],
    "sendCode": ["code", "message"],
    "greeting": [],
    "extensions": [],
    "connectionMade": [],
    "connectionLost": ["reason"],
    "timeoutConnection": [],
    "do_HELO": ["rest"],
    "do_EHLO": ["rest"],
    "do_MAIL": ["rest"],
    "do_RCPT": ["rest"],
    "do_DATA": ["rest"],
    "do_RSET": ["rest"],
    "do_QUIT": ["rest"],
    "ext_STARTTLS": ["rest"],
    "ext_AUTH": ["rest"],
    "validateFrom": ["helo", "origin"],
    "validateTo": ["user"],
}

CLIENT_MEMBERS: dict[str, list[str]] = {
    "__init__": ["secret", "contextFactory", "args", "kw"],
    "_disconnectFromServer": [],
    "lineReceived": ["line"],
    "sendLine": ["line"],
    "sendError": ["exc"],
    "connectionLost": ["reason"],
    "registerAuthenticator": ["auth"],
    "smtpState_helo": ["code", "resp"],
    "esmtpState_ehlo": ["code", "resp"],
    "esmtpState_serverConfig": ["code", "resp"],
    "tryTLS": ["code", "resp", "items"],
    "esmtpTLSFailed": ["code", "resp"],
    "esmtpState_starttls": ["code", "resp"],
    "smtpState_from": ["code", "resp"],
    "smtpState_to": ["code", "resp"],
    "smtpState_data": ["code", "resp"],
    "smtpState_msgSent": ["code", "resp"],
    "smtpState_disconnect": ["code", "resp"],
    "smtpTransferFailed": ["code", "resp"],
    "transformChunk": ["chunk"],
    "finishedFileTransfer": ["lastsent"],
    "clearLineBuffer": [],
}


def _parameters(cls: type, name: str) -> list[str] | None:
    member = inspect.getattr_static(cls, name, None)
    if member is None or not callable(member):
        return None
    return list(inspect.signature(member).parameters)[1:]


class MemberTests(SynchronousTestCase):
    """Every member the adapters name is there, with the parameters they pass."""

    def assert_members(self, cls: type, members: dict[str, list[str]], adapter: str) -> None:
        for name, expected in members.items():
            found = _parameters(cls, name)
            self.assertIsNotNone(found, _broken(f"{cls.__qualname__}.{name} is gone", adapter))
            self.assertEqual(found, expected, _broken(
                f"{cls.__qualname__}.{name} now takes {found}, not {expected}", adapter))

    def test_esmtp_server_members(self) -> None:
        self.assert_members(smtp.ESMTP, SERVER_MEMBERS, SERVER)

    def test_esmtp_client_members(self) -> None:
        self.assert_members(smtp.ESMTPClient, CLIENT_MEMBERS, CLIENT)

    def test_server_attributes(self) -> None:
        proto = smtp.ESMTP()
        for name in ("_helo", "_from", "_to", "mode", "startedTLS", "canStartTLS", "ctx", "host"):
            self.assertTrue(hasattr(proto, name), _broken(f"ESMTP instances have no {name}", SERVER))
        self.assertEqual((proto._helo, proto._from, proto._to, proto.mode), (None, None, [], smtp.COMMAND),
                         _broken("a new ESMTP's _helo/_from/_to/mode start differently", SERVER))

    def test_address_patterns_name_path_and_options(self) -> None:
        for name in ("mail_re", "rcpt_re"):
            pattern = getattr(smtp.SMTP, name, None)
            self.assertIsNotNone(pattern, _broken(f"SMTP.{name} is gone", SERVER))
            self.assertLessEqual({"path", "opts"}, set(pattern.groupindex),
                                 _broken(f"SMTP.{name} has no 'path' or no 'opts' group", SERVER))
        m = smtp.SMTP.mail_re.match(b"FROM:<a@b.example> SIZE=10")
        self.assertEqual((m.group("path"), m.group("opts")) if m else None, (b"<a@b.example>", b"SIZE=10"),
                         _broken("SMTP.mail_re splits MAIL's argument differently", SERVER))

    def test_client_attributes(self) -> None:
        client = smtp.ESMTPClient(None, None, b"me")
        for name in ("_tlsMode", "resp", "context", "requireAuthentication", "requireTransportSecurity",
                     "heloFallback", "MAX_LENGTH"):
            self.assertTrue(hasattr(client, name), _broken(f"ESMTPClient instances have no {name}", CLIENT))


class _Server(ESMTPAdapter):
    """The adapter over the stock protocol, recording what the stock dispatch calls."""

    def __init__(self) -> None:
        super().__init__()
        self.called: list[tuple[str, bytes]] = []
        self.to_answer: Any = None

    def do_XYZZY(self, rest: bytes) -> None:
        self.called.append(("do", rest))

    def ext_PLUGH(self, rest: bytes) -> None:
        self.called.append(("ext", rest))

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        return self.to_answer if self.to_answer is not None else (lambda: None)


class ServerAdapterTests(SynchronousTestCase):
    """``ESMTPAdapter``'s methods, on the stock ``ESMTP`` underneath."""

    def setUp(self) -> None:
        self.proto = _Server()
        self.proto.host = b"mx.test"
        self.proto.callLater = Clock().callLater  # its idle timeout, never on the global reactor
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.transport.clear()

    def command(self, line: bytes) -> bytes:
        self.transport.clear()
        self.proto.run_command(line)
        return self.transport.value()

    def test_helo_argument(self) -> None:
        self.assertIsNone(self.proto.helo_argument(),
                          _broken("_helo is not (None, host) before EHLO", SERVER))
        self.command(b"EHLO client.example")
        self.assertEqual(self.proto.helo_argument(), b"client.example",
                         _broken("do_EHLO no longer records (argument, host) in _helo", SERVER))
        self.command(b"HELO other.example")
        self.assertEqual(self.proto.helo_argument(), b"other.example",
                         _broken("do_HELO no longer records (argument, host) in _helo", SERVER))
        self.proto.forget_greeting()
        self.assertIsNone(self.proto.helo_argument())

    def test_envelope(self) -> None:
        self.command(b"EHLO client.example")
        reply = self.command(b"MAIL FROM:<a@sender.example>")
        self.assertEqual(reply, b"250 " + ESMTPAdapter.SENDER_OK + b"\r\n",
                         _broken("do_MAIL no longer answers through _cbFromValidate", SERVER))
        self.assertEqual(str(self.proto.sender()), "a@sender.example",
                         _broken("_cbFromValidate no longer records the sender in _from", SERVER))
        reply = self.command(b"RCPT TO:<b@rcpt.example>")
        self.assertEqual(reply, b"250 " + ESMTPAdapter.RECIPIENT_OK + b"\r\n",
                         _broken("do_RCPT no longer answers through _cbToValidate", SERVER))
        self.command(b"RCPT TO:<c@rcpt.example>")
        self.assertEqual([str(u.dest) for u in self.proto.recipients()], ["b@rcpt.example", "c@rcpt.example"],
                         _broken("_cbToValidate no longer appends (User, result) pairs to _to", SERVER))
        self.assertEqual(self.proto.mode, smtp.COMMAND, _broken("mode left COMMAND outside DATA", SERVER))
        self.proto.reset_envelope()
        self.assertEqual((self.proto.sender(), self.proto.recipients()), (None, []))
        self.assertEqual(self.command(b"RCPT TO:<d@rcpt.example>")[:3], b"503",
                         _broken("do_RCPT no longer reads the sender from _from", SERVER))

    def test_ehlo_ends_the_transaction(self) -> None:
        self.command(b"EHLO client.example")
        self.command(b"MAIL FROM:<a@sender.example>")
        self.command(b"RCPT TO:<b@rcpt.example>")
        self.command(b"EHLO client.example")
        self.assertEqual((self.proto.sender(), self.proto.recipients()), (None, []),
                         _broken("do_EHLO no longer clears _from and _to", SERVER))

    def test_recipient_accepted_again_is_not_added(self) -> None:
        self.command(b"EHLO client.example")
        self.command(b"MAIL FROM:<a@sender.example>")
        self.proto.to_answer = ACCEPTED_AGAIN
        self.assertEqual(self.command(b"RCPT TO:<b@rcpt.example>"),
                         b"250 " + ESMTPAdapter.RECIPIENT_OK + b"\r\n")
        self.assertEqual(self.proto.recipients(), [])

    def test_run_command_dispatches_do_and_ext(self) -> None:
        self.command(b"  xyzzy   some rest  ")
        self.command(b"PLUGH")
        self.assertEqual(self.proto.called, [("do", b"some rest"), ("ext", b"")],
                         _broken("lineReceived no longer dispatches to do_/ext_ methods with the "
                                 "rest of the line", SERVER))
        self.assertEqual(self.command(b"FROB")[:3], b"500",
                         _broken("unknown verbs no longer get 500", SERVER))


@implementer(ISSLTransport)
class _TLSTransport(StringTransport):
    pass


class _Client(ESMTPClientAdapter):
    """The adapter over the stock client, recording replies routed to it."""

    def __init__(self) -> None:
        super().__init__(None, None, b"me.example")
        self.routed: list[tuple[str, int, bytes]] = []
        self.discard_after_first = False

    def ok(self, code: int, resp: bytes) -> None:
        self.routed.append(("ok", code, resp))
        if self.discard_after_first:
            self.discard_unread()

    def fail(self, code: int, resp: bytes) -> None:
        self.routed.append(("fail", code, resp))

    def smtpState_from(self, code: int, resp: bytes) -> None:
        self.routed.append(("from", code, resp))


class ClientAdapterTests(SynchronousTestCase):
    """``ESMTPClientAdapter``'s methods, on the stock ``ESMTPClient`` underneath."""

    def connect(self, transport: StringTransport | None = None) -> tuple[_Client, StringTransport]:
        client = _Client()
        client.callLater = Clock().callLater
        transport = transport or StringTransport()
        client.makeConnection(transport)
        return client, transport

    def test_expect_routes_whole_replies(self) -> None:
        client, _ = self.connect()
        client.expect([250], client.ok, client.fail)
        client.dataReceived(b"250-first\r\n")
        self.assertEqual(client.reply_lines_so_far(), 1,
                         _broken("resp no longer collects reply lines", CLIENT))
        client.dataReceived(b"250 second\r\n")
        client.expect([250], client.ok, client.fail)
        client.dataReceived(b"451 later\r\n")
        self.assertEqual(client.routed, [("ok", 250, b"first\nsecond"), ("fail", 451, b"later")],
                         _broken("lineReceived no longer routes replies by _expected to _okresponse "
                                 "or _failresponse", CLIENT))
        self.assertEqual(client.reply_lines_so_far(), 0)

    def test_replies_in_one_read_follow_each_handlers_expect(self) -> None:
        # What pipelining relies on: MAIL, RCPT and DATA's replies come in one read.
        client, _ = self.connect()

        def mail_ok(code: int, resp: bytes) -> None:
            client.routed.append(("mail", code, resp))
            client.expect([250], rcpt_ok, client.fail)

        def rcpt_ok(code: int, resp: bytes) -> None:
            client.routed.append(("rcpt", code, resp))
            client.expect([354], client.ok, client.fail)

        client.expect([250], mail_ok, client.fail)
        client.dataReceived(b"250 sender ok\r\n250-recipient\r\n250 ok\r\n554 no valid recipients\r\n")
        self.assertEqual(client.routed, [("mail", 250, b"sender ok"), ("rcpt", 250, b"recipient\nok"),
                                         ("fail", 554, b"no valid recipients")],
                         _broken("replies that come in one read are no longer routed one by one, each "
                                 "by the _expected set while handling the one before", CLIENT))

    def test_on_refusal_changes_only_the_failure_route(self) -> None:
        client, _ = self.connect()
        client.expect([250], client.ok, client.ok)
        client.on_refusal(client.fail)
        client.dataReceived(b"550 no\r\n")
        client.expect([250], client.ok, client.ok)
        client.on_refusal(client.fail)
        client.dataReceived(b"250 yes\r\n")
        self.assertEqual(client.routed, [("fail", 550, b"no"), ("ok", 250, b"yes")])

    def test_tls_mode(self) -> None:
        client, _ = self.connect()
        self.assertFalse(client.tls_active())
        client, _ = self.connect(_TLSTransport())
        self.assertTrue(client.tls_active(),
                        _broken("connectionMade no longer sets _tlsMode from ISSLTransport", CLIENT))

    def test_tls_started_skips_starttls(self) -> None:
        client, transport = self.connect()
        client.context = object()
        client.note_tls_started()
        self.assertTrue(client.tls_active())
        transport.clear()
        client.tryTLS(250, b"", {b"STARTTLS": None})
        self.assertEqual((transport.value(), client.routed), (b"", [("from", 250, b"")]),
                         _broken("tryTLS no longer reads _tlsMode to skip STARTTLS", CLIENT))

    def test_discard_unread_drops_the_rest_of_the_read(self) -> None:
        client, _ = self.connect()
        client.discard_after_first = True
        client.expect([220, 250], client.ok, client.fail)
        client.dataReceived(b"220 go ahead\r\n250 injected\r\n")
        self.assertEqual(client.routed, [("ok", 220, b"go ahead")],
                         _broken("clearing the line buffer in lineReceived no longer drops the rest "
                                 "of the read", CLIENT))

    def test_quit(self) -> None:
        for reply in (b"221 bye\r\n", b"500 what\r\n"):
            client, transport = self.connect()
            transport.clear()
            client.quit()
            self.assertEqual(transport.value(), b"QUIT\r\n",
                             _broken("_disconnectFromServer no longer sends QUIT", CLIENT))
            client.dataReceived(reply)
            self.assertTrue(transport.disconnecting,
                            _broken("_disconnectFromServer no longer closes on any reply", CLIENT))
