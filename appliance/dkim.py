"""
DKIM signing of delivered copies (RFC 6376, with Ed25519 from RFC 8463).

The rewrite changes every tracked copy, so a signature made before it
cannot hold: each copy is signed here, last, exactly as it will be sent.
Canonicalization is relaxed/relaxed (it survives the re-folding and
trailing-space changes of relays), the hash SHA-256, the algorithm follows
the key: ``rsa-sha256`` or ``ed25519-sha256``. There is never an ``l=``:
a body-length limit would let anyone append to a signed message.

Everything here is a plain function of bytes and keys. ``verify`` is the
other half, for tests and for checking a copy from Python; it takes the key
records from a function instead of the DNS.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import email.utils
import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from appliance import headers
from appliance.files import write_atomically

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey

MIN_RSA_BITS = 1024  # RFC 8301: signers MUST NOT use less...
GOOD_RSA_BITS = 2048  # ...and SHOULD use at least this

# Signed when present, each instance, plus once more ("oversigned") so that no further
# instance can be added without breaking the signature. From is always present.
DEFAULT_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding",
    "in-reply-to", "references", "list-unsubscribe", "list-unsubscribe-post",
)

# Signed whatever a key's ``headers`` list says, present or not: a one-click unsubscribe is
# honoured by mailbox providers only when both fields are covered by a valid signature
# (RFC 8058 §4), and a relay that adds or alters them must break it.
ALWAYS_SIGNED = ("list-unsubscribe", "list-unsubscribe-post")

FOLD_WIDTH = 78


class DkimError(ValueError):
    """A key that cannot sign, or a message whose header cannot be signed."""


# -- the message --------------------------------------------------------------------------------

def split_message(message: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """
    The header fields (lower-cased name, raw bytes with their CRLF) and the body.

    Read by ``appliance.headers``, as the rewriter reads them, so what is
    signed is what the rewriter understood. Raises ``DkimError`` for a
    header that is not a sequence of fields: what a verifier would take for
    the signed fields would be guesswork.
    """
    block, body = headers.split_message(message)
    if block.error:
        raise DkimError(block.error)
    return [(f.name, f.raw) for f in block.fields], body


def from_domain(fields: Iterable[tuple[str, bytes]]) -> str | None:
    """The one domain of the From field's addresses, or ``None`` if there is not exactly one."""
    froms = [raw for name, raw in fields if name == "from"]
    if len(froms) != 1:
        return None
    value = froms[0].partition(b":")[2].decode("utf-8", "replace")
    addresses = email.utils.getaddresses([" ".join(value.split())])
    domains = set()
    for _, address in addresses:
        local, at, domain = address.rpartition("@")
        if not (local and at and domain):
            return None
        domains.add(domain.lower().rstrip("."))
    return domains.pop() if len(domains) == 1 else None


# -- canonicalization (RFC 6376 §3.4) -----------------------------------------------------------

_WSP = re.compile(rb"[ \t]+")
_WSP_BEFORE_CRLF = re.compile(rb"[ \t]+\r\n")
_WSP_TO_SPACE = re.compile(rb"\t[ \t]*| [ \t]+")  # white space runs that are not one space already


def relaxed_header(field: bytes) -> bytes:
    """§3.4.2: name lower-cased, value unfolded, white space runs as one space, none at the ends."""
    name, _, value = field.partition(b":")
    value = _WSP.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def simple_header(field: bytes) -> bytes:
    """§3.4.1: the field as it is, with its CRLF (which a header without a body separator may lack)."""
    return field if field.endswith(b"\r\n") else field + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """§3.4.4: no white space at line ends, runs of it as one space, no empty lines at the end."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    # The substitutions run only where they have something to do: most bodies are
    # quoted-printable or base64, with no tabs and no white space at line ends.
    if b"\t" in body or b" \r\n" in body:
        body = _WSP_BEFORE_CRLF.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_TO_SPACE.sub(b" ", body)
    body = _strip_empty_lines(body)
    return b"" if body == b"\r\n" else body


def simple_body(body: bytes) -> bytes:
    """§3.4.3: no empty lines at the end; an empty body is one CRLF."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return _strip_empty_lines(body)


def _strip_empty_lines(body: bytes) -> bytes:
    end = len(body)
    while body.endswith(b"\r\n\r\n", 0, end):
        end -= 2
    return body[:end]


_HEADER_CANON = {"relaxed": relaxed_header, "simple": simple_header}
_BODY_CANON = {"relaxed": relaxed_body, "simple": simple_body}


