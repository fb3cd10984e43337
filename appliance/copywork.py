"""
The CPU work of making copies, as plain functions of bytes and settings.

Preparing a message for tracking, rendering one recipient's copy and signing
it need no state of the appliance: the same functions run in a worker thread
of the appliance (``[appliance] helpers = 0``) and in a helper process
(``appliance.helpers``), which gets its settings as ``KitSettings``, plain
values that cross a pipe.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from twisted.logger import Logger

from appliance import rewrite
from appliance.dkim import Signer, SigningKey
from appliance.links import Keyring, LinkCodec
from appliance.rewrite import Identity, Prepared, without_msys_api
from appliance.rewrite.prepared import MAX_TRACKED_LINKS
from appliance.rewrite.unsubscribe import add_list_unsubscribe, list_unsubscribe_fields
from appliance.settings import Tracking

log = Logger()


def prepare_message(key: str, message: bytes, max_links: int = MAX_TRACKED_LINKS) -> Prepared:
    """The message's prepared form; a bug in preparing costs its tracking, never the message."""
    try:
        prepared = rewrite.prepare(message, max_links)  # looked up here, so tests can stand in for it
    except Exception as e:
        log.failure("could not prepare message {tid} for tracking", tid=key)
        data = without_msys_api(message)
        prepared = Prepared(data, [], [f"internal error: {type(e).__name__}"],
                            had_msys_api=len(data) != len(message))
    prepared.size  # noqa: B018 - measured here, off the reactor, and kept
    return prepared


def render_copy(prepared: Prepared, codec: LinkCodec, identity: Identity, tracking: Tracking,
                max_size: int | None) -> bytes:
    """One recipient's tracked copy; untracked where rendering fails or it would be over ``max_size``."""
    try:
        if max_size is not None and prepared.over_size(codec, identity, tracking, max_size):
            return prepared.data  # the injection event said so: tracking_notes
        return prepared.render(codec, identity, tracking)
    except Exception:
        log.failure("could not render the copy {mid}; delivering it untracked", mid=identity.message_id)
        return prepared.data


def with_list_unsubscribe(copy: bytes, codec: LinkCodec, identity: Identity, tracking: Tracking) -> bytes:
    """The copy with its own List-Unsubscribe fields, if its recipient gets them."""
    if tracking.list_unsubscribe:
        fields = list_unsubscribe_fields(codec, tracking, identity.message_id,
                                         identity.transmission_id, identity.rcpt_to)
        if fields is not None:
            copy = add_list_unsubscribe(copy, fields)
    return copy


class Missing(KeyError):
    """A copy job for a message its helper does not hold: the owner sends it again with the message."""


@dataclass
class PreparedFacts:
    """
    What the owner needs of a message prepared in a helper, which keeps the prepared form.

    The ``injection`` event's facts for each recipient the message had when
    prepared, by message_id; ``dkim_broken`` is answered as ``Prepared``
    answers it, from the flags it reads. Small, so crossing back is cheap.
    """

    notes: dict[str, list[str]]  # message_id -> Prepared.tracking_notes
    resigned: bool  # whether the appliance signs its copies (CopyMaker.resigns)
    part_changes: list[tuple[bool, bool, bool]]  # static_changes, has_links, has_open_pixel
    dkim_signed: bool = False
    dkim_signs_msys_api: bool = False
    dkim_signs_list_unsubscribe: bool = False
    had_msys_api: bool = False

    @property
    def size(self) -> int:
        return 256 + 128 * len(self.notes)

    def changes_body(self, tracking: Tracking) -> bool:
        return tracking.enabled and any(
            static or (tracking.click_tracking and links) or (tracking.open_tracking and pixel)
            for static, links, pixel in self.part_changes)

    def dkim_broken(self, tracking: Tracking) -> bool:
        """As ``Prepared.dkim_broken``."""
        if not self.dkim_signed:
            return False
        return (self.changes_body(tracking) or (self.had_msys_api and self.dkim_signs_msys_api)
                or (tracking.list_unsubscribe and self.dkim_signs_list_unsubscribe))

    @classmethod
    def of(cls, prepared: Prepared, codec: LinkCodec, signer: Signer | None, max_size: int | None,
           recipients: list[tuple[Identity, Tracking]]) -> PreparedFacts:
        return cls(
            notes={identity.message_id: prepared.tracking_notes(codec, identity, tracking, max_size)
                   for identity, tracking in recipients},
            resigned=signer is not None and signer.signs(prepared.data),
            part_changes=[(p.static_changes, p.has_links, p.has_open_pixel) for p in prepared.parts],
            dkim_signed=prepared.dkim_signed, dkim_signs_msys_api=prepared.dkim_signs_msys_api,
            dkim_signs_list_unsubscribe=prepared.dkim_signs_list_unsubscribe,
            had_msys_api=prepared.had_msys_api)


