"""
The durable spool: where an accepted message lives until every copy has a final outcome.

Layout, one directory per SMTP transaction (Postfix-like commit protocol)::

    incoming/<id>/message         being received; never read by delivery
    active/<id>/message           the message as injected, canonical CRLF
    active/<id>/envelope.json     sender, recipients, ids, per-recipient tracking
    active/<id>/journal           one JSON line per recipient outcome or retry

A transaction is committed by fsyncing ``message`` and ``envelope.json``,
renaming its directory from ``incoming/`` into ``active/`` and fsyncing
``active/``. Only then may the injection server answer ``250``. At start-up
``incoming/`` is emptied: nothing there was ever acknowledged.

The journal records what happened to each recipient's copy. A copy is final
once a ``done`` line for it is on disk, and the directory is removed only when
every copy is final, so a crash between "event written" and "spool cleaned"
costs at most a repeated removal, never a lost copy. The last copy to become
final needs no line: leaving ``active/`` is its mark, and only if that fails
is its line written after all. Removal first renames the directory out of
``active/`` (into ``incoming/``, emptied at start-up), so a crash during it
never leaves a half-deleted entry to be delivered again.

File system calls that block (fsync, rename, removal) go through ``run``,
which is ``deferToThread`` in the appliance and a synchronous call in tests.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from appliance.files import fsync_directory, write_synced
from appliance.settings import Tracking

log = Logger()

Runner = Callable[..., defer.Deferred]


def run_synchronously(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args, **kwargs)


# The version of envelope.json's format, written in it as "schema". An envelope without
# one is version 1, as written up to this field's introduction; this version reads every
# earlier one, so an appliance upgraded in place delivers what the old one left.
#   1: recipients' "tracking" is a loose object, possibly empty.
#   2: "tracking" is always a whole ``Tracking.to_json`` record.
ENVELOPE_SCHEMA = 2


class NewerEnvelope(ValueError):
    """An envelope written by a newer version of the appliance than this one."""


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

    def to_json(self) -> bytes:
        raw: dict[str, Any] = {"schema": ENVELOPE_SCHEMA}
        raw.update((f.name, getattr(self, f.name)) for f in fields(self))
        raw["recipients"] = [r.to_json() for r in self.recipients]
        return json.dumps(raw, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        raw = json.loads(data)
        schema = raw.pop("schema", 1)
        if not isinstance(schema, int) or schema > ENVELOPE_SCHEMA:
            raise NewerEnvelope(f"envelope schema {schema!r}; this version reads up to {ENVELOPE_SCHEMA}")
        raw["recipients"] = [Recipient.from_json(r) for r in raw["recipients"]]
        return cls(**raw)


@dataclass
class CopyState:
    """What the journal says of one recipient's copy."""

    done: bool = False
    attempts: int = 0
    next_attempt: float = 0.0


@dataclass
class QueuedMessage:
    envelope: Envelope
    path: str
    states: list[CopyState]
    # Journal writes of one message run in pool threads; they take turns, so the last
    # copy's removal never pulls the directory from under another copy's append.
    journal_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def message_path(self) -> str:
        return os.path.join(self.path, "message")


# Message text is kept in memory up to this size and only written out, with its directory,
# by the commit in a worker thread: on the reactor thread a mkdir or open can wait tens of
# milliseconds behind other messages' fsyncs. A larger message spills to its file as it comes.
SPILL_AT = 1024 * 1024


class SpoolWriter:
    """Receives one message's bytes during DATA, then commits or aborts."""

    def __init__(self, spool: Spool, transmission_id: str) -> None:
        if not os.path.isdir(spool.incoming):
            # Visibly unusable: say so at DATA rather than after the client sent it all.
            raise FileNotFoundError(f"spool directory {spool.incoming} is missing")
        self.spool = spool
        self.transmission_id = transmission_id
        self.path = os.path.join(spool.incoming, transmission_id)
        self._file: Any = None  # opened once the text outgrows memory, or by the commit
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.size = 0
        self.finished = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > SPILL_AT:
            self._open()

    def _open(self) -> None:
        """Create the entry and its message file, and write out what memory holds."""
        os.mkdir(self.path, 0o700)
        self._file = open(os.path.join(self.path, "message"), "wb")
        self._file.write(b"".join(self._pending))
        self._pending, self._pending_size = [], 0

    def commit(self, envelope: Envelope) -> defer.Deferred:
        """Make the message durable; fires with its ``QueuedMessage`` once it is on disk."""
        assert envelope.transmission_id == self.transmission_id
        self.finished = True
        return self.spool.run(self._commit, envelope).addErrback(self._failed)

    def _commit(self, envelope: Envelope) -> QueuedMessage:
        if self._file is None:
            self._open()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        env_path = os.path.join(self.path, "envelope.json")
        write_synced(env_path, envelope.to_json())
        # The entries of both files must be durable too, or a power loss could leave a
        # committed directory without its envelope (moved aside at start) or its text.
        fsync_directory(self.path)
        final = os.path.join(self.spool.active, self.transmission_id)
        os.rename(self.path, final)
        fsync_directory(self.spool.active)
        states = [CopyState() for _ in envelope.recipients]
        return QueuedMessage(envelope, final, states)

    def _failed(self, failure: Any) -> Any:
        self._discard()
        return failure

    def abort(self) -> None:
        """Forget a message that will not be acknowledged (client went away, refused)."""
        if not self.finished:
            self.finished = True
            self._discard()

    def _discard(self) -> None:
        self._pending = []
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        shutil.rmtree(self.path, ignore_errors=True)


