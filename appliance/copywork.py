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

    The owner keeps one of these per helper, holding sizes only, and applies
    to it the very steps the helper applies to its own: so it knows, without
    asking, which messages a helper holds and sends a prepared form only to
    a helper that lacks it.
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
            return prepare_message(*args)
        if kind == "copy":
            return self.copy(*args)
        if kind == "sign":
            return self.sign(*args)
        raise ValueError(f"no such job: {kind!r}")

    def copy(self, key: str, prepared: Prepared | None, size: int, identity: Identity,
             tracking: Tracking) -> bytes:
        """
        Render, add List-Unsubscribe, sign: one tracked copy. ``prepared`` is ``None``
        when this helper holds it already (the owner's mirror of ``cache`` says so).
        """
        if prepared is None:
            assert self.cache is not None
            held = self.cache.use(key)
            assert isinstance(held, Prepared)
            prepared = held
        elif self.cache is not None:
            self.cache.put(key, size, prepared)
        copy = render_copy(prepared, self.codec, identity, tracking, self.max_size)
        return self.sign(with_list_unsubscribe(copy, self.codec, identity, tracking))

    def sign(self, copy: bytes) -> bytes:
        return copy if self.signer is None else self.signer.sign(copy)
