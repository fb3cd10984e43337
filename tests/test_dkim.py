"""DKIM signing: canonicalization, the RFC 8463 test vector, round trips, configuration."""

from __future__ import annotations

import base64
import io
import os
import re
from contextlib import redirect_stderr, redirect_stdout

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from appliance import dkim
from appliance.build import build
from appliance.config import ConfigError
from appliance.dkim import (
    DkimError,
    Signer,
    SigningKey,
    body_hash,
    header_signature,
    load_private_key,
    public_key_data,
    relaxed_body,
    relaxed_header,
    simple_body,
    split_message,
    verify,
)
from tests.building import LOADERS, configure
from tests.helpers import base_toml, make_config, merge


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


# -- RFC 8463 Appendix A: keys, key records, the signed message ----------------------------

RFC8463_ED25519_SEED = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
RFC8463_RSA_PEM = b"""-----BEGIN RSA PRIVATE KEY-----
MIICXQIBAAKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQi
Y/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqM
KrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB
AoGAH0cxOhFZDgzXWhDhnAJDw5s4roOXN4OhjiXa8W7Y3rhX3FJqmJSPuC8N9vQm
6SVbaLAE4SG5mLMueHlh4KXffEpuLEiNp9Ss3O4YfLiQpbRqE7Tm5SxKjvvQoZZe
zHorimOaChRL2it47iuWxzxSiRMv4c+j70GiWdxXnxe4UoECQQDzJB/0U58W7RZy
6enGVj2kWF732CoWFZWzi1FicudrBFoy63QwcowpoCazKtvZGMNlPWnC7x/6o8Gc
uSe0ga2xAkEA8C7PipPm1/1fTRQvj1o/dDmZp243044ZNyxjg+/OPN0oWCbXIGxy
WvmZbXriOWoSALJTjExEgraHEgnXssuk7QJBALl5ICsYMu6hMxO73gnfNayNgPxd
WFV6Z7ULnKyV7HSVYF0hgYOHjeYe9gaMtiJYoo0zGN+L3AAtNP9huqkWlzECQE1a
licIeVlo1e+qJ6Mgqr0Q7Aa7falZ448ccbSFYEPD6oFxiOl9Y9se9iYHZKKfIcst
o7DUw1/hz2Ck4N5JrgUCQQCyKveNvjzkkd8HjYs0SwM0fPjK16//5qDZ2UiDGnOe
uEzxBDAr518Z8VFbR41in3W4Y3yCDgQlLlcETrS+zYcL
-----END RSA PRIVATE KEY-----
"""
RFC8463_RECORDS = {
    ("football.example.com", "brisbane"):
        "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
    ("football.example.com", "test"): (
        "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR"
        "iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC"
        "DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3"
        "Ip3G+2kryOTIKT+l/K4w3QIDAQAB"),
}
RFC_HEADERS = """From: Joe SixPack <joe@football.example.com>
To: Suzie Q <suzie@shopping.example.net>
Subject: Is dinner ready?
Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)
Message-ID: <20030712040037.46341.5F8J@football.example.com>
"""
RFC_BODY = "Hi.\n\nWe lost the game.  Are you hungry yet?\n\nJoe.\n"
RFC_ED25519_UNSIGNED = """DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;
 d=football.example.com; i=@football.example.com;
 q=dns/txt; s=brisbane; t=1528637909; h=from : to :
 subject : date : message-id : from : subject : date;
 bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;
 b="""
RFC_ED25519_B = "/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\n Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw=="
RFC_RSA_UNSIGNED = """DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;
 d=football.example.com; i=@football.example.com;
 q=dns/txt; s=test; t=1528637909; h=from : to : subject :
 date : message-id : from : subject : date;
 bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;
 b="""
RFC_RSA_B = ("F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\n"
             " DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\n"
             " dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=")
