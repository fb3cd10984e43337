"""
Tracked links: compact, private tokens that carry everything the tracker needs.

The tracker keeps no state, so a token must say what happened (an open, an
initial open or a click), to whom, in which message and campaign, where a
click goes, and until when the link counts; nobody without the key may
forge or alter one, or the tracker becomes an open redirect; and nobody who
sees a URL (a forwarded mail, a proxy's log, a referrer) may read who it was
sent to or anything else it carries.

A token is URL-safe base64 without padding of::

    version (1 byte) | key id (1 byte) | AES-SIV(the key of that version and key id, body)

AES-SIV (RFC 5297) is deterministic authenticated encryption: its 16-byte
synthetic IV is both the nonce and the tag, so a token is exactly as long as
the signed-only format was, needs no random nonce, and one link of one copy
always gives the same token. ``body`` is a JSON array of the fields,
raw-deflated when it is long and that makes it shorter (the version byte's
low bit says so). Each AES-SIV key is derived with HKDF from a key of the key
file (whose format is unchanged), with the version byte in HKDF's info: the
clear bytes choose the key, so changing either fails the token as surely as
associated data would, and costs nothing per token (associated data costs
AES-SIV another pass per token). The key file lists several keys so they can
be rotated: the first encrypts, all decrypt.

Tokens of the first format (version 0x10: the same body in clear, with an
HMAC-SHA256 tag) were sent before tokens were encrypted; they are still
verified and read, and stop working when they expire, as any link does.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import json
import os
import re
import secrets
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any, NamedTuple
from urllib.parse import quote

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.logger import Logger

from appliance.files import write_atomically

TAG_BYTES = 16  # AES-SIV's synthetic IV, as the first format's truncated HMAC
MAX_URL_LENGTH = 4096
_VERSION = 0x20  # encrypted (AES-SIV)
_SIGNED_VERSION = 0x10  # the first format: readable body, HMAC-SHA256; read, never made
_DEFLATED = 0x01
# HKDF's info for the AES-SIV keys, before the version byte: binds each derived key to this
# one use of the key file's keys, and to one version.
_AEAD_INFO = b"engage-appliance link tokens: AES-SIV-512 key for version "
# "unsubscribe": a copy's List-Unsubscribe URL (RFC 8058), served at /u/ by the tracker.
KINDS = ("open", "initial_open", "click", "unsubscribe")
_KIND_CODES = {"open": "o", "initial_open": "i", "click": "c", "unsubscribe": "u"}
_KIND_NAMES = {v: k for k, v in _KIND_CODES.items()}
# How many leading fields of a click token's body the recipient's copy decides (to ``issued``).
SHARED_FIELDS = 9
# Bodies shorter than this are not deflated: the saving on a short link is a few
# characters, and the token of such a link stays well under 500 characters anyway.
DEFLATE_FROM = 320


_URLSAFE = bytes.maketrans(b"+/", b"-_")
_log = Logger()


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_json_string = json.encoder.encode_basestring  # a str as that encoder writes it (ensure_ascii=False)


def _json(value: Any) -> bytes:
    """Compact JSON, as ``json.dumps`` with these options gives it, without building an encoder per call."""
    return _ENCODER.encode(value).encode()


class InvalidToken(ValueError):
    """A token that is not one of ours: malformed, altered, or signed by an unknown key."""


class KeyFileError(Exception):
    """The signing key file is missing, unreadable or malformed."""


class LinkData(NamedTuple):
    """
    What one tracked link says; ``metadata`` is ``None`` when the link does not carry it.

    ``issued`` is when the copy was made (Unix seconds; 0 in links made before
    tokens carried it), so a click seconds after delivery can be told for a
    scanner's; ``trap`` marks the hidden link no reader sees.

    A named tuple rather than a dataclass: the tracker builds one per hit, and a
    tuple is built several times faster than a frozen dataclass.
    """

    kind: str
    expiry: int
    message_id: str
    transmission_id: str
    rcpt_to: str
    campaign_id: str = ""
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = None
    link_name: str = ""
    target: str = ""
    unsubscribe: bool = False
    issued: int = 0
    trap: bool = False
    anchor: str = ""  # a click's anchor text (the link's text, or its image's alt)

    def expired(self, now: float) -> bool:
        return now >= self.expiry

    def to_array(self) -> list[Any]:
        # ``issued`` goes with the recipient's fields, ahead of the link's own, so the
        # fast click encoder shares it; ``trap`` and ``anchor`` last (see ``from_array``).
        return [_KIND_CODES[self.kind], self.expiry, self.message_id, self.transmission_id,
                self.rcpt_to, self.campaign_id, list(self.tags), self.metadata, self.issued,
                self.link_name, self.target, 1 if self.unsubscribe else 0, 1 if self.trap else 0,
                self.anchor]

    @classmethod
    def from_array(cls, f: Any) -> LinkData:
        """
        The fields of a token's body. 14 fields; 11 in the first format's (no send time,
        trap mark or anchor text); 13 in bodies that had the send time but no anchor.
        """
        if type(f) is not list or len(f) not in (11, 13, 14):
            raise InvalidToken("token body has the wrong shape")
        issued, trap, anchor = 0, 0, ""
        if len(f) == 11:
            kind, expiry, mid, tid, rcpt, campaign, tags, meta, name, target, unsub = f
        else:
            kind, expiry, mid, tid, rcpt, campaign, tags, meta, issued, name, target, unsub, trap = f[:13]
            if len(f) == 14:
                anchor = f[13]
        if (kind not in _KIND_NAMES or type(expiry) is not int or type(issued) is not int
                or not (type(mid) is type(tid) is type(rcpt) is type(campaign) is type(name)
                        is type(target) is type(anchor) is str)
                or type(tags) is not list or not all(type(t) is str for t in tags)
                or not (meta is None or type(meta) is dict) or unsub not in (0, 1)
                or trap not in (0, 1)):
            raise InvalidToken("token body has the wrong types")
        return cls(_KIND_NAMES[kind], expiry, mid, tid, rcpt, campaign, tuple(tags), meta, name,
                   target, unsub == 1, issued, trap == 1, anchor)


@dataclass(frozen=True)
class Keyring:
    """Signing keys by id; ``keys[0]`` signs, every key verifies."""

    keys: tuple[tuple[int, bytes], ...]
    _by_id: dict[int, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyFileError("no signing keys")
        object.__setattr__(self, "_by_id", dict(self.keys))

    @property
    def signing(self) -> tuple[int, bytes]:
        return self.keys[0]

    def get(self, kid: int) -> bytes | None:
        return self._by_id.get(kid)


_TOKEN_RE = re.compile(rb"[A-Za-z0-9_-]{8,8192}")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def aead_key(key: bytes, version: int) -> bytes:
    """The AES-SIV key of one version for one key of the key file (HKDF-SHA256)."""
    return HKDF(algorithm=SHA256(), length=64, salt=None, info=_AEAD_INFO + bytes((version,))).derive(key)


class _Keys:
    """A keyring with its ciphers and HMAC states keyed once; replaced whole, never changed."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        # By key id: the cipher of the plain body, and of the deflated one (by the version's low bit).
        self.ciphers = {kid: (AESSIV(aead_key(key, _VERSION)), AESSIV(aead_key(key, _VERSION | _DEFLATED)))
                        for kid, key in keyring.keys}
        self.signing = self.ciphers[keyring.signing[0]]
        self.header = bytes((_VERSION, keyring.signing[0]))
        # First-format tokens: each verification copies one of these (cheaper than keying anew).
        self.macs = {kid: hmac.new(key, digestmod=sha256) for kid, key in keyring.keys}


