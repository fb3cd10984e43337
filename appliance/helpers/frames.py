"""
What crosses a helper's pipes: frames of a 4-byte length and a pickle.

A pickle is only ever read from the other end of a pipe this process made
(the owner's helpers, or the owner for a helper): no one else writes there.
Every frame is a tuple of plain values: a job's number, its name and its
arguments one way; its number, whether it succeeded and its result the other.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

_LENGTH = struct.Struct(">I")


def frame(value: Any) -> bytes:
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Frames from a stream that arrives in pieces of any size."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        out = []
        start = 0
        buffer = self._buffer
        while len(buffer) - start >= 4:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if len(buffer) - start - 4 < length:
                break
            out.append(pickle.loads(memoryview(buffer)[start + 4:start + 4 + length]))
            start += 4 + length
        if start:
            del buffer[:start]
        return out
