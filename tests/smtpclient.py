"""A blocking SMTP client that shows every reply as sent, for tests that must see the raw dialogue."""

from __future__ import annotations

import base64
import socket
import ssl


def unverified_context() -> ssl.SSLContext:
    """A client context for the test certificates, which no CA signed."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RawClient:
    """
    Speaks to a server line by line. ``reply`` reads one whole (possibly
    multi-line) reply and returns its code and lines; ``send`` writes bytes as
    given, so a test can put several commands, or a smuggling payload, into one
    packet.
    """

    def __init__(self, port: int, implicit_tls: bool = False, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if implicit_tls:
            self.sock = unverified_context().wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[bytes]]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"connection closed after {lines!r}")
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def command(self, data: bytes) -> tuple[int, list[bytes]]:
        self.send(data + b"\r\n")
        return self.reply()

    def starttls(self) -> None:
        """Switch to TLS; the caller has read the 220 to STARTTLS already."""
        self.sock = unverified_context().wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")

    def closed(self) -> bool:
        """True if the server has closed the connection (nothing more to read)."""
        return self.file.read() == b""

    def login_plain(self, user: str, password: str) -> tuple[int, list[bytes]]:
        blob = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        return self.command(b"AUTH PLAIN " + blob)

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