def body_hash(body: bytes, canonicalization: str = "relaxed") -> str:
    """The ``bh=`` value of a body."""
    return base64.b64encode(hashlib.sha256(_BODY_CANON[canonicalization](body)).digest()).decode()


def _signed_fields(fields: Sequence[tuple[str, bytes]], names: Sequence[str]) -> list[bytes]:
    """§5.4.2: the instances ``names`` select, each name taking the next one from the bottom."""
    used: dict[str, int] = {}
    out = []
    for name in names:
        instances = [raw for n, raw in fields if n == name]
        taken = used.get(name, 0)
        used[name] = taken + 1
        if taken < len(instances):
            out.append(instances[len(instances) - 1 - taken])
    return out


# -- keys ------------------------------------------------------------------------------------------


def algorithm_of(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "rsa-sha256"
    return "ed25519-sha256"


def load_private_key(path: str) -> PrivateKey:
    """A PEM private key fit for DKIM; ``DkimError`` says what is wrong with the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DkimError(f"cannot read {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise DkimError(f"{path} is encrypted; DKIM keys must be stored without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise DkimError(f"{path} is not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimError(f"{path} is a {key.key_size}-bit RSA key; DKIM needs at least "
                            f"{MIN_RSA_BITS} bits (RFC 8301), better {GOOD_RSA_BITS}")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimError(f"{path} is neither an RSA nor an Ed25519 key, the kinds DKIM signs with")


def weakness(key: PrivateKey) -> str:
    """What is weak about a usable key, for a warning at start-up; "" if nothing."""
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < GOOD_RSA_BITS:
        return f"{key.key_size}-bit RSA; RFC 8301 asks for {GOOD_RSA_BITS} bits or more"
    return ""


def public_key_data(key: PrivateKey | PublicKey) -> str:
    """The ``p=`` of the key's DNS record: SubjectPublicKeyInfo for RSA, the raw key for Ed25519."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) else key
    if isinstance(public, rsa.RSAPublicKey):
        data = public.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        data = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(data).decode()


def dns_record(key: PrivateKey, domain: str, selector: str) -> str:
    """The TXT record to publish, in zone file syntax, split into strings of at most 255 bytes."""
    kind = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"
    text = f"v=DKIM1; k={kind}; p={public_key_data(key)}"
    strings = " ".join(f'"{text[i:i + 250]}"' for i in range(0, len(text), 250))
    return f"{selector}._domainkey.{domain}. IN TXT ( {strings} )"


def _sign_data(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(hashlib.sha256(data).digest())  # RFC 8463 §3: Ed25519 over the SHA-256 hash


# -- signing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """One signing identity: ``d=``, ``s=``, its key and the header fields it signs."""

    domain: str
    selector: str
    key: PrivateKey
    headers: tuple[str, ...] = DEFAULT_HEADERS

    @property
    def algorithm(self) -> str:
        return algorithm_of(self.key)


class _Folder:
    """Builds a header field folded at ``FOLD_WIDTH`` with CRLF SP, only where FWS is allowed."""

    def __init__(self, start: str) -> None:
        self.lines = [start]

    def add(self, piece: str, space: bool) -> None:
        line = self.lines[-1]
        lead = " " if space else ""
        if len(line) + len(lead) + len(piece) > FOLD_WIDTH and line.strip():
            self.lines.append(" " + piece)
        else:
            self.lines[-1] = line + lead + piece

    def add_split(self, text: str) -> None:
        """Base64 that may be broken anywhere (FWS is allowed between its characters)."""
        while text:
            room = FOLD_WIDTH - len(self.lines[-1])
            if room <= 0:
                self.lines.append(" ")
                room = FOLD_WIDTH - 1
            self.lines[-1] += text[:room]
            text = text[room:]

    def text(self) -> str:
        return "\r\n".join(self.lines)


def signature_field(fields: Sequence[tuple[str, bytes]], body: bytes, key: SigningKey,
                    timestamp: int, body_hash_value: str | None = None) -> bytes:
    """The ``DKIM-Signature`` field (with its CRLF) that signs a message of these fields and body."""
    names: list[str] = []
    for name in (*key.headers, *(n for n in ALWAYS_SIGNED if n not in key.headers)):
        present = sum(1 for n, _ in fields if n == name)
        # The always-signed fields are signed absent too (RFC 6376 §5.4): nobody may add a
        # one-click unsubscribe to a copy that went out without one.
        if present or name in ALWAYS_SIGNED:
            names += [name] * (present + 1)
    if "from" not in names:
        raise DkimError("the message has no From field")
    folder = _Folder("DKIM-Signature:")
    tags = ["v=1", f"a={key.algorithm}", "c=relaxed/relaxed", f"d={key.domain}",
            f"s={key.selector}", f"t={timestamp}"]
    for tag in tags:
        folder.add(tag + ";", space=True)
    h = [f"{name}:" for name in names[:-1]] + [f"{names[-1]};"]
    folder.add("h=" + h[0], space=True)
    for piece in h[1:]:
        folder.add(piece, space=False)
    folder.add(f"bh={body_hash_value or body_hash(body)};", space=True)
    folder.add("b=", space=True)
    folder.add_split(header_signature(fields, names, folder.text(), key.key))
    return folder.text().encode("ascii") + b"\r\n"


def header_signature(fields: Sequence[tuple[str, bytes]], names: Sequence[str], unsigned: str,
                     key: PrivateKey) -> str:
    """The ``b=`` value: ``unsigned`` is the whole signature field up to its empty ``b=``."""
    data = b"".join(map(relaxed_header, _signed_fields(fields, names)))
    data += relaxed_header(unsigned.encode("ascii"))[:-2]  # §3.7: no CRLF after the signature field
    return base64.b64encode(_sign_data(key, data)).decode()


class Signer:
    """
    Signs each copy with the keys of its From domain.

    A copy is signed by every key of the configured domain that is its From
    domain or the closest parent of it (several keys of one domain give
    several signatures: RSA and Ed25519 side by side). A copy whose From
    domain has no key, or that has no single From domain, goes unsigned.
    """

    def __init__(self, keys: Sequence[SigningKey], now: Callable[[], float] = time.time) -> None:
        self.now = now
        self.keys = tuple(keys)  # as configured: what a helper process is given to sign with
        self._by_domain: dict[str, list[SigningKey]] = {}
        for key in keys:
            self._by_domain.setdefault(key.domain.lower().rstrip("."), []).append(key)

    def keys_for(self, fields: Sequence[tuple[str, bytes]]) -> list[SigningKey]:
        domain = from_domain(fields)
        while domain:
            keys = self._by_domain.get(domain)
            if keys:
                return keys
            domain = domain.partition(".")[2]
        return []

    def signs(self, message: bytes) -> bool:
        """Whether ``sign`` will sign this message (its header decides)."""
        try:
            fields, _ = split_message(message)
        except DkimError:
            return False
        return bool(self.keys_for(fields))

    def sign(self, message: bytes) -> bytes:
        """The message with its signatures on top, or as it is when no key applies."""
        try:
            fields, body = split_message(message)
        except DkimError:
            return message
        keys = self.keys_for(fields)
        if not keys:
            return message
        timestamp = int(self.now())
        bh = body_hash(body)
        return b"".join(signature_field(fields, body, key, timestamp, bh) for key in keys) + message


# -- verifying ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    domain: str
    selector: str
    ok: bool
    reason: str = ""  # why not, when not ok


def parse_tags(value: str) -> dict[str, str]:
    """A tag=value list (§3.2), white space around tags and values removed."""
    tags: dict[str, str] = {}
    for item in value.split(";"):
        if not item.strip():
            continue
        name, eq, tag_value = item.partition("=")
        name = name.strip(" \t\r\n")
        if not eq or not name or name in tags:
            raise DkimError(f"bad tag list near {item.strip()[:20]!r}")
        tags[name] = tag_value.strip(" \t\r\n")
    return tags


def _b64(value: str) -> bytes:
    return base64.b64decode(re.sub(r"[ \t\r\n]", "", value), validate=True)


def _public_key(record: str, algorithm: str) -> PublicKey:
    tags = parse_tags(record)
    if tags.get("v", "DKIM1") != "DKIM1":
        raise DkimError("the key record is not v=DKIM1")
    kind = tags.get("k", "rsa")
    data = _b64(tags.get("p", ""))
    if not data:
        raise DkimError("the key is revoked (empty p=)")
    if kind != algorithm.partition("-")[0]:
        raise DkimError(f"the key is k={kind}, the signature a={algorithm}")
    if kind == "ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    key = serialization.load_der_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey):
        raise DkimError("p= is not an RSA key")
    if key.key_size < MIN_RSA_BITS:
        raise DkimError(f"the RSA key has only {key.key_size} bits")
    return key


_B_VALUE = re.compile(rb"((?:^|;)[ \t\r\n]*b[ \t\r\n]*=)[^;]*")


def _verify_one(fields: list[tuple[str, bytes]], body: bytes, raw: bytes,
                lookup: Callable[[str, str], str | None]) -> Verification:
    name, _, value = raw.partition(b":")
    try:
        tags = parse_tags(value.decode("ascii"))
    except (DkimError, UnicodeError) as e:
        return Verification("", "", False, f"bad signature field: {e}")
    domain, selector = tags.get("d", ""), tags.get("s", "")

    def fail(reason: str) -> Verification:
        return Verification(domain, selector, False, reason)

    missing = [t for t in ("v", "a", "b", "bh", "d", "h", "s") if t not in tags]
    if missing:
        return fail(f"missing tags: {', '.join(missing)}")
    if tags["v"] != "1":
        return fail(f"v={tags['v']}")
    algorithm = tags["a"]
    if algorithm not in ("rsa-sha256", "ed25519-sha256"):
        return fail(f"unsupported algorithm {algorithm}")
    header_c, _, body_c = tags.get("c", "simple/simple").partition("/")
    body_c = body_c or "simple"
    if header_c not in _HEADER_CANON or body_c not in _BODY_CANON:
        return fail(f"unsupported canonicalization {tags.get('c')}")
    names = [n.strip(" \t\r\n").lower() for n in tags["h"].split(":")]
    if "from" not in names:
        return fail("From is not signed")
    canonical = _BODY_CANON[body_c](body)
    if "l" in tags:
        if not tags["l"].isdigit():
            return fail(f"bad l={tags['l']}")
        canonical = canonical[:int(tags["l"])]
    if base64.b64encode(hashlib.sha256(canonical).digest()).decode() != re.sub(r"\s", "", tags["bh"]):
        return fail("body hash mismatch")
    record = lookup(domain, selector)
    if record is None:
        return fail("no key record")
    try:
        key = _public_key(record, algorithm)
        signature = _b64(tags["b"])
    except (DkimError, ValueError, binascii.Error, UnsupportedAlgorithm) as e:
        return fail(f"bad key or signature data: {e}")
    canon = _HEADER_CANON[header_c]
    data = b"".join(canon(f) for f in _signed_fields(fields, names))
    unsigned = name + b":" + _B_VALUE.sub(rb"\1", value, count=1)
    data += canon(unsigned.removesuffix(b"\r\n") + b"\r\n")[:-2]
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, hashlib.sha256(data).digest())
    except InvalidSignature:
        return fail("signature mismatch")
    return Verification(domain, selector, True)


def verify(message: bytes, lookup: Callable[[str, str], str | None]) -> list[Verification]:
    """
    Every ``DKIM-Signature`` of a message, checked, top first.

    ``lookup(domain, selector)`` gives the key record's text (what the DNS
    would have at ``selector._domainkey.domain``), or ``None``.
    """
    fields, body = split_message(message)
    return [_verify_one(fields, body, raw, lookup) for name, raw in fields if name == "dkim-signature"]


# -- the key command ----------------------------------------------------------------------------


def new_key(algorithm: str, bits: int = GOOD_RSA_BITS) -> PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_key(path: str, key: PrivateKey) -> None:
    """Write the key as PKCS#8 PEM, readable by its owner only; never over an existing file."""
    if os.path.exists(path):
        raise FileExistsError(path)
    write_atomically(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))