RFC8463_MESSAGE = crlf(RFC_ED25519_UNSIGNED + RFC_ED25519_B + "\n" + RFC_RSA_UNSIGNED + RFC_RSA_B + "\n"
                       + RFC_HEADERS + "\n" + RFC_BODY)
RFC_NAMES = ["from", "to", "subject", "date", "message-id", "from", "subject", "date"]


def rfc_ed25519_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(RFC8463_ED25519_SEED))


def rfc_rsa_key() -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(RFC8463_RSA_PEM, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def lookup_in(records: dict[tuple[str, str], str]):
    return lambda domain, selector: records.get((domain, selector))


def record_of(key: dkim.PrivateKey) -> str:
    kind = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"
    return f"v=DKIM1; k={kind}; p={public_key_data(key)}"


_RSA_2048: list[rsa.RSAPrivateKey] = []


def fresh_rsa() -> rsa.RSAPrivateKey:
    """One new 2048-bit key for the whole module: making one costs about 100 ms."""
    if not _RSA_2048:
        _RSA_2048.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _RSA_2048[0]


def write_pem(path: str, key: object, password: bytes | None = None) -> str:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                                  serialization.PrivateFormat.PKCS8, encryption))
    return path


# A 512-bit key (cryptography will not make one; openssl genpkey did), to show it is refused.
RSA_512_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVgIBADANBgkqhkiG9w0BAQEFAASCAUAwggE8AgEAAkEAtGFfp/ZxlpjyAjtD
NMWu2U6+bZ4MrVNC0/VLLMUcgrs6p4NED0y3hge+smWppdrWGAi0x6SMj222vgNq
4wKodwIDAQABAkBHvhrfoSNYdIh83rlCOgXrJGiVDLGaFm2UBBHcQqGuVMISNKZ7
1uL3Ux6b2PwrkPSYVqpk9chpxPCp+BQMpEWRAiEA5dfoOgU7JEzYqJaHilC2PCmg
UtG8gN6/slw33Oy9kRsCIQDI6HI8LoL2iJPua+8r/x4eIcKm8tIhf2c4s1fhRzaX
1QIhAKU5uG89I27M71MCIx2DN/23ztC6hU/+0L9fG6ltZjjRAiEAsP/otJCdnKlS
+vhobDCEzjMcFI1VB2IBBHkscTKWLEkCIQCoMBPN1LGBIT6SOU033s8rlkDG3MfI
+Nh3yps/GEBcTw==
-----END PRIVATE KEY-----
"""


class CanonicalizationTests(SynchronousTestCase):
    """RFC 6376 §3.4.5's example, and the edges of §3.4.3 and §3.4.4."""

    HEADER = [b"A: X\r\n", b"B : Y\t\r\n\tZ  \r\n"]
    BODY = b" C \r\nD \t E\r\n\r\n\r\n"

    def test_rfc6376_relaxed_header(self) -> None:
        self.assertEqual([relaxed_header(f) for f in self.HEADER], [b"a:X\r\n", b"b:Y Z\r\n"])

    def test_rfc6376_bodies(self) -> None:
        self.assertEqual(relaxed_body(self.BODY), b" C\r\nD E\r\n")
        self.assertEqual(simple_body(self.BODY), b" C \r\nD \t E\r\n")

    def test_empty_and_unterminated_bodies(self) -> None:
        self.assertEqual(relaxed_body(b""), b"")
        self.assertEqual(relaxed_body(b"\r\n\r\n"), b"")
        self.assertEqual(relaxed_body(b" \t \r\n"), b"")
        self.assertEqual(relaxed_body(b"abc  "), b"abc\r\n")
        self.assertEqual(relaxed_body(b"abc\r\n  "), b"abc\r\n")
        self.assertEqual(simple_body(b""), b"\r\n")
        self.assertEqual(simple_body(b"abc"), b"abc\r\n")
        # The well-known hashes of the empty body (RFC 6376 errata 3192 for relaxed).
        self.assertEqual(body_hash(b""), "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")
        self.assertEqual(body_hash(b"", "simple"), "frcCV1k9oG9oKj3dpUqdJg1PxRT2RSN/XKdLCPjaYaY=")

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from([b"a", b"\xe9", b" ", b"\t", b"  ", b"\r\n", b"\r", b"\n", b"=20"]),
                    max_size=30).map(b"".join))
    def test_relaxed_body_is_the_rfc_line_by_line(self, body: bytes) -> None:
        """The fast path agrees with §3.4.4 applied one line at a time."""
        if body and not body.endswith(b"\r\n"):
            body_ = body + b"\r\n"
        else:
            body_ = body
        lines = [re.sub(rb"[ \t]+", b" ", line).removesuffix(b" ") for line in body_.split(b"\r\n")[:-1]]
        while lines and not lines[-1]:
            lines.pop()
        self.assertEqual(relaxed_body(body), b"".join(line + b"\r\n" for line in lines))

    def test_header_bytes_are_kept(self) -> None:
        """Non-ASCII header text is hashed as it is; only white space changes."""
        self.assertEqual(relaxed_header("Subject:  caf\u00e9 \t ol\u00e9 \r\n".encode()),
                         "subject:caf\u00e9 ol\u00e9\r\n".encode())

    def test_split_message(self) -> None:
        fields, body = split_message(b"From: a@b\r\nSubject: x\r\n y\r\n\r\nbody\r\n")
        self.assertEqual(fields, [("from", b"From: a@b\r\n"), ("subject", b"Subject: x\r\n y\r\n")])
        self.assertEqual(body, b"body\r\n")
        self.assertEqual(split_message(b"From: a@b\r\n"), ([("from", b"From: a@b\r\n")], b""))
        for bad in (b" folded: first\r\n\r\n", b"no colon here\r\n\r\n", b": empty name\r\n\r\n"):
            self.assertRaises(DkimError, split_message, bad)


