"""
A real SMTP server that receives what the appliance delivers, for tests and trials.

It speaks enough ESMTP for a delivering client (EHLO, MAIL, RCPT, DATA,
RSET, NOOP, QUIT, and STARTTLS and AUTH PLAIN when given a certificate and
accounts; AUTH even without TLS if told to; PIPELINING offered if told to)
and can be scripted to answer any command with any reply, with a
raw line that is not SMTP, with silence, or by dropping the connection, so
delivery tests can play a difficult MX.

Run it by hand to watch what the appliance delivers::

    python -m tests.sink --port 2526 --directory var/sink
"""

from __future__ import annotations

import argparse
import base64
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol
from twisted.protocols.basic import LineReceiver

# A script answers (command, argument) with a reply, raw bytes to send as a line,
# "drop" (close the connection), "silent" (never answer), or None for the default.
Script = Callable[[str, bytes], "tuple[int, str] | bytes | str | None"]


@dataclass
class Received:
    mail_from: str
    rcpt_to: list[str]
    data: bytes  # dot-unstuffed, lines ending in CRLF, as the sink received them
    peer: str = ""
    tls: bool = False
    auth_user: str | None = None
    connection: int = 0  # which connection (1, 2, ...) carried it


@dataclass
class Transaction:
    mail_from: str | None = None
    rcpt_to: list[str] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)


class SinkProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20
    factory: SinkFactory

    def connectionMade(self) -> None:
        self.tx = Transaction()
        self.new_read = False
        self.in_data = False
        self.tls = False
        self.auth_user: str | None = None
        self.factory.connections += 1
        self.number = self.factory.connections
        self.reply("CONNECT", b"", (220, "sink.test ESMTP test sink"))

    def connectionLost(self, reason: Any = None) -> None:
        # Everything the client sent before it closed has been read by now.
        self.factory.closed += 1
        super().connectionLost(reason)

    def reply(self, command: str, arg: bytes, default: tuple[int, str] | list[str]) -> bool:
        """Send the scripted or default reply; False unless it was a 2xx or 3xx."""
        answer = self.factory.script(command, arg) if self.factory.script else None
        self.kept_silent = answer == "silent"
        if answer == "drop":
            self.transport.loseConnection()
            return False
        if answer == "silent":
            return False
        if isinstance(answer, bytes):
            self.sendLine(answer)
            return False
        if answer is None and isinstance(default, list):
            for line in default[:-1]:
                self.sendLine(f"250-{line}".encode())
            self.sendLine(f"250 {default[-1]}".encode())
            return True
        code, text = answer or default
        self.sendLine(f"{code} {text}".encode())
        return 200 <= code < 400

    def dataReceived(self, data: bytes) -> None:
        self.new_read = True
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                data = b"".join(x + b"\r\n" for x in self.tx.lines)
                if self.reply("EOM", data, (250, "2.0.0 Ok: queued")):
                    peer = self.transport.getPeer()
                    self.factory.deliver(Received(self.tx.mail_from or "", self.tx.rcpt_to, data,
                                                  getattr(peer, "host", ""), self.tls,
                                                  self.auth_user, self.number))
                self.tx = Transaction()
            else:
                self.tx.lines.append(line[1:] if line.startswith(b".") else line)
            return
        self.factory.commands.append((self.number, line))
        if self.new_read:
            self.new_read = False
            self.factory.reads.append((self.number, []))
        self.factory.reads[-1][1].append(line)
        command, _, arg = line.partition(b" ")
        verb = command.upper().decode("ascii", "replace")
        if verb in ("EHLO", "HELO"):
            self.reply(verb, arg, self.ehlo_lines() if verb == "EHLO" else (250, "sink.test"))
        elif verb == "STARTTLS" and self.factory.broken_tls and not self.tls:
            # Says yes, then answers the handshake with text: a broken TLS set-up.
            self.sendLine(b"220 2.0.0 Ready to start TLS")
            self.sendLine(b"this is not a TLS handshake")
            self.transport.loseConnection()
        elif verb == "STARTTLS" and self.factory.tls is not None and not self.tls:
            if self.reply(verb, arg, (220, "2.0.0 Ready to start TLS")):
                self.transport.startTLS(self.factory.tls)
                self.tls = True
                self.tx = Transaction()
        elif verb == "AUTH" and self.factory.accounts is not None and self.offers_auth():
            self.auth(arg)
        elif verb == "MAIL":
            if self.factory.accounts is not None and self.auth_user is None:
                self.reply(verb, arg, (530, "5.7.0 Authentication required"))
            elif self.reply(verb, arg, (250, "2.1.0 Ok")):
                self.tx.mail_from = _address(arg)
        elif verb == "RCPT":
            if self.reply(verb, arg, (250, "2.1.5 Ok")):
                self.tx.rcpt_to.append(_address(arg))
        elif verb == "DATA":
            # As Postfix answers a pipelining client whose MAIL or every RCPT was refused.
            if self.tx.mail_from is None:
                default = (503, "5.5.1 Error: need MAIL command")
            elif not self.tx.rcpt_to:
                default = (554, "5.5.1 Error: no valid recipients")
            else:
                default = (354, "End data with <CR><LF>.<CR><LF>")
            if self.reply(verb, arg, default):
                self.in_data = True
        elif verb == "RSET":
            self.tx = Transaction()
            self.reply(verb, arg, (250, "2.0.0 Ok"))
        elif verb == "NOOP":
            self.reply(verb, arg, (250, "2.0.0 Ok"))
        elif verb == "QUIT":
            self.reply(verb, arg, (221, "2.0.0 Bye"))
            if not self.kept_silent:  # a "silent" QUIT keeps the connection, unanswered
                self.transport.loseConnection()
        else:
            self.reply(verb, arg, (502, "5.5.2 Command not recognised"))

    def ehlo_lines(self) -> list[str]:
        lines = ["sink.test", "SIZE 104857600", "8BITMIME"]
        if (self.factory.tls is not None or self.factory.broken_tls) and not self.tls:
            lines.append("STARTTLS")
        if self.factory.accounts is not None and self.offers_auth():
            lines.append("AUTH PLAIN")
        if self.factory.pipelining:
            lines.append("PIPELINING")
        return lines

    def offers_auth(self) -> bool:
        return self.tls or self.factory.plaintext_auth

    def auth(self, arg: bytes) -> None:
        mechanism, _, initial = arg.partition(b" ")
        try:
            _authzid, user, password = base64.b64decode(initial, validate=True).split(b"\0")
        except ValueError:
            self.reply("AUTH", arg, (501, "5.5.2 Malformed AUTH PLAIN"))
            return
        accounts = self.factory.accounts or {}
        if mechanism.upper() == b"PLAIN" and accounts.get(user.decode()) == password.decode():
            self.auth_user = user.decode()
            self.reply("AUTH", arg, (235, "2.7.0 Authentication successful"))
        else:
            self.reply("AUTH", arg, (535, "5.7.8 Authentication credentials invalid"))


