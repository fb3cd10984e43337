"""
The copy cache: each recipient's copy of a spooled message, made where delivery needs it.

Delivery asks ``CopyMaker`` for a copy as it sends; the maker reads and
prepares each message once (in a worker thread), keeps what it made within
a memory bound, and signs each copy last.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.copywork import PreparedFacts, prepare_message, render_copy, with_list_unsubscribe
from appliance.dkim import Signer
from appliance.links import LinkCodec
from appliance.rewrite import Identity, Prepared, without_msys_api
from appliance.rewrite.prepared import MAX_TRACKED_LINKS
from appliance.settings import Tracking

if TYPE_CHECKING:
    from appliance.helpers import HelperPool

log = Logger()

# Tracked copies whose rewritten parts are larger than this are rendered in the worker.
# A render in the worker still holds the GIL, so the reactor gets back in once per switch
# interval (5 ms): a shorter render gains nothing from the hop (0.1-0.3 ms) but its cost.
# A quoted-printable HTML part renders in about 5 ms at 96 KiB (bench/render_hop_bench.py).
RENDER_INLINE_BYTES = 96 * 1024

# What the copy cache holds of a message: its prepared form, which every copy can be made
# from, or, while no recipient of it has needed more, its text without X-MSYS-API.
_PREPARED, _UNTRACKED = "prepared", "untracked"


class _Pending:
    """Work under way in the worker for one cache entry, and the copies waiting for it."""

    def __init__(self) -> None:
        self.waiting: list[defer.Deferred] = []
        self.keep = True  # False once its message is forgotten: the result is not cached

    def wait(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiting.append(d)
        return d


class CopyMaker:
    """
    The delivery side's renderer: ``render(queued, index)`` gives the copy, or a Deferred of it.

    A copy whose recipient has tracking off is the message without its
    X-MSYS-API header (and DKIM-signed, if configured): nothing is parsed for
    it. A tracked copy is rendered from the message's prepared form. Both are
    kept in memory (least recently used first out, bounded by what they
    really take), so N copies of one message cost one read and at most one
    parse. Whatever reads or parses runs where ``run`` says, a worker thread
    in the appliance: a copy that needs that work comes as a Deferred, and
    one made from what is cached comes at once, unless the parts it rewrites
    are over ``render_inline_bytes``: such a copy is rendered in the worker
    too, so no large copy holds up the reactor. ``forget`` drops a message when its last
    copy is final.

    ``max_links`` caps the tracked links of each part (``smtpapi.max_tracked_links``);
    a copy that could be over ``max_size`` tracked (``smtp.max_message_size``) is
    sent untracked, as the recipient's injection event says.

    With ``helpers`` (``[appliance] helpers`` > 0), the CPU work goes to helper
    processes instead of ``run``: preparing (the message is still read through
    ``run``), every tracked copy (rendered, given its List-Unsubscribe fields
    and signed there, whatever its size) and the signature of an untracked one.
    The prepared form then stays in the helper: what is cached here is its
    ``PreparedFacts``, all the injection event needs.
    """

    def __init__(self, read: Callable[[Any], bytes], codec: LinkCodec,
                 max_bytes: int = 64 * 1024 * 1024, signer: Signer | None = None,
                 run: Callable[..., defer.Deferred] = threads.deferToThread,
                 max_links: int = MAX_TRACKED_LINKS, max_size: int | None = None,
                 render_inline_bytes: int = RENDER_INLINE_BYTES,
                 now: Callable[[], float] = time.time, trap_links: bool = False,
                 helpers: HelperPool | None = None) -> None:
        """
        ``now`` is the send time each copy's links carry (``LinkData.issued``);
        ``trap_links`` puts the hidden trap link in tracked HTML parts; ``helpers``
        are processes that do the CPU work instead of ``run``, if any.
        """
        self.read = read
        self.codec = codec
        self.max_bytes = max_bytes
        self.signer = signer  # DKIM: each copy is signed after its rewrite
        self.run = run  # where messages are read and parsed: a worker thread
        self._cache: OrderedDict[tuple[str, str], Prepared | PreparedFacts | bytes] = OrderedDict()
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._bytes = 0
        self.max_links = max_links
        self.max_size = max_size
        self.render_inline_bytes = render_inline_bytes
        self.now = now
        self.trap_links = trap_links
        self.helpers = helpers  # processes that do the CPU work instead of ``run``, if any

    def __contains__(self, transmission_id: str) -> bool:
        """Whether anything of this message is cached."""
        return (transmission_id, _PREPARED) in self._cache or (transmission_id, _UNTRACKED) in self._cache

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def __call__(self, queued: Any, index: int) -> bytes | defer.Deferred:
        tid = queued.envelope.transmission_id
        recipient = queued.envelope.recipients[index]
        tracking = recipient.tracking
        if not tracking.enabled:
            data = self._untracked(tid)
            if data is not None:
                return self._finish(data, tid, recipient)
            later = self._later((tid, _UNTRACKED),
                                lambda: self.run(lambda: without_msys_api(self.read(queued))))
            return later.addCallback(self._finish, tid, recipient)
        if self.helpers is not None:  # made where its message is held, or read for
            identity = _identity(tid, recipient, int(self.now()), self.trap_links)
            return self.helpers.copy(tid, self.max_links, identity, tracking,
                                     lambda: defer.maybeDeferred(self.run, self.read, queued))
        prepared = self._hit((tid, _PREPARED))
        if prepared is not None:
            return self._copy(prepared, tid, recipient, tracking)
        return self.prepare_later(queued).addCallback(self._copy, tid, recipient, tracking)

    def prepare_later(self, queued: Any) -> defer.Deferred:
        """
        The message's prepared form, read and parsed in the worker unless cached.

        At injection, for the ``injection`` event; at delivery, for a tracked
        copy after a restart or an eviction. A large message would otherwise
        hold up every connection for as long as it takes to parse.
        """
        tid = queued.envelope.transmission_id
        hit = self._hit((tid, _PREPARED))
        if hit is not None:
            return defer.succeed(hit)
        helpers = self.helpers
        if helpers is not None:
            recipients = [(_identity(tid, r), r.tracking) for r in queued.envelope.recipients]
            return self._later((tid, _PREPARED), lambda: defer.maybeDeferred(self.run, self.read, queued)
                               .addCallback(lambda message: helpers.prepare(tid, message, self.max_links,
                                                                            recipients)))
        return self._later((tid, _PREPARED),
                           lambda: self.run(lambda: self._prepare(tid, self.read(queued), self.max_links)))

    def forget(self, transmission_id: str) -> None:
        """Drop what is held of a message: its last copy is final."""
        for kind in (_PREPARED, _UNTRACKED):
            key = (transmission_id, kind)
            old = self._cache.pop(key, None)
            if old is not None:
                self._bytes -= _cost(old)
            pending = self._pending.get(key)
            if pending is not None:
                pending.keep = False

    def tracking_notes(self, prepared: Prepared | PreparedFacts, transmission_id: str,
                       recipient: Any) -> list[str]:
        """``Prepared.tracking_notes`` for one recipient of the spool's envelope."""
        if isinstance(prepared, PreparedFacts):
            return prepared.notes.get(recipient.message_id, [])
        return prepared.tracking_notes(self.codec, _identity(transmission_id, recipient),
                                       recipient.tracking, self.max_size)

    def resigns(self, prepared: Prepared | PreparedFacts) -> bool:
        """Whether the copies of this message get the appliance's own DKIM signature."""
        if isinstance(prepared, PreparedFacts):
            return prepared.resigned
        return self.signer is not None and self.signer.signs(prepared.data)

    # -- making one copy -------------------------------------------------------------------

    def _untracked(self, tid: str) -> bytes | None:
        """The untracked copy from the cache: the prepared form's text serves as well."""
        prepared = self._hit((tid, _PREPARED))
        if isinstance(prepared, Prepared):  # not PreparedFacts: a helper holds that text
            return prepared.data
        data = self._hit((tid, _UNTRACKED))
        assert data is None or isinstance(data, bytes)
        return data

    def _copy(self, prepared: Prepared, tid: str, recipient: Any,
              tracking: Tracking) -> bytes | defer.Deferred:
        if self.helpers is not None:
            identity = _identity(tid, recipient, int(self.now()), self.trap_links)
            return self.helpers.copy(tid, prepared, identity, tracking)
        if prepared.changes_body(tracking) and sum(
                p.end - p.start for p in prepared.parts if p.changes(tracking)) > self.render_inline_bytes:
            d = defer.maybeDeferred(self.run, lambda: self._render(prepared, tid, recipient, tracking))
            return d.addCallback(self._finish, tid, recipient)
        return self._finish(self._render(prepared, tid, recipient, tracking), tid, recipient)

    def _render(self, prepared: Prepared, tid: str, recipient: Any, tracking: Tracking) -> bytes:
        identity = _identity(tid, recipient, int(self.now()), self.trap_links)
        return render_copy(prepared, self.codec, identity, tracking, self.max_size)

    def _finish(self, copy: bytes, tid: str, recipient: Any) -> bytes | defer.Deferred:
        """The copy's own List-Unsubscribe fields (if it gets them), then its signature."""
        copy = with_list_unsubscribe(copy, self.codec, _identity(tid, recipient), recipient.tracking)
        return self._sign(copy)

    def _sign(self, copy: bytes) -> bytes | defer.Deferred:
        # Signing is last: nothing may change the copy after it. A failure here is not
        # caught: the copy is deferred rather than sent without the signature it should have.
        # It runs in the worker: an RSA signature and the body hash cost about as much as
        # the render, and OpenSSL and hashlib let go of the GIL while they work.
        if self.signer is None:
            return copy
        if self.helpers is not None:
            return self.helpers.sign(copy)
        return defer.maybeDeferred(self.run, self.signer.sign, copy)

    @staticmethod
    def _prepare(key: str, message: bytes, max_links: int = MAX_TRACKED_LINKS) -> Prepared:
        return prepare_message(key, message, max_links)

    # -- the cache ----------------------------------------------------------------------------

    def _hit(self, key: tuple[str, str]) -> Any:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
        return hit

    def _later(self, key: tuple[str, str], start: Callable[[], Any]) -> defer.Deferred:
        """The work ``start`` starts, once for however many copies wait for it; its result cached."""
        pending = self._pending.get(key)
        if pending is not None:
            return pending.wait()
        pending = self._pending[key] = _Pending()
        waiter = pending.wait()  # before the work starts: it may be done at once
        defer.maybeDeferred(start).addBoth(self._done, key, pending)
        return waiter

    def _done(self, result: Any, key: tuple[str, str], pending: _Pending) -> None:
        del self._pending[key]
        if not isinstance(result, Failure) and pending.keep:
            self._keep(key, result)
        for d in pending.waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _keep(self, key: tuple[str, str], value: Prepared | PreparedFacts | bytes) -> None:
        if isinstance(value, Prepared):  # its text is in there: the untracked form is not needed any more
            untracked = self._cache.pop((key[0], _UNTRACKED), None)
            if untracked is not None:
                self._bytes -= _cost(untracked)
        old = self._cache.pop(key, None)
        if old is not None:
            self._bytes -= _cost(old)
        self._cache[key] = value
        self._bytes += _cost(value)
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._bytes -= _cost(evicted)


def _cost(value: Prepared | PreparedFacts | bytes) -> int:
    return value.size if isinstance(value, Prepared | PreparedFacts) else sys.getsizeof(value)


def _identity(transmission_id: str, recipient: Any, issued: int = 0, trap_link: bool = False) -> Identity:
    # The address as injected: engagement events give it as raw_rcpt_to, and lower-case it for rcpt_to.
    return Identity(recipient.message_id, transmission_id, recipient.address, issued, trap_link)