class Spool:
    def __init__(self, directory: str, run: Runner = threads.deferToThread) -> None:
        self.directory = directory
        self.incoming = os.path.join(directory, "incoming")
        self.active = os.path.join(directory, "active")
        self.run = run

    def prepare(self) -> None:
        """Create the layout and drop every unacknowledged transaction."""
        for d in (self.directory, self.incoming, self.active):
            os.makedirs(d, mode=0o700, exist_ok=True)
        for name in os.listdir(self.incoming):
            log.info("discarding unacknowledged spool entry {name}", name=name)
            shutil.rmtree(os.path.join(self.incoming, name), ignore_errors=True)

    def writer(self, transmission_id: str) -> SpoolWriter:
        return SpoolWriter(self, transmission_id)

    def recover(self) -> Iterator[QueuedMessage]:
        """Every committed message with at least one copy not yet final."""
        for name in sorted(os.listdir(self.active)):
            path = os.path.join(self.active, name)
            try:
                with open(os.path.join(path, "envelope.json"), "rb") as f:
                    envelope = Envelope.from_json(f.read())
            except NewerEnvelope as e:
                # Not broken: a downgrade. Left where it is for the version that wrote it.
                log.error("spool entry {name} was written by a newer version ({e}); left in place",
                          name=name, e=e)
                continue
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.error("spool entry {name} has no readable envelope ({e}); moved aside",
                          name=name, e=e)
                os.rename(path, os.path.join(self.directory, f"corrupt-{name}"))
                continue
            states = [CopyState() for _ in envelope.recipients]
            self._replay(os.path.join(path, "journal"), states)
            queued = QueuedMessage(envelope, path, states)
            if all(s.done for s in states):
                try:
                    self._remove(queued)
                except OSError as e:  # final all the same: nothing is delivered again
                    log.error("cannot remove spool entry {name} ({e}); every copy is final",
                              name=name, e=e)
                continue
            yield queued

    @staticmethod
    def _replay(journal: str, states: list[CopyState]) -> None:
        try:
            with open(journal, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return
        for line in lines:
            try:
                entry = json.loads(line)
                state = states[entry["i"]]
            except (ValueError, KeyError, IndexError, TypeError):
                continue  # a torn last line from a crash: the copy is simply not final
            state.attempts = entry.get("attempts", state.attempts)
            state.next_attempt = entry.get("next", state.next_attempt)
            state.done = state.done or entry.get("done", False)

    def record(self, queued: QueuedMessage, index: int, done: bool) -> defer.Deferred:
        """Journal one copy's outcome durably; removes the entry once every copy is final."""
        state = queued.states[index]
        state.done = state.done or done
        line = json.dumps({"i": index, "done": state.done, "attempts": state.attempts,
                           "next": state.next_attempt}).encode() + b"\n"
        return self.run(self._append, queued, line)

    def _append(self, queued: QueuedMessage, line: bytes) -> None:
        with queued.journal_lock:
            self._append_locked(queued, line)

    def _append_locked(self, queued: QueuedMessage, line: bytes) -> None:
        if all(s.done for s in queued.states):
            # The removal is what makes the last copy final, so it has no journal line of
            # its own (no fsync on the common path); if the entry cannot leave active/,
            # the line is written after all, or the copy would be sent again after a restart.
            try:
                self._remove(queued)
                return
            except OSError as e:
                if not os.path.isdir(queued.path):
                    raise  # it left active/: what failed came after
                log.error("cannot remove spool entry {path} ({e}); its copies are journalled "
                          "final and it is removed at the next start", path=queued.path, e=e)
        path = os.path.join(queued.path, "journal")
        new = not os.path.exists(path)
        with open(path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:  # the journal's directory entry must survive a power loss too
            fsync_directory(queued.path)

    def _remove(self, queued: QueuedMessage) -> None:
        # Leave active/ in one atomic rename, then delete: a crash in the middle of a
        # removal must not leave an entry there with its message gone but its
        # envelope still naming copies to deliver. incoming/ is emptied at start-up.
        trash = os.path.join(self.incoming, os.path.basename(queued.path) + ".removed")
        try:
            os.rename(queued.path, trash)
        except FileNotFoundError:
            return
        fsync_directory(self.active)
        shutil.rmtree(trash, ignore_errors=True)

    def read_message(self, queued: QueuedMessage) -> bytes:
        with open(queued.message_path, "rb") as f:
            return f.read()
