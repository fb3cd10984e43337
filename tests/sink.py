"""
A real SMTP server that receives what the appliance delivers, for tests and trials.

It speaks enough ESMTP for a delivering client (EHLO, MAIL, RCPT, DATA,
RSET, NOOP, QUIT) and can be scripted to answer any command with any reply,
or to drop the connection, so delivery tests can play a difficult MX.

Run it by hand to watch what the appliance delivers::

    python -m tests.sink --port 2526 --directory var/sink
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import defer, protocol
from twisted.protocols.basic import LineReceiver

# A script answers (command, argument) with a reply, "drop", or None for the default.
Script = Callable[[str, bytes], "tuple[int, str] | str | None"]


@dataclass
class Received:
    mail_from: str
    rcpt_to: list[str]
    data: bytes  # dot-unstuffed, lines ending in CRLF, as the sink received them
    peer: str = ""


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
        self.in_data = False
        self.factory.connections += 1
        self.reply("CONNECT", b"", (220, "sink.test ESMTP test sink"))

    def reply(self, command: str, arg: bytes, default: tuple[int, str]) -> bool:
        """Send the scripted or default reply; False if the script dropped the line."""
        answer = self.factory.script(command, arg) if self.factory.script else None
        if answer == "drop":
            self.transport.loseConnection()
            return False
        code, text = answer or default
        self.sendLine(f"{code} {text}".encode())
        return 200 <= code < 400

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                data = b"".join(x + b"\r\n" for x in self.tx.lines)
                if self.reply("EOM", data, (250, "2.0.0 Ok: queued")):
                    peer = self.transport.getPeer()
                    self.factory.deliver(Received(self.tx.mail_from or "", self.tx.rcpt_to, data,
                                                  getattr(peer, "host", "")))
                self.tx = Transaction()
            else:
                self.tx.lines.append(line[1:] if line.startswith(b".") else line)
            return
        command, _, arg = line.partition(b" ")
        verb = command.upper().decode("ascii", "replace")
        if verb in ("EHLO", "HELO"):
            self.reply(verb, arg, (250, "sink.test"))
        elif verb == "MAIL":
            if self.reply(verb, arg, (250, "2.1.0 Ok")):
                self.tx.mail_from = _address(arg)
        elif verb == "RCPT":
            if self.reply(verb, arg, (250, "2.1.5 Ok")):
                self.tx.rcpt_to.append(_address(arg))
        elif verb == "DATA":
            if self.reply(verb, arg, (354, "End data with <CR><LF>.<CR><LF>")):
                self.in_data = True
        elif verb == "RSET":
            self.tx = Transaction()
            self.reply(verb, arg, (250, "2.0.0 Ok"))
        elif verb == "NOOP":
            self.reply(verb, arg, (250, "2.0.0 Ok"))
        elif verb == "QUIT":
            self.reply(verb, arg, (221, "2.0.0 Bye"))
            self.transport.loseConnection()
        else:
            self.reply(verb, arg, (502, "5.5.2 Command not recognised"))


def _address(arg: bytes) -> str:
    text = arg.decode("utf-8", "replace")
    start, end = text.find("<"), text.find(">")
    return text[start + 1 : end] if 0 <= start < end else text.split(":", 1)[-1].strip()


class SinkFactory(protocol.ServerFactory):
    protocol = SinkProtocol
    noisy = False

    def __init__(self, script: Script | None = None, directory: str | None = None) -> None:
        self.script = script
        self.directory = directory
        self.messages: list[Received] = []
        self.connections = 0
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