class LinkCodec:
    def __init__(self, keyring: Keyring) -> None:
        self._keys = _Keys(keyring)

    @property
    def keyring(self) -> Keyring:
        return self._keys.keyring

    def use(self, keyring: Keyring) -> None:
        """
        Make and read tokens with ``keyring`` from now on: a retired key stops reading at once.

        Copies rendered in the worker meanwhile read the keys once per token,
        so each token is made with one keyring, the old or the new.
        """
        self._keys = _Keys(keyring)

    def reload(self, path: str) -> bool:
        """
        Re-read the key file (on SIGHUP); a file that cannot be used keeps the keys in use.

        Done on the reactor thread: the file is a few lines.
        """
        try:
            keyring = read_keyring(path)
        except KeyFileError as e:
            _log.error("kept the link keys in use: {error}", error=str(e))
            return False
        self.use(keyring)
        _log.info("link keys re-read from {path}: key ids {kids}, {signing} signs", path=path,
                  kids=[kid for kid, _ in keyring.keys], signing=keyring.signing[0])
        return True

    def encode(self, data: LinkData) -> str:
        return self._seal(_json(data.to_array()))

    def click_encoder(self, common: LinkData) -> Callable[[bytes], bytes]:
        """
        A fast ``encode`` for the many clicks of one recipient's copy.

        ``common`` gives the recipient's fields (its ``link_name``, ``target``,
        ``unsubscribe`` and ``anchor`` are ignored); the returned function
        takes a link's ``click_suffix`` and gives exactly the token ``encode``
        would, as ASCII bytes: the copy is bytes. The JSON of both halves is
        made once (the suffix once per message), so each link of each copy
        costs one AES-SIV encryption and the base64 of its token; a body long
        enough to be deflated takes the general path.
        """
        shared = _json(common._replace(kind="click").to_array()[:SHARED_FIELDS])[:-1] + b","
        keys = self._keys
        header = keys.header
        encrypt = keys.signing[0].encrypt
        deflate_from = DEFLATE_FROM - len(shared)
        b2a, urlsafe = binascii.b2a_base64, _URLSAFE

        def encode(suffix: bytes) -> bytes:
            if len(suffix) >= deflate_from:
                return self._seal(shared + suffix, keys).encode()
            raw = header + encrypt(shared + suffix, None)
            return b2a(raw, newline=False).translate(urlsafe).rstrip(b"=")

        return encode

    def _seal(self, body: bytes, keys: _Keys | None = None) -> str:
        keys = keys or self._keys
        header, deflated = keys.header, 0
        if len(body) >= DEFLATE_FROM:
            # A small window and hash table: tokens are short, and zlib's defaults
            # would spend ten times longer setting up 256 KiB of state than compressing.
            deflater = zlib.compressobj(9, zlib.DEFLATED, -12, 2)
            packed = deflater.compress(body) + deflater.flush()
            if len(packed) < len(body):
                body, header, deflated = packed, bytes((_VERSION | _DEFLATED, header[1])), 1
        raw = header + keys.signing[deflated].encrypt(body, None)
        return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode()

    def decode(self, token: str | bytes) -> LinkData:
        """The link a token describes; raises ``InvalidToken`` for anything we did not make."""
        if isinstance(token, str):
            try:
                token = token.encode("ascii")
            except UnicodeEncodeError:
                raise InvalidToken("token is not ASCII") from None
        token = token.rstrip(b"~=")
        if not _TOKEN_RE.fullmatch(token) or len(token) % 4 == 1:
            raise InvalidToken("token is not URL-safe base64")
        raw = binascii.a2b_base64(token.translate(_FROM_URLSAFE) + b"=" * (-len(token) % 4))
        version = raw[0] & ~_DEFLATED
        if len(raw) < 3 + TAG_BYTES or version != _VERSION and version != _SIGNED_VERSION:
            raise InvalidToken("token has an unknown version")
        keys = self._keys
        if version == _VERSION:
            ciphers = keys.ciphers.get(raw[1])
            if ciphers is None:
                raise InvalidToken(f"token is made with unknown key id {raw[1]}")
            try:
                body = ciphers[raw[0] & _DEFLATED].decrypt(raw[2:], None)
            except InvalidTag:
                raise InvalidToken("token does not decrypt") from None
        else:
            body = _verified(keys, raw)
        try:
            if raw[0] & _DEFLATED:
                body = zlib.decompress(body, wbits=-15)
            return LinkData.from_array(_BODY_DECODER.decode(body.decode("utf-8")))
        except (zlib.error, ValueError) as e:
            if isinstance(e, InvalidToken):
                raise
            raise InvalidToken("token body does not decode") from None


