"""
What the appliance and its tracker processes say to each other over the child's pipes.

Each message is one JSON object behind a 4-byte big-endian length: the
owner sends ``setup`` (once, first), ``keys`` (after each SIGHUP re-read),
``ack`` (a batch is written) and ``stop``; a tracker process sends
``batch`` (hits with their events) and ``stats`` (its counters). JSON
because events are JSON already and the owner writes them as they come;
lengths rather than lines, because nothing then depends on what a field
may contain.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

from appliance.links import Keyring

Message = dict[str, Any]

_LENGTH = struct.Struct(">I")
MAX_MESSAGE = 64 * 1024 * 1024  # far above any batch; a larger length means the stream is broken

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class WireError(ValueError):
    """The other side sent something that is not a message: the pipe is closed."""


def encode(message: Message) -> bytes:
    data = _ENCODER.encode(message).encode("utf-8")
    return _LENGTH.pack(len(data)) + data


class Decoder:
    """Splits what arrives on a pipe into messages, whatever the chunks."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Message]:
        """The whole messages now received; raises ``WireError`` on a broken stream."""
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > MAX_MESSAGE:
                raise WireError(f"a message of {size} bytes")
            end = _LENGTH.size + size
            if len(self._buffer) < end:
                return
            body = bytes(self._buffer[_LENGTH.size:end])
            del self._buffer[:end]
            try:
                message = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise WireError(f"not JSON: {e}") from None
            if not isinstance(message, dict):
                raise WireError("not a JSON object")
            yield message


def keys_message(keyring: Keyring) -> list[list[Any]]:
    """The keyring as the wire carries it: ``[[id, hex], ...]``, the signing key first."""
    return [[kid, key.hex()] for kid, key in keyring.keys]


def keyring_from(keys: list[list[Any]]) -> Keyring:
    return Keyring(tuple((int(kid), bytes.fromhex(key)) for kid, key in keys))
