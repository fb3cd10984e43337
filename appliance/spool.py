"""
The durable spool: where an accepted message lives until every copy has a final outcome.

Layout (Postfix-like commit protocol)::

    incoming/<id>         being received; never read by delivery
    incoming/spare-*      empty files made ahead; a transaction takes one
                          and is received into it; a committed message's
                          first name, until active/'s fsync covers its entry
    active/<id>           committed: the message as injected (canonical CRLF),
                          then its envelope (sender, recipients, ids, tracking,
                          events owed) and a fixed-size trailer saying how long
                          the envelope is
    journal/<id>          one JSON line per recipient outcome or retry

A transaction is committed by writing the envelope after the message in its
one file, fsyncing that file, renaming it from ``incoming/`` into ``active/``
and fsyncing ``active/``, all in one file-pool thread. Only then may the
injection server answer ``250``. That directory fsync is shared
(``ThreadedDirectorySync``): one covers every entry renamed before it began,
so concurrent transactions pay for one. A message received into a spare
file skips it: the spare's name was made durable before it was handed out,
so the message is on disk once its file is, and its envelope holds its
text's CRC-32. Its entry in ``active/`` is a link, and the spare's name goes
once an fsync of ``active/`` covers the entry's. At start-up ``incoming/`` is
emptied, but for a spare whose entry is missing from ``active/`` and whose
checksum matches its text: that one was committed, and is linked into
``active/``. Nothing else there was ever acknowledged.

Entries written before envelope schema 3 are directories, ``active/<id>/``
holding ``message``, ``envelope.json`` and their ``journal``; they are read,
journalled and removed as they always were.

The journal records what happened to each recipient's copy. A copy is final
once a ``done`` line for it is on disk, and the entry is removed only when
every copy is final, so a crash between "event written" and "spool cleaned"
costs at most a repeated removal, never a lost copy. The last copy to become
final needs no line: leaving ``active/`` is its mark, and only if that fails
is its line written after all. Removal first renames the entry out of
``active/`` (into ``incoming/``, emptied at start-up), so a crash during it
never leaves a half-deleted entry to be delivered again; a journal left
without its entry is removed at start-up.

Given a clock, an entry whose every copy is final is renamed out of ``active/``
as soon as the file pool takes it, and the fsync of ``active/`` that makes that
rename survive a power loss comes about ``remove_delay`` seconds later (plus
the file pool's queue), one for every entry renamed meanwhile; only then are
their files deleted. A kill after the rename does not send a final copy
again (one between its event and the rename does, as it always could); a
power loss before the fsync may, as RFC 5321 §6.1 allows, and loses nothing.
A stop makes the waiting renames durable at once.

The journal also says when a message's ``injection`` events, owed since its
``250``, have been written (``announced``); that line has no fsync of its own,
and recovery writes the events of an entry without one (those the event log's
tail does not hold already). Given a clock, the spool writes these marks
``mark_delay`` seconds late, many in one file-pool call, and not at all for
entries that left ``active/`` meanwhile: most messages are delivered by then
and never get a journal.

File system calls that block (fsync, rename, removal) go through ``run``,
which is the appliance's file thread pool and a synchronous call in tests.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from appliance.envelope import TRAILER_SIZE, CopyState, Envelope, NewerEnvelope, QueuedMessage, read_trailer
from appliance.files import fsync_directory
from appliance.files import remove_path as _remove_path
from appliance.groupcommit import DelayedBatch, ThreadedDirectorySync
from appliance.spares import SpareFiles, is_spare, without_spares
from appliance.spoolwriter import SpoolWriter

log = Logger()

Runner = Callable[..., defer.Deferred]


def run_synchronously(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args, **kwargs)


# Characters of a copy's last error kept in its journal line (the event has it whole).
MAX_JOURNALLED_ERROR = 512


def _journal_line(index: int, state: CopyState) -> bytes:
    entry: dict[str, Any] = {"i": index, "done": state.done, "attempts": state.attempts,
                             "next": state.next_attempt}
    if state.held:
        entry["held"] = True
    if state.last_error and not state.done:
        entry["error"] = state.last_error[:MAX_JOURNALLED_ERROR]
    return json.dumps(entry).encode() + b"\n"


def entries_on_disk(directory: str) -> list[str]:
    """What a spool directory holds: entries in ``active/``, transactions in ``incoming/``; no spare file."""
    return (os.listdir(os.path.join(directory, "active"))
            + without_spares(os.listdir(os.path.join(directory, "incoming"))))


def _entry_name(name: str) -> bool:
    """Whether ``name`` can be an entry's name in active/: one plain file name."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# Entries leaving active/ wait at most this long for others to share their directory fsync,