# Built once: ``json.loads`` of bytes also sniffs their encoding, and ours is always UTF-8.
_BODY_DECODER = json.JSONDecoder()


def _verified(keys: _Keys, raw: bytes) -> bytes:
    """The body of a first-format token, whose HMAC-SHA256 tag verifies; links sent before encryption."""
    signed, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
    mac = keys.macs.get(raw[1])
    if mac is None:
        raise InvalidToken(f"token is signed with unknown key id {raw[1]}")
    mac = mac.copy()
    mac.update(signed)
    if not hmac.compare_digest(mac.digest()[:TAG_BYTES], tag):
        raise InvalidToken("token signature does not verify")
    return signed[2:]


def click_suffix(link_name: str, target: str, unsubscribe: bool, anchor: str = "") -> bytes:
    """The part of a click token's body that depends on the link alone (see ``click_encoder``)."""
    # What _json([link_name, target, 0 or 1, 0, anchor])[1:] gives, string by string: the
    # encoder's own string function, without its per-call machinery (once per link of every
    # message). The 0 is ``trap``: a trap link is encoded whole, not through this.
    return (f"{_json_string(link_name)},{_json_string(target)},{1 if unsubscribe else 0},0,"
            f"{_json_string(anchor)}]").encode()


def open_url(scheme: str, domain: str, token: str) -> str:
    return f"{scheme}://{domain}/q/{token}"