def main(argv: list[str] | None = None) -> int:
    """``engage-appliance-dkim-key``: make a DKIM key and print the DNS record that publishes it."""
    parser = argparse.ArgumentParser(
        prog="engage-appliance-dkim-key",
        description="Make a DKIM signing key ([dkim] key_file) and print its DNS TXT record.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, text in (("create", "write a new key to FILE (refuses to overwrite) and print its record"),
                          ("record", "print the DNS record of the key in FILE")):
        p = sub.add_parser(command, help=text)
        p.add_argument("file", metavar="FILE")
        p.add_argument("--domain", required=True, help="the signing domain (d=), e.g. example.com")
        p.add_argument("--selector", required=True, help="the selector (s=), e.g. s2025")
        if command == "create":
            p.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa",
                           help="rsa (default; every verifier knows it) or ed25519 (RFC 8463)")
            p.add_argument("--bits", type=int, default=GOOD_RSA_BITS,
                           help="RSA key size (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            if args.algorithm == "rsa" and args.bits < MIN_RSA_BITS:
                raise DkimError(f"RSA keys need at least {MIN_RSA_BITS} bits")
            write_key(args.file, new_key(args.algorithm, args.bits))
        key = load_private_key(args.file)
    except FileExistsError:
        print(f"engage-appliance-dkim-key: {args.file} exists already", file=sys.stderr)
        return 1
    except (OSError, DkimError) as e:
        print(f"engage-appliance-dkim-key: {e}", file=sys.stderr)
        return 1
    print(dns_record(key, args.domain.rstrip("."), args.selector))
    return 0


if __name__ == "__main__":
    sys.exit(main())