class Rfc8463VectorTests(SynchronousTestCase):
    """RFC 8463 Appendix A: its keys, records and signed message, to the byte."""

    def test_body_hash(self) -> None:
        self.assertEqual(body_hash(crlf(RFC_BODY)), "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=")

    def test_public_keys_match_the_records(self) -> None:
        self.assertEqual(record_of(rfc_ed25519_key()), RFC8463_RECORDS["football.example.com", "brisbane"])
        self.assertEqual(record_of(rfc_rsa_key()), RFC8463_RECORDS["football.example.com", "test"])

    def test_signatures_are_reproduced(self) -> None:
        """Both algorithms are deterministic, so signing the RFC's field must give the RFC's b=."""
        fields, _ = split_message(crlf(RFC_HEADERS + "\n"))
        for unsigned, b, key in ((RFC_ED25519_UNSIGNED, RFC_ED25519_B, rfc_ed25519_key()),
                                 (RFC_RSA_UNSIGNED, RFC_RSA_B, rfc_rsa_key())):
            self.assertEqual(header_signature(fields, RFC_NAMES, unsigned.replace("\n", "\r\n"), key),
                             re.sub(r"\s", "", b))

    def test_the_signed_message_verifies(self) -> None:
        results = verify(RFC8463_MESSAGE, lookup_in(RFC8463_RECORDS))
        self.assertEqual([(r.selector, r.ok, r.reason) for r in results],
                         [("brisbane", True, ""), ("test", True, "")])

    def test_changes_are_caught(self) -> None:
        lookup = lookup_in(RFC8463_RECORDS)
        body = RFC8463_MESSAGE.replace(b"hungry", b"thirsty")
        self.assertEqual({r.reason for r in verify(body, lookup)}, {"body hash mismatch"})
        subject = RFC8463_MESSAGE.replace(b"dinner ready", b"lunch ready")
        self.assertEqual({r.reason for r in verify(subject, lookup)}, {"signature mismatch"})
        # h= oversigns From, so a second From (anywhere) breaks both signatures.
        second_from = RFC8463_MESSAGE.replace(b"\r\n\r\nHi.", b"\r\nFrom: mallory@evil.example\r\n\r\nHi.")
        self.assertEqual({r.reason for r in verify(second_from, lookup)}, {"signature mismatch"})
        wrong_key = dict(RFC8463_RECORDS)
        wrong_key["football.example.com", "test"] = record_of(fresh_rsa())
        self.assertEqual([r.ok for r in verify(RFC8463_MESSAGE, lookup_in(wrong_key))], [True, False])