def unsubscribe_url(domain: str, token: str) -> str:
    """``https://{domain}/u/{token}``: always HTTPS, as RFC 8058 requires of a one-click URL."""
    return f"https://{domain}/u/{token}"


def click_url(scheme: str, domain: str, token: str, sublink: str = "") -> str:
    """``/f/{sublink}/{token}``; the sublink is display sugar (spaces become ``_``)."""
    segment = quote(sublink.replace(" ", "_"), safe="-._~!$&'()*+,;=:@") if sublink else "a"
    return f"{scheme}://{domain}/f/{segment}/{token}"


# The HTML scanner takes a plain href for its own target without asking (``html_scan._PLAIN_HREF``):
# what that pattern matches must stay a subset of what this one does.
_TARGET_RE = re.compile(r"https?://[^\x00-\x20\x7f]+", re.IGNORECASE)


def is_trackable_target(url: str) -> bool:
    """An absolute http(s) URL with no whitespace or control characters in it."""
    return bool(_TARGET_RE.fullmatch(url))


def location_header(target: str) -> bytes | None:
    """
    The ``Location`` value for a redirect to ``target``, or ``None`` if it must not be followed.

    Non-ASCII characters are percent-encoded as UTF-8, as HTTP requires of an
    IRI; everything else, including existing ``%`` escapes, stays as it is.
    """
    if not is_trackable_target(target):
        return None
    if target.isascii():  # the common case; the check above left only printable ASCII
        return target.encode("ascii")
    return quote(target, safe=_PRINTABLE_ASCII).encode("ascii")


_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


# -- the key file -----------------------------------------------------------------

_KEY_LINE = re.compile(r"(\d{1,3})\s+([A-Za-z0-9_\-]+=*)")


