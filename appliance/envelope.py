"""
A spool entry's envelope and its on-disk form: who the message is for, and how each copy is made.

The envelope follows the message text in the entry's one file, with a
fixed-size trailer giving its length (``trailer``, ``read_trailer``); its
``schema`` says which version wrote it, so an upgraded appliance reads what
an older one left. ``QueuedMessage`` is an entry as the spool and delivery
hold it in memory. Plain data and JSON: the file work is ``appliance.spool``'s.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field, fields
from typing import Any, BinaryIO

from appliance.settings import Tracking

# The version of envelope.json's format, written in it as "schema". An envelope without
# one is version 1, as written up to this field's introduction; this version reads every
# earlier one, so an appliance upgraded in place delivers what the old one left.
#   1: recipients' "tracking" is a loose object, possibly empty.
#   2: "tracking" is always a whole ``Tracking.to_json`` record.
#   3: the envelope follows the message in one file (``active/<id>``, journal in
#      ``journal/<id>``); "announce" holds the events owed since the 250.
#   4: "subject" and "friendly_from" for the events of every copy; recipients'
#      "tracking" may hold "metadata_in_links", "transactional", "list_unsubscribe" and
#      "list_unsubscribe_mailto" (an envelope of 3 or less has none: its copies are made
#      as they were).
#   5: "text_crc32", the CRC-32 of the message text, in an entry committed while its file
#      was still a spare in incoming/ (``SpoolWriter._commit``); None in any other.
ENVELOPE_SCHEMA = 5

# After a schema-3 entry's envelope: b"\nenvelope " + its length in 10 digits + b"\n".
_TRAILER_START = b"\nenvelope "
TRAILER_SIZE = len(_TRAILER_START) + 11


class NewerEnvelope(ValueError):
    """An envelope written by a newer version of the appliance than this one."""

    transmission_id: object = None  # what the envelope says, unchecked


@dataclass
class Recipient:
    """One recipient's copy: its address, identity and the settings its copy is made with."""

    address: str
    message_id: str
    # Fields every event of this copy carries (campaign_id, rcpt_meta, rcpt_tags, ...).
    event_fields: dict[str, Any] = field(default_factory=dict)
    # What the rewriter needs for this copy (resolved tracking settings).
    tracking: Tracking = field(default_factory=Tracking)

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "message_id": self.message_id,
                "event_fields": self.event_fields, "tracking": self.tracking.to_json()}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Recipient:
        return cls(address=raw["address"], message_id=raw["message_id"],
                   event_fields=raw.get("event_fields", {}),
                   tracking=Tracking.from_json(raw.get("tracking", {})))


@dataclass
class Envelope:
    transmission_id: str
    mail_from: str
    recipients: list[Recipient]
    received_at: float
    client_address: str = ""
    auth_user: str | None = None
    listener: str = ""
    message_size: int = 0
    # What the message's header says, for the events of its copies (``appliance.eventtypes``).
    subject: str = ""
    friendly_from: str = ""
    # The events owed once the 250 is sent (``appliance.injection``): their pre-assigned
    # event_ids and what they say. None for a message with nothing owed, or from before.
    announce: dict[str, Any] | None = None
    # Set by the commit of a message received into a spare file: recovery finds such an
    # entry in incoming/ if the kill came before its link into active/, and takes it only
    # if whole.
    text_crc32: int | None = None

    def to_json(self) -> bytes:
        raw: dict[str, Any] = {"schema": ENVELOPE_SCHEMA}
        raw.update((name, getattr(self, name)) for name in _ENVELOPE_FIELDS)
        raw["recipients"] = [r.to_json() for r in self.recipients]
        return _ENCODER.encode(raw).encode()

    def trailer(self) -> bytes:
        """The envelope as a schema-3 entry ends: its JSON, then its length."""
        data = self.to_json()
        return data + _TRAILER_START + b"%010d\n" % len(data)

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        raw = json.loads(data)
        schema = raw.pop("schema", 1)
        if not isinstance(schema, int) or schema > ENVELOPE_SCHEMA:
            error = NewerEnvelope(f"envelope schema {schema!r}; this version reads up to {ENVELOPE_SCHEMA}")
            error.transmission_id = raw.get("transmission_id")
            raise error
        raw["recipients"] = [Recipient.from_json(r) for r in raw["recipients"]]
        if schema < 4:  # schema 3 kept the subject and sender only with the events owed
            owed = raw.get("announce") or {}
            raw.update(subject=owed.get("subject", ""), friendly_from=owed.get("friendly_from", ""))
        return cls(**raw)


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))
# One encoder for every envelope: json.dumps with options builds one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


@dataclass
class CopyState:
    """What the journal says of one recipient's copy."""

    done: bool = False
    attempts: int = 0
    next_attempt: float = 0.0
    held: bool = False  # an operator's hold: not attempted until released
    last_error: str = ""  # the reply of the last attempt that failed, for the queue's listing


@dataclass
class QueuedMessage:
    envelope: Envelope
    path: str
    states: list[CopyState]
    # Journal writes of one message run in pool threads; they take turns, so the last
    # copy's removal never pulls the entry from under another copy's append.
    journal_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # Schema 3: where the message ends in ``path``, and the journal's own path. A
    # directory entry of an earlier schema has -1 and its journal inside it.
    message_end: int = -1
    journal: str = ""
    # Whether the journal's directory entry is known to be on disk, and whether the
    # events owed since the 250 are written.
    journal_durable: bool = False
    announced: bool = False
    # The message's text as committed, while it is still wanted in memory (the injector
    # drops it once the message is prepared): read_message gives it without a disk read.
    text: bytes | None = field(default=None, repr=False, compare=False)
    # Set in the file pool once the entry has left active/ (every copy final), and once
    # this process may have created its journal (a recovered entry may have one already).
    left: bool = False
    journal_written: bool = True
    # The spare file's name in incoming/ a message was committed under, until an fsync of
    # active/ has covered its entry's name (``appliance.spool``); then None.
    spare: str | None = field(default=None, repr=False, compare=False)

    @property
    def message_path(self) -> str:
        return self.path if self.message_end >= 0 else os.path.join(self.path, "message")

    @property
    def journal_path(self) -> str:
        return self.journal or os.path.join(self.path, "journal")

    @property
    def owes_events(self) -> bool:
        return self.envelope.announce is not None and not self.announced


def read_trailer(f: BinaryIO) -> tuple[Envelope, int]:
    """The envelope at the end of a schema-3 entry's file, and where its message ends."""
    size = f.seek(0, os.SEEK_END)
    if size < TRAILER_SIZE:
        raise ValueError("too short for an envelope")
    f.seek(size - TRAILER_SIZE)
    trailer = f.read(TRAILER_SIZE)
    if not (trailer.startswith(_TRAILER_START) and trailer.endswith(b"\n")):
        raise ValueError("no envelope trailer")
    length = int(trailer[len(_TRAILER_START):-1])
    end = size - TRAILER_SIZE - length
    if end < 0:
        raise ValueError("envelope longer than the entry")
    f.seek(end)
    return Envelope.from_json(f.read(length)), end