MESSAGE = crlf("""Received: from client (127.0.0.1) by localhost; Thu, 1 Jan 2026 00:00:00 +0000
From: "Shop, The" <news@mail.example.com>
To: you@example.test
Subject: Spring  sale
Date: Thu, 1 Jan 2026 00:00:00 +0000
Message-ID: <1@mail.example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
X-Mailer: anything

Hello,  world.\t
https://shop.example/p?id=1

""")


class SigningTests(SynchronousTestCase):
    def signer(self, *keys: SigningKey) -> Signer:
        return Signer(keys, now=lambda: 1767225600.5)

    def test_round_trip_rsa_and_ed25519(self) -> None:
        rsa_key, ed_key = fresh_rsa(), ed25519.Ed25519PrivateKey.generate()
        signer = self.signer(SigningKey("example.com", "r", rsa_key), SigningKey("example.com", "e", ed_key))
        signed = signer.sign(MESSAGE)
        self.assertTrue(signed.endswith(MESSAGE))
        records = {("example.com", "r"): record_of(rsa_key), ("example.com", "e"): record_of(ed_key)}
        results = verify(signed, lookup_in(records))
        self.assertEqual([(r.selector, r.ok, r.reason) for r in results], [("r", True, ""), ("e", True, "")])

    def test_the_signature_field(self) -> None:
        signed = self.signer(SigningKey("example.com", "s2026", fresh_rsa())).sign(MESSAGE)
        field = signed[:len(signed) - len(MESSAGE)]
        self.assertTrue(field.startswith(
            b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;"))
        self.assertTrue(field.endswith(b"\r\n"))
        lines = field[:-2].split(b"\r\n")
        self.assertTrue(all(len(line) <= 78 for line in lines), lines)
        self.assertTrue(all(line.startswith(b" ") for line in lines[1:]), lines)
        self.assertNotIn(b"\n", field.replace(b"\r\n", b""))
        tags = dkim.parse_tags(field.partition(b":")[2].decode())
        self.assertEqual(tags["t"], "1767225600")
        self.assertEqual((tags["d"], tags["s"]), ("example.com", "s2026"))
        self.assertNotIn("l", tags)
        self.assertNotIn("x", tags)
        # Every present listed field, once per instance and once more; absent ones not at all,
        # but the one-click unsubscribe fields, whose absence is signed (dkim.ALWAYS_SIGNED).
        self.assertEqual(re.sub(r"\s", "", tags["h"]).split(":"),
                         ["from", "from", "subject", "subject", "date", "date", "message-id", "message-id",
                          "to", "to", "mime-version", "mime-version", "content-type", "content-type",
                          "list-unsubscribe", "list-unsubscribe-post"])
        self.assertEqual(tags["bh"], body_hash(split_message(MESSAGE)[1]))

    def test_oversigned_fields_cannot_be_added(self) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        signed = self.signer(SigningKey("example.com", "e", key)).sign(MESSAGE)
        lookup = lookup_in({("example.com", "e"): record_of(key)})
        for extra in (b"From: ceo@example.com\r\n", b"Subject: Urgent\r\n", b"To: boss@example.test\r\n"):
            tampered = signed.replace(b"X-Mailer", extra + b"X-Mailer")
            self.assertEqual([r.reason for r in verify(tampered, lookup)], ["signature mismatch"])
        # A field that is not signed may be added, as relays add Received.
        self.assertTrue(verify(b"Received: by relay\r\n" + signed, lookup)[0].ok)

    def test_relaxed_survives_relays(self) -> None:
        """Re-folded headers and trailing white space changes, as relays make them, still verify."""
        key = ed25519.Ed25519PrivateKey.generate()
        signed = self.signer(SigningKey("example.com", "e", key)).sign(MESSAGE)
        relayed = (signed.replace(b"Subject: Spring  sale", b"Subject: Spring\r\n\t sale ")
                   .replace(b"world.\t\r\n", b"world.\r\n").replace(b"\r\n\r\n\r\n", b"\r\n"))
        self.assertNotEqual(relayed, signed)
        self.assertTrue(verify(relayed, lookup_in({("example.com", "e"): record_of(key)}))[0].ok)

    def test_which_copies_are_signed(self) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        signer = self.signer(SigningKey("example.com", "a", key), SigningKey("mail.example.com", "b", key),
                             SigningKey("example.org", "c", key))

        def selectors(from_value: str) -> list[str]:
            message = crlf(f"From: {from_value}\nSubject: x\n\nbody\n")
            signed = signer.sign(message)
            self.assertEqual(signer.signs(message), signed != message)
            return [dkim.parse_tags(raw.partition(b":")[2].decode())["s"]
                    for name, raw in split_message(signed)[0] if name == "dkim-signature"]

        self.assertEqual(selectors("a@example.com"), ["a"])
        self.assertEqual(selectors("A <a@News.Example.COM>"), ["a"])  # the closest parent
        self.assertEqual(selectors("a@mail.example.com"), ["b"])  # the domain itself beats its parent
        self.assertEqual(selectors("a@x.mail.example.com, b@X.Mail.Example.com"), ["b"])
        self.assertEqual(selectors("a@example.net"), [])
        self.assertEqual(selectors("a@notexample.com"), [])
        self.assertEqual(selectors("a@example.com, b@example.org"), [])  # no single From domain
        self.assertEqual(selectors("undisclosed"), [])
        two_froms = crlf("From: a@example.com\nFrom: b@example.com\n\nbody\n")
        no_from = crlf("Sender: a@example.com\n\nbody\n")
        malformed = crlf("From: a@example.com\nnot a field\n\nbody\n")
        for message in (two_froms, no_from, malformed):
            self.assertEqual(signer.sign(message), message)
            self.assertFalse(signer.signs(message))

    def test_configured_header_list(self) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        signed = self.signer(SigningKey("example.com", "e", key, ("from", "x-mailer"))).sign(MESSAGE)
        tags = dkim.parse_tags(split_message(signed)[0][0][1].partition(b":")[2].decode())
        self.assertEqual(re.sub(r"\s", "", tags["h"]),
                         "from:from:x-mailer:x-mailer:list-unsubscribe:list-unsubscribe-post")
        self.assertTrue(verify(signed, lookup_in({("example.com", "e"): record_of(key)}))[0].ok)


class KeyFileTests(SynchronousTestCase):
    def test_good_keys(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        rsa_path = write_pem(os.path.join(directory, "rsa.pem"), fresh_rsa())
        self.assertEqual(load_private_key(rsa_path).key_size, 2048)  # type: ignore[union-attr]
        ed_path = write_pem(os.path.join(directory, "ed.pem"), ed25519.Ed25519PrivateKey.generate())
        self.assertIsInstance(load_private_key(ed_path), ed25519.Ed25519PrivateKey)
        pkcs1 = os.path.join(directory, "rfc.pem")
        with open(pkcs1, "wb") as f:
            f.write(RFC8463_RSA_PEM)
        self.assertEqual(dkim.weakness(load_private_key(pkcs1)),
                         "1024-bit RSA; RFC 8301 asks for 2048 bits or more")
        self.assertEqual(dkim.weakness(load_private_key(rsa_path)), "")

    def test_bad_keys(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)

        def path(name: str, data: bytes) -> str:
            p = os.path.join(directory, name)
            with open(p, "wb") as f:
                f.write(data)
            return p

        public = fresh_rsa().public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
        cases = [
            (os.path.join(directory, "missing.pem"), "cannot read .*missing.pem: No such file or directory"),
            (path("text.pem", b"hello\n"), "text.pem is not a PEM private key"),
            (path("public.pem", public), "public.pem is not a PEM private key"),
            (write_pem(os.path.join(directory, "locked.pem"), ed25519.Ed25519PrivateKey.generate(), b"pw"),
             "locked.pem is encrypted"),
            (write_pem(os.path.join(directory, "ec.pem"), ec.generate_private_key(ec.SECP256R1())),
             "ec.pem is neither an RSA nor an Ed25519 key, the kinds DKIM signs with"),
            (path("small.pem", RSA_512_PEM), "small.pem is a 512-bit RSA key; DKIM needs at least 1024 bits"),
        ]
        for p, message in cases:
            with self.assertRaises(DkimError) as caught:
                load_private_key(p)
            self.assertRegex(str(caught.exception), message)


class KeyCommandTests(SynchronousTestCase):
    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = dkim.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_create_and_record(self) -> None:
        path = os.path.join(self.mktemp(), "keys", "s1.pem")
        code, out, _ = self.run_main("create", "--domain", "example.com.", "--selector", "s1",
                                     "--algorithm", "ed25519", path)
        self.assertEqual(code, 0)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        key = load_private_key(path)
        self.assertEqual(out, f's1._domainkey.example.com. IN TXT ( "{record_of(key)}" )\n')
        self.assertEqual(self.run_main("record", "--domain", "example.com", "--selector", "s1", path)[1], out)
        code, _, err = self.run_main("create", "--domain", "example.com", "--selector", "s1", path)
        self.assertEqual((code, err), (1, f"engage-appliance-dkim-key: {path} exists already\n"))
        self.assertEqual(load_private_key(path).private_bytes_raw(), key.private_bytes_raw())  # type: ignore

    def test_rsa_record_is_split_into_dns_strings(self) -> None:
        record = dkim.dns_record(fresh_rsa(), "example.com", "s1")
        strings = re.findall(r'"([^"]*)"', record)
        self.assertTrue(all(len(s) <= 255 for s in strings))
        self.assertEqual("".join(strings), record_of(fresh_rsa()))
        self.assertGreater(len(strings), 1)

    def test_bad_arguments(self) -> None:
        code, _, err = self.run_main("record", "--domain", "example.com", "--selector", "s1",
                                     os.path.join(self.mktemp(), "none.pem"))
        self.assertEqual(code, 1)
        self.assertIn("cannot read", err)
        code, _, err = self.run_main("create", "--domain", "example.com", "--selector", "s1", "--bits", "512",
                                     os.path.join(self.mktemp(), "small.pem"))
        self.assertEqual((code, err), (1, "engage-appliance-dkim-key: RSA keys need at least 1024 bits\n"))


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.key = write_pem(os.path.join(self.directory, "s1.pem"), ed25519.Ed25519PrivateKey.generate())

    def problems(self, dkim_value: object) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            configure(merge(base_toml(), {"dkim": dkim_value}))
        return [f"{path}: {message}" for path, message in caught.exception.problems]

    def test_absent_means_no_signing(self) -> None:
        self.assertEqual(make_config(self.directory).dkim, ())

    def test_one_table(self) -> None:
        [key] = make_config(self.directory, dkim={"domain": "Example.COM.", "selector": "s1",
                                                  "key_file": self.key}).dkim
        self.assertEqual((key.domain, key.selector, key.key_file, key.headers),
                         ("example.com", "s1", self.key, dkim.DEFAULT_HEADERS))

    def test_array_of_tables(self) -> None:
        keys = make_config(self.directory, dkim=[
            {"domain": "example.com", "selector": "rsa", "key_file": self.key},
            {"domain": "example.com", "selector": "ed", "key_file": self.key,
             "headers": ["From", "Subject", "X-Campaign"]},
        ]).dkim
        self.assertEqual([(k.selector, k.headers) for k in keys],
                         [("rsa", dkim.DEFAULT_HEADERS), ("ed", ("from", "subject", "x-campaign"))])

    def test_errors_name_their_keys_all_at_once(self) -> None:
        missing = os.path.join(self.directory, "nope.pem")
        self.assertEqual(self.problems([
            {"domain": "example.com", "selector": "s1", "key_file": missing},
            {"domain": "not a domain", "selector": "s 1", "key_file": self.key, "headers": ["Subject"]},
            {"selector": "s1", "bogus": 1},
            {"domain": "example.com", "selector": "s1", "key_file": self.key},
            {"domain": "example.com", "selector": "s1", "key_file": self.key},
            "not a table",
        ]), [
            # The key files are opened after every table is checked, so their problems come
            # last; dkim[3] repeats dkim[0]'s selector whether or not dkim[0]'s file loads.
            'dkim[1].domain: expected a domain name such as "example.com", got "not a domain"',
            'dkim[1].selector: expected a selector such as "s2025", got "s 1"',
            'dkim[1].headers: must include "From" (RFC 6376 requires it to be signed)',
            "dkim[2].domain: missing: a DKIM key needs domain, selector and key_file",
            "dkim[2].key_file: missing: a DKIM key needs domain, selector and key_file",
            "dkim[2].bogus: unknown key",
            "dkim[3].selector: s1._domainkey.example.com has a key already",
            "dkim[4].selector: s1._domainkey.example.com has a key already",
            "dkim[5]: expected a table, got a string",
            "dkim[5].domain: missing: a DKIM key needs domain, selector and key_file",
            "dkim[5].selector: missing: a DKIM key needs domain, selector and key_file",
            "dkim[5].key_file: missing: a DKIM key needs domain, selector and key_file",
            f"dkim[0].key_file: cannot read {missing}: No such file or directory",
        ])

    def test_single_table_errors(self) -> None:
        small = os.path.join(self.directory, "small.pem")
        with open(small, "wb") as f:
            f.write(RSA_512_PEM)
        self.assertEqual(self.problems({"domain": "example.com", "selector": "s1", "key_file": small,
                                        "headers": ["from", "From", "bad field"]}), [
            'dkim.headers: not header field names: "bad field"',
            f"dkim.key_file: {small} is a 512-bit RSA key; DKIM needs at least 1024 bits (RFC 8301), "
            "better 2048",
        ])
        self.assertEqual(self.problems({"domain": "example.com", "selector": "s1", "key_file": self.key,
                                        "headers": ["from", "From"]}),
                         ["dkim.headers: lists a field twice (every instance of a field is signed anyway)"])
        self.assertEqual(self.problems("yes"), ['dkim: expected a table or an array of tables, got a string'])

    def test_the_service_warns_about_short_keys(self) -> None:
        from twisted.logger import capturedLogs

        short = os.path.join(self.directory, "rfc.pem")
        with open(short, "wb") as f:
            f.write(RFC8463_RSA_PEM)
        config = make_config(self.directory, dkim=[
            {"domain": "example.com", "selector": "old", "key_file": short},
            {"domain": "example.com", "selector": "new", "key_file": self.key}])
        with capturedLogs() as captured:
            signer = build(config, loaders=LOADERS).signer
        self.assertEqual([e["log_format"].format(**e) for e in captured
                          if e["log_namespace"] == "appliance.build"],  # not the admin token's
                         [f"DKIM key {short}: 1024-bit RSA; RFC 8301 asks for 2048 bits or more"])
        assert signer is not None
        message = crlf("From: a@example.com\n\nbody\n")
        self.assertEqual(len(verify(signer.sign(message), lambda d, s: None)), 2)
        self.assertIsNone(build(make_config(self.directory), loaders=LOADERS).signer)