@dataclass(frozen=True)
class KitSettings:
    """What a helper process needs to make copies: plain values, sent once at its start."""

    link_keys: tuple[tuple[int, bytes], ...]
    dkim_keys: tuple[tuple[str, str, bytes, tuple[str, ...]], ...]  # domain, selector, PEM, headers
    max_size: int | None
    cache_entries: int
    cache_bytes: int

    @classmethod
    def of(cls, codec: LinkCodec, signer: Signer | None, max_size: int | None,
           cache_entries: int, cache_bytes: int) -> KitSettings:
        dkim = tuple((k.domain, k.selector, k.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), tuple(k.headers)) for k in (signer.keys if signer else ()))
        return cls(codec.keyring.keys, dkim, max_size, cache_entries, cache_bytes)


class PreparedCache:
    """
    A least-recently-used set of prepared messages, bounded by count and by their size.

    The owner keeps one of these per helper, holding sizes only (estimated:
    the helper knows the real ones), and applies to it the steps the helper
    applies to its own: so it knows, mostly without asking, which messages a
    helper holds, sends a message's copies there, and sends the message only
    to a helper that lacks it. Where the estimate is wrong, the helper says
    ``Missing`` and the owner sends the message.
    """

    def __init__(self, entries: int, max_bytes: int) -> None:
        self.entries = entries
        self.max_bytes = max_bytes
        self.held: OrderedDict[str, tuple[int, object]] = OrderedDict()
        self.bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self.held

    def use(self, key: str) -> object:
        self.held.move_to_end(key)
        return self.held[key][1]

    def discard(self, key: str) -> None:
        old = self.held.pop(key, None)
        if old is not None:
            self.bytes -= old[0]

    def put(self, key: str, size: int, value: object = None) -> None:
        old = self.held.pop(key, None)
        if old is not None:
            self.bytes -= old[0]
        self.held[key] = (size, value)
        self.bytes += size
        while len(self.held) > 1 and (len(self.held) > self.entries or self.bytes > self.max_bytes):
            _, (evicted, _) = self.held.popitem(last=False)
            self.bytes -= evicted


class Kit:
    """A helper's tools: the link codec, the DKIM signer and the prepared messages it holds."""

    def __init__(self, settings: KitSettings) -> None:
        self.codec = LinkCodec(Keyring(settings.link_keys))
        keys = [SigningKey(domain, selector, serialization.load_pem_private_key(pem, password=None),
                           headers)  # type: ignore[arg-type]
                for domain, selector, pem, headers in settings.dkim_keys]
        self.signer = Signer(keys) if keys else None
        self.max_size = settings.max_size
        self.cache: PreparedCache | None = PreparedCache(settings.cache_entries, settings.cache_bytes)

    @classmethod
    def local(cls, codec: LinkCodec, signer: Signer | None, max_size: int | None) -> Kit:
        """The owner's own kit, for its threads: its codec and signer, and no cache of its own."""
        kit = cls.__new__(cls)
        kit.codec, kit.signer, kit.max_size, kit.cache = codec, signer, max_size, None
        return kit

    def use_link_keys(self, keys: tuple[tuple[int, bytes], ...]) -> None:
        self.codec.use(Keyring(keys))

    def run(self, kind: str, args: tuple) -> object:
        """One job by name: what crosses the pipe is its name and plain arguments."""
        if kind == "prepare":
            return self.prepare(*args)
        if kind == "copy":
            return self.copy(*args)
        if kind == "sign":
            return self.sign(*args)
        raise ValueError(f"no such job: {kind!r}")

    def prepare(self, key: str, message: bytes, max_links: int,
                recipients: list[tuple[Identity, Tracking]]) -> PreparedFacts:
        """Prepare and keep the message; what the owner's injection event needs of it."""
        prepared = self._prepared(key, message, max_links)
        return PreparedFacts.of(prepared, self.codec, self.signer, self.max_size, recipients)

    def _prepared(self, key: str, message: bytes | None, max_links: int) -> Prepared:
        if message is None:
            if self.cache is None or key not in self.cache:
                raise Missing(key)
            held = self.cache.use(key)
            assert isinstance(held, Prepared)
            return held
        prepared = prepare_message(key, message, max_links)
        if self.cache is not None:
            self.cache.put(key, prepared.size, prepared)
        return prepared

    def copy(self, key: str, message: bytes | None, max_links: int, identity: Identity,
             tracking: Tracking) -> bytes:
        """
        Render, add List-Unsubscribe, sign: one tracked copy, from the prepared form this
        helper holds, or from ``message`` (prepared here and kept); ``Missing`` if neither.
        """
        prepared = self._prepared(key, message, max_links)
        copy = render_copy(prepared, self.codec, identity, tracking, self.max_size)
        return self.sign(with_list_unsubscribe(copy, self.codec, identity, tracking))

    def sign(self, copy: bytes) -> bytes:
        return copy if self.signer is None else self.signer.sign(copy)
