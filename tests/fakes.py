"""Stand-ins for the world outside loopback: a DNS resolver with fixed answers, a TLS certificate."""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any

from twisted.internet import defer, ssl
from twisted.names import common, dns, error


class FakeResolver(common.ResolverBase):
    """
    Answers from a table; no query ever leaves the process.

    ``records`` maps (name, type) to payloads; ``errors`` maps (name, type) or
    name to an exception instance. Names not in either get NXDOMAIN when
    ``nxdomain`` is true (the default), else an empty answer (NODATA).
    Every query is recorded in ``queries``.
    """

    def __init__(self, records: dict[tuple[str, int], list[Any]] | None = None,
                 errors: dict[Any, Exception] | None = None, nxdomain: bool = True) -> None:
        super().__init__()
        self.records = records or {}
        self.errors = errors or {}
        self.nxdomain = nxdomain
        self.queries: list[tuple[str, int]] = []

    def mx(self, domain: str, *hosts: tuple[int, str]) -> FakeResolver:
        self.records[(domain, dns.MX)] = [dns.Record_MX(p, h.encode()) for p, h in hosts]
        return self

    def host(self, name: str, *addresses: str) -> FakeResolver:
        for a in addresses:
            if ipaddress.ip_address(a).version == 6:
                self.records.setdefault((name, dns.AAAA), []).append(dns.Record_AAAA(a))
            else:
                self.records.setdefault((name, dns.A), []).append(dns.Record_A(a))
        return self

    def _lookup(self, name: bytes | str, cls: int, type: int, timeout: Any) -> defer.Deferred:
        text = name.decode() if isinstance(name, bytes) else name
        self.queries.append((text, type))
        for key in ((text, type), text):
            if key in self.errors:
                return defer.fail(self.errors[key])
        payloads = self.records.get((text, type))
        if payloads is None:
            if self.nxdomain and not any(n == text for n, _t in self.records):
                return defer.fail(error.DNSNameError(text))
            payloads = []
        answers = [dns.RRHeader(name=text, type=type, cls=cls, ttl=60, payload=p) for p in payloads]
        return defer.succeed((answers, [], []))


def self_signed(directory: str, names: tuple[str, ...] = ("localhost",),
                addresses: tuple[str, ...] = ("127.0.0.1", "::1")) -> tuple[Any, str]:
    """
    A fresh key and self-signed certificate: (server TLS context, path of the certificate PEM).

    The key is written beside it as ``sink-key.pem``, for an ``ssl:`` endpoint's ``privateKey=``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "sink-cert.pem")
    with open(path, "wb") as f:
        f.write(cert_pem)
    with open(os.path.join(directory, "sink-key.pem"), "wb") as f:
        f.write(key_pem)
    context = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    return context, path