def parse_keyring(text: str, source: str = "key file") -> Keyring:
    """``<key id> <urlsafe base64 key>`` per line, signing key first; ``#`` comments."""
    keys: list[tuple[int, bytes]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _KEY_LINE.fullmatch(line)
        if not m or int(m.group(1)) > 255:
            raise KeyFileError(f"{source}, line {number}: expected '<key id 0-255> <base64 key>'")
        try:
            key = base64.urlsafe_b64decode(m.group(2) + "=" * (-len(m.group(2)) % 4))
        except ValueError:
            raise KeyFileError(f"{source}, line {number}: the key is not base64") from None
        if len(key) < 32:
            raise KeyFileError(f"{source}, line {number}: a key needs at least 32 bytes")
        kid = int(m.group(1))
        if any(kid == k for k, _ in keys):
            raise KeyFileError(f"{source}, line {number}: key id {kid} is listed twice")
        keys.append((kid, key))
    if not keys:
        raise KeyFileError(f"{source}: no keys in the file")
    return Keyring(tuple(keys))


def format_keyring(keyring: Keyring) -> str:
    lines = ["# engage-appliance link signing keys: <key id> <key>. The first key signs new",
             "# links; every key listed verifies. Keep this file secret and identical on",
             "# every node that serves links. Manage it with engage-appliance-keys."]
    for kid, key in keyring.keys:
        lines.append(f"{kid} {base64.urlsafe_b64encode(key).decode().rstrip('=')}")
    return "\n".join(lines) + "\n"


def read_keyring(path: str) -> Keyring:
    try:
        with open(path, encoding="ascii") as f:
            return parse_keyring(f.read(), path)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file (create it with engage-appliance-keys "
                           f"--file {path} create)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e}") from None


def write_keyring(path: str, keyring: Keyring) -> None:
    """Replace the file atomically, readable by its owner only."""
    write_atomically(path, format_keyring(keyring).encode("ascii"), 0o600)


def prepare_keyring(path: str, create: bool) -> Keyring:
    """The keyring at ``path``; a missing file is created with a new key when ``create``."""
    if create and not os.path.exists(path):
        write_keyring(path, new_keyring())
        Logger().warn("created a new link signing key file {path}; copy it to every node "
                      "that serves these links", path=path)
    return read_keyring(path)


def new_keyring() -> Keyring:
    return Keyring(((1, secrets.token_bytes(32)),))


def rotated(keyring: Keyring) -> Keyring:
    """A new signing key in front; the old ones keep verifying links already sent."""
    used = {kid for kid, _ in keyring.keys}
    kid = next((k for k in range(1, 256) if k not in used), None)
    if kid is None:
        raise KeyFileError("all 255 key ids are in use; retire old keys first")
    return Keyring(((kid, secrets.token_bytes(32)), *keyring.keys))


def keys_main(argv: list[str] | None = None) -> int:
    """``engage-appliance-keys``: create, rotate, retire and list link signing keys."""
    parser = argparse.ArgumentParser(prog="engage-appliance-keys",
                                     description="Manage the keys that encrypt and sign tracked links.")
    parser.add_argument("--file", default="var/keys/links.keys",
                        help="the key file (links.keys_file in the configuration)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("create", help="create the file with one new key (refuses to overwrite)")
    sub.add_parser("rotate", help="add a new signing key; older keys still verify")
    retire = sub.add_parser("retire", help="remove a key: links it signed stop working")
    retire.add_argument("kid", type=int)
    sub.add_parser("list", help="show key ids, signing key first")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            if os.path.exists(args.file):
                print(f"{args.file} exists already; use rotate to add a key", file=sys.stderr)
                return 1
            write_keyring(args.file, new_keyring())
        elif args.command == "rotate":
            write_keyring(args.file, rotated(read_keyring(args.file)))
        elif args.command == "retire":
            keyring = read_keyring(args.file)
            if args.kid == keyring.signing[0]:
                print("refusing to retire the signing key; rotate first", file=sys.stderr)
                return 1
            if keyring.get(args.kid) is None:
                print(f"no key with id {args.kid}", file=sys.stderr)
                return 1
            write_keyring(args.file, Keyring(tuple(k for k in keyring.keys if k[0] != args.kid)))
        keyring = read_keyring(args.file)
    except KeyFileError as e:
        print(e, file=sys.stderr)
        return 1
    for i, (kid, _) in enumerate(keyring.keys):
        print(f"{kid}{'  (signs)' if i == 0 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(keys_main())