# and at most this many go in one batch.
REMOVE_DELAY = 0.1
REMOVE_BATCH = 500


class Spool:
    def __init__(self, directory: str, run: Runner = threads.deferToThread,
                 clock: IReactorTime | None = None, mark_delay: float = 1.0,
                 remove_delay: float = REMOVE_DELAY, spares: int = 0) -> None:
        self.directory = directory
        self.incoming = os.path.join(directory, "incoming")
        self.active = os.path.join(directory, "active")
        self.journal = os.path.join(directory, "journal")
        self.run = run
        # Called in file-pool threads, after a rename into or out of the directory (or a
        # journal's creation) and before anything is answered or deleted because of it.
        self.active_sync = ThreadedDirectorySync(self.active)
        # incoming/ too, before an entry's journal and text go: the names of the spares
        # messages were committed under are removed from there (``_unlink_spare``).
        self.incoming_sync = ThreadedDirectorySync(self.incoming)
        self.journal_sync = ThreadedDirectorySync(self.journal)
        self.clock = clock
        self.mark_delay = mark_delay
        self.remove_delay = remove_delay
        self._batching = True  # until a stop: then each entry leaves at once
        # Given a clock: the "events written" marks, and the fsync of active/ after entries
        # left it, each done for many entries in one file-pool call.
        self._marks: DelayedBatch | None = None
        self._removals: DelayedBatch | None = None
        self._spare_names: DelayedBatch | None = None
        if clock is not None:
            self._marks = DelayedBatch(clock, mark_delay, run, self._mark_announced)
            self._removals = DelayedBatch(clock, remove_delay, run, self._sync_removed)
            self._spare_names = DelayedBatch(clock, remove_delay, run, self._drop_spare_names)
        # Whether incoming/ was there at the last look; looked at again after a commit fails.
        self._usable = False
        # The transmission ids of committed messages a start left in their spare files in
        # incoming/ (``_take_committed``): their journals are not orphans.
        self._kept_spares: set[str] = set()
        # Called with each recovered entry whose events are still owed, before it is yielded
        # (so before its delivery is scheduled): the injector writes them.
        self.on_owed: Callable[[QueuedMessage], Any] | None = None
        # Empty files kept ready in incoming/ for the next transactions (``appliance.spares``):
        # none made unless asked for (the appliance asks; tests may).
        self.spares = SpareFiles(self.incoming, run, spares)

    def prepare(self) -> None:
        """Create the layout and drop every unacknowledged transaction."""
        self.spares.reopen()
        for d in (self.directory, self.incoming, self.active, self.journal):
            os.makedirs(d, mode=0o700, exist_ok=True)
        # Entries the last run renamed out of active/ may not be durably out yet (it was
        # killed before their batch's fsync): that must hold before their files and
        # journals are deleted below, or a power loss could bring an entry back without
        # its journal, and every copy of it would be sent again. The same fsync makes
        # durable the entries linked into active/ from spares holding committed messages.
        names = os.listdir(self.incoming)
        self._kept_spares = set()
        kept = {name for name in names if is_spare(name) and self._take_committed(name)}
        fsync_directory(self.active)
        for name in names:
            if name in kept:
                continue
            if not is_spare(name):  # a spare: empty, linked into active/, or never acknowledged
                log.info("discarding unacknowledged spool entry {name}", name=name)
            _remove_path(os.path.join(self.incoming, name))
        # Before recover() deletes a journal: a spare's name must not come back after a power
        # loss once its entry is gone, with its copies to send again.
        fsync_directory(self.incoming)

    def _take_committed(self, name: str) -> bool:
        """
        Link a spare that holds a committed message into active/; whether to keep the spare.

        The spare's name outlived its commit, which links the entry into
        active/ and removes this name later: if the entry is there, the spare
        is only dropped. If not, the kill came before the link. Were it before
        the fsync, a power loss could have left the file in part: then the
        checksum of its text, written in its envelope, does not match, and the
        message, never acknowledged, is dropped with the other files.
        """
        path = os.path.join(self.incoming, name)
        try:
            with open(path, "rb") as f:
                envelope, end = read_trailer(f)
                tid = envelope.transmission_id
                if (envelope.text_crc32 is None  # committed by a rename, which never came
                        or not isinstance(tid, str) or not _entry_name(tid)
                        or os.path.exists(os.path.join(self.active, tid))):
                    return False
                f.seek(0)
                if zlib.crc32(f.read(end)) != envelope.text_crc32:
                    return False
        except NewerEnvelope as e:
            log.error("spool file incoming/{name} was written by a newer version ({e}); left in place",
                      name=name, e=e)
            if isinstance(e.transmission_id, str):
                self._kept_spares.add(e.transmission_id)
            return True
        except (OSError, ValueError, TypeError, KeyError):
            return False
        try:
            os.link(path, os.path.join(self.active, tid))
        except OSError as e:
            log.error("spool file incoming/{name} holds committed message {tid}, which cannot be "
                      "linked into active/ ({e}); left in place", name=name, tid=tid, e=e)
            self._kept_spares.add(tid)
            return True
        log.info("spool entry {tid} was committed but not yet linked into active/; linked", tid=tid)
        return False

    def writer(self, transmission_id: str) -> SpoolWriter:
        """A new entry's writer, with a spare file made ahead, or its file being created now."""
        self.check_usable()  # before a spare is taken: a refused transaction keeps none
        spare = self.spares.take()
        writer = SpoolWriter(self, transmission_id, spare)
        if spare is None:
            writer.create_early()
        self.spares.top_up()
        return writer

    def check_usable(self) -> None:
        """
        Raise at DATA, rather than after the client sent it all, if incoming/ is missing.

        Looked at once, then again only after a commit failed: a stat per
        message on the reactor thread is not free.
        """
        if self._usable:
            return
        if not os.path.isdir(self.incoming):
            raise FileNotFoundError(f"spool directory {self.incoming} is missing")
        self._usable = True

    def recover(self) -> Iterator[QueuedMessage]:
        """Every committed message with at least one copy not yet final."""
        names = sorted(os.listdir(self.active))
        for name in names:
            path = os.path.join(self.active, name)
            try:
                if os.path.isdir(path):
                    with open(os.path.join(path, "envelope.json"), "rb") as f:
                        envelope = Envelope.from_json(f.read())
                    queued = QueuedMessage(envelope, path, [CopyState() for _ in envelope.recipients])
                else:
                    queued = self._read_entry(name, path)
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
            queued.announced = self._replay(queued.journal_path, queued.states)
            if all(s.done for s in queued.states):
                try:
                    self._remove(queued)
                except OSError as e:  # final all the same: nothing is delivered again
                    log.error("cannot remove spool entry {name} ({e}); every copy is final",
                              name=name, e=e)
                continue
            if queued.owes_events and self.on_owed is not None:
                try:
                    self.on_owed(queued)
                except Exception:
                    log.failure("could not write the events owed for spool entry {name}", name=name)
            yield queued
        self._drop_orphan_journals(set(os.listdir(self.active)) | self._kept_spares)

    def _read_entry(self, name: str, path: str) -> QueuedMessage:
        """A schema-3 entry: the envelope is read from the end of its one file."""
        with open(path, "rb") as f:
            envelope, end = read_trailer(f)
        return QueuedMessage(envelope, path, [CopyState() for _ in envelope.recipients],
                             message_end=end, journal=os.path.join(self.journal, name))

    def _drop_orphan_journals(self, entries: set[str]) -> None:
        """Journals whose entry left active/ (a crash in the middle of a removal)."""
        try:
            names = os.listdir(self.journal)
        except FileNotFoundError:
            return
        for name in names:
            if name not in entries:
                _remove_path(os.path.join(self.journal, name))

    @staticmethod
    def _replay(journal: str, states: list[CopyState]) -> bool:
        """Apply the journal to ``states``; whether the owed events are marked written."""
        try:
            with open(journal, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return False
        announced = False
        for line in lines:
            try:
                entry = json.loads(line)
                if entry.get("announced") is True:
                    announced = True
                    continue
                state = states[entry["i"]]
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                continue  # a torn last line from a crash: the copy is simply not final
            state.attempts = entry.get("attempts", state.attempts)
            state.next_attempt = entry.get("next", state.next_attempt)
            state.done = state.done or entry.get("done", False)
            state.held = entry.get("held", False) is True
            state.last_error = entry.get("error", state.last_error)
        return announced

    def record(self, queued: QueuedMessage, index: int, done: bool) -> defer.Deferred:
        """Journal one copy's outcome durably; removes the entry once every copy is final."""
        state = queued.states[index]
        state.done = state.done or done
        line = _journal_line(index, state)
        removals = self._removals
        if (removals is None or self.remove_delay <= 0 or not self._batching
                or not all(s.done for s in queued.states)):
            return self.run(self._append, queued, line)

        def left(has_left: bool) -> Any:
            if not has_left:  # journalled final instead, or gone already
                return None
            synced = removals.add(queued)
            if len(removals.waiting) >= REMOVE_BATCH or not self._batching:
                removals.flush()
            return synced

        return self.run(self._leave_or_journal, queued, line).addCallback(left)

    def write_removals(self) -> None:
        """Make the renames out of active/ waiting for ``remove_delay`` durable now, and delete."""
        if self._removals is not None:
            self._removals.flush()

    def stop_batching(self) -> None:
        """A stop: the waiting removals are made durable now, and every later one at once."""
        self._batching = False
        self.write_removals()
        if self._spare_names is not None:
            self._spare_names.flush()

    def _leave_or_journal(self, queued: QueuedMessage, line: bytes) -> bool:
        """
        Whether the entry left active/ just now, its directory's fsync still to come.

        Renamed at once, so a kill from then on does not send a final copy
        again; only the fsync that makes the rename survive a power loss waits
        for the batch.
        An entry that cannot leave gets its last copy's journal line instead,
        as ``_append`` does.
        """
        with queued.journal_lock:
            try:
                return self._leave_active(queued)
            except OSError:
                self._append_locked(queued, line)  # tries to leave once more, then journals
                return False

    def _sync_removed(self, batch: list[QueuedMessage]) -> None:
        """
        One fsync of active/ for every entry of the batch; then their files go.

        If it fails, it is logged once and nothing is deleted: the entries'
        files wait in incoming/ for the next start. Their copies are final all
        the same (they left active/), so nothing is retried or reported per copy.
        """
        try:
            self._sync_left()
        except OSError as e:
            log.error("spool: the directory fsync after {n} finished entries left {path} failed "
                      "({e}); their files stay in incoming/ until the next start, and a power loss "
                      "now could send their copies again", path=self.active, n=len(batch), e=e)
            return
        for queued in batch:
            try:
                with queued.journal_lock:
                    self._delete_removed(queued)
            except OSError as e:  # final and out of active/: what is left goes at the next start
                log.error("cannot delete the files of spool entry {path} ({e})", path=queued.path, e=e)

    def record_states(self, queued: QueuedMessage, indexes: list[int]) -> defer.Deferred:
        """Journal several copies' states (an operator's hold or release) in one durable write."""
        lines = b"".join(_journal_line(i, queued.states[i]) for i in indexes)
        return self.run(self._append, queued, lines)

    def announced(self, queued: QueuedMessage) -> defer.Deferred:
        """
        Mark the events owed since the 250 as written: one journal line, with no fsync.

        Losing it (a power loss, not a kill) only means recovery looks for the
        events in the event log's tail and writes those it does not find. With
        a clock, the mark waits ``mark_delay`` and goes with the others then.
        """
        queued.announced = True
        if self._marks is None:
            return self.run(self._mark_announced, [queued])
        return self._marks.add(queued)

    def write_marks(self) -> None:
        """Write the marks waiting for ``mark_delay`` now (a stop does not wait for it)."""
        if self._marks is not None:
            self._marks.flush()

    def _mark_announced(self, marks: list[QueuedMessage]) -> None:
        for queued in marks:
            with queued.journal_lock:
                if queued.left or not os.path.exists(queued.path):
                    continue  # every copy final and the entry gone: nothing is owed any more
                queued.journal_written = True
                with open(queued.journal_path, "ab") as f:
                    f.write(b'{"announced":true}\n')

    def _append(self, queued: QueuedMessage, line: bytes) -> None:
        """Write ``line`` durably, or remove the entry if that is the last copy's mark."""
        with queued.journal_lock:
            self._append_locked(queued, line)

    def _append_locked(self, queued: QueuedMessage, line: bytes) -> None:
        if all(s.done for s in queued.states):
            # The removal is what makes the last copy final, so it has no journal line of
            # its own (no fsync on the common path); if the entry cannot leave active/,
            # the line is written after all, or the copy would be sent again after a restart.
            try:
                if self._leave_active(queued):
                    # Its leaving must be on disk before its text and journal go (active/'s
                    # fsync, shared with commits' renames).
                    self._sync_left()
                    self._delete_removed(queued)
                return
            except OSError as e:
                if not os.path.exists(queued.path):
                    raise  # it left active/: what failed came after
                log.error("cannot remove spool entry {path} ({e}); its copies are journalled "
                          "final and it is removed at the next start", path=queued.path, e=e)
        path = queued.journal_path
        queued.journal_written = True
        with open(path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if queued.journal_durable:
            return
        # The journal's directory entry must survive a power loss too: schema 3's in
        # journal/, fsynced once for many.
        if queued.journal:
            self.journal_sync.sync()
        else:
            fsync_directory(queued.path)
        queued.journal_durable = True

    def _remove(self, queued: QueuedMessage) -> None:
        """Leave active/ durably and delete what is left, all at once (at start-up)."""
        if self._leave_active(queued):
            self._sync_left()
            self._delete_removed(queued)

    def commit_failed(self) -> None:
        """A commit failed: incoming/ is looked at again, and the spares made in it are dropped."""
        self._usable = False
        self.spares.drop()  # made in an incoming/ that may be gone now

    def committed(self, queued: QueuedMessage) -> QueuedMessage:
        """After a commit into a spare: its name goes once active/'s fsync covers the entry's."""
        if queued.spare is not None:
            if self._spare_names is not None and self._batching:
                d = self._spare_names.add(queued)
            else:
                d = self.run(self._drop_spare_names, [queued])
            d.addErrback(lambda f: log.failure("could not remove the spare file's name of {tid}", f,
                                               tid=queued.envelope.transmission_id))
        return queued

    def _drop_spare_names(self, batch: list[QueuedMessage]) -> None:
        """
        One fsync of active/ for the batch's entries; then the spare names they were committed under go.

        Until then each message is durable under its spare's name only. A
        name left (a failed fsync, a kill) is dropped by the next start, which
        finds the entry in active/.
        """
        if all(queued.spare is None for queued in batch):  # each left active/, its name with it
            return
        try:
            self.active_sync.sync()
        except OSError as e:
            log.error("spool: the fsync of {path} for {n} new entries failed ({e}); their spare "
                      "files' names stay in incoming/ until they are delivered or the next start",
                      path=self.active, n=len(batch), e=e)
            return
        for queued in batch:
            with queued.journal_lock:
                self._unlink_spare(queued)

    @staticmethod
    def _unlink_spare(queued: QueuedMessage) -> None:
        if queued.spare is None:
            return
        try:
            _unlink(queued.spare)
        except OSError as e:
            log.error("cannot remove {path}, the spare file's name of spool entry {tid} ({e}); were "
                      "the entry gone by the next start, that start would deliver it again",
                      path=queued.spare, tid=queued.envelope.transmission_id, e=e)
        queued.spare = None

    def _sync_left(self) -> None:
        """
        Make entries' leaving durable, before their text and journal are deleted.

        active/ for their renames out of it; incoming/ for the removal of their
        spare files' names (``_leave_active``, ``_drop_spare_names``): a spare's
        name must not outlive its entry's journal, or a power loss could bring
        the message back with no word of its copies.
        """
        self.active_sync.sync()
        self.incoming_sync.sync()

    def _leave_active(self, queued: QueuedMessage) -> bool:
        # Leave active/ in one atomic rename, then delete: a crash in the middle of a
        # removal must not leave an entry there with its message gone but its
        # envelope still naming copies to deliver. incoming/ is emptied at start-up.
        # A spare's name still there goes first: left after the rename, a kill would
        # have the start link it back into active/, and send the last copy again.
        self._unlink_spare(queued)  # made durable with the rename, by ``_sync_left``
        try:
            os.rename(queued.path, self._trash(queued))
        except FileNotFoundError:
            return False
        queued.left = True
        return True

    def _trash(self, queued: QueuedMessage) -> str:
        return os.path.join(self.incoming, os.path.basename(queued.path) + ".removed")

    def _delete_removed(self, queued: QueuedMessage) -> None:
        """Once its leaving active/ is on disk: the entry's text and journal go."""
        if queued.journal:  # schema 3: two files
            _unlink(self._trash(queued))
            if queued.journal_written:  # most messages are delivered before they need one
                _unlink(queued.journal)
        else:
            _remove_path(self._trash(queued))

    def read_envelope(self, queued: QueuedMessage) -> Envelope:
        """
        The envelope as committed, every recipient's details included, read back from the entry.

        Delivery keeps only what it lists and routes by in memory while a
        message's copies wait for their next attempt (``DeliveryService``).
        """
        if queued.message_end < 0:
            with open(os.path.join(queued.path, "envelope.json"), "rb") as f:
                return Envelope.from_json(f.read())
        with open(queued.path, "rb") as f:
            f.seek(queued.message_end)
            data = f.read()
        if len(data) < TRAILER_SIZE or not data.endswith(b"\n"):
            raise ValueError(f"spool entry {queued.path} has no envelope after its message")
        return Envelope.from_json(data[:-TRAILER_SIZE])

    def read_message(self, queued: QueuedMessage) -> bytes:
        text = queued.text
        if text is not None:
            return text
        with open(queued.message_path, "rb") as f:
            return f.read(queued.message_end) if queued.message_end >= 0 else f.read()