def _address(arg: bytes) -> str:
    text = arg.decode("utf-8", "replace")
    start, end = text.find("<"), text.find(">")
    return text[start + 1 : end] if 0 <= start < end else text.split(":", 1)[-1].strip()


class SinkFactory(protocol.ServerFactory):
    protocol = SinkProtocol
    noisy = False

    def __init__(self, script: Script | None = None, directory: str | None = None,
                 tls: Any = None, accounts: dict[str, str] | None = None,
                 broken_tls: bool = False, plaintext_auth: bool = False,
                 pipelining: bool = False) -> None:
        self.script = script
        self.directory = directory
        self.tls = tls  # a server TLS context: offer STARTTLS
        self.accounts = accounts  # user -> password: offer AUTH PLAIN after TLS, and require it
        self.broken_tls = broken_tls  # offer STARTTLS, then fail every handshake
        # Offer and take AUTH before TLS as well: a careless smarthost, or a man in the
        # middle who strips STARTTLS to read the password.
        self.plaintext_auth = plaintext_auth
        self.pipelining = pipelining  # offer PIPELINING (RFC 2920) in the EHLO reply
        self.messages: list[Received] = []
        self.commands: list[tuple[int, bytes]] = []  # (connection number, command line)
        # (connection number, the command lines that came in one read): what was pipelined.
        self.reads: list[tuple[int, list[bytes]]] = []
        self.connections = 0
        self.closed = 0  # connections the sink has seen end
        self._waiting: list[tuple[int, defer.Deferred]] = []

    def deliver(self, message: Received) -> None:
        self.messages.append(message)
        if self.directory:
            name = os.path.join(self.directory, f"{len(self.messages):06d}.eml")
            with open(name, "wb") as f:
                f.write(message.data)
        for n, d in list(self._waiting):
            if len(self.messages) >= n:
                self._waiting.remove((n, d))
                d.callback(self.messages[:])

    def wait_for(self, count: int) -> defer.Deferred:
        """Fires with the messages received once there are at least ``count``."""
        d: defer.Deferred = defer.Deferred()
        if len(self.messages) >= count:
            d.callback(self.messages[:])
        else:
            self._waiting.append((count, d))
        return d


def main() -> None:
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(description="Receive mail over SMTP and store it as files.")
    parser.add_argument("--port", type=int, default=2526)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--directory", default="var/sink")
    args = parser.parse_args()
    os.makedirs(args.directory, exist_ok=True)
    reactor.listenTCP(args.port, SinkFactory(directory=args.directory), interface=args.interface)
    print(f"sink listening on {args.interface}:{args.port}, writing to {args.directory}")
    reactor.run()


if __name__ == "__main__":
    main()
