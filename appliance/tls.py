"""
Server certificates: loading the configured pair into TLS options, and making a self-signed pair.

The injection server's STARTTLS and implicit-TLS listeners take their
certificate and key from the configuration. ``load_server_options`` is also
what the configuration check calls, so a missing file, a key that does not
belong to the certificate or a file that is not PEM stops the start with the
key path named, instead of failing the first client's handshake.

``engage-appliance-certificate`` (``main`` below) writes a self-signed pair
for a first run or a test machine; production uses a certificate from a CA.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys

from OpenSSL import crypto
from twisted.internet import ssl

from appliance.files import write_atomically

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_server_options(certificate_path: str, key_path: str) -> ssl.CertificateOptions:
    """
    TLS options for a server: the first certificate in the file is the server's,
    any that follow are the chain sent with it. Raises ValueError with a readable reason.
    """
    cert_pem = _read(certificate_path, "certificate")
    key_pem = _read(key_path, "key")
    blocks = _PEM_CERT.findall(cert_pem)
    if not blocks:
        raise ValueError(f"{certificate_path}: no PEM certificate found")
    try:
        leaf = ssl.Certificate.loadPEM(blocks[0])
        chain = [ssl.Certificate.loadPEM(b) for b in blocks[1:]]
    except Exception as e:  # pyOpenSSL raises its own Error types and ValueError
        raise ValueError(f"{certificate_path}: not a valid PEM certificate ({_reason(e)})") from None
    try:
        key = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
    except Exception as e:
        raise ValueError(f"{key_path}: not a valid unencrypted PEM private key ({_reason(e)})") from None
    if not key.matches(leaf.getPublicKey()):
        raise ValueError(f"{key_path}: the key does not belong to the certificate in "
                         f"{certificate_path}")
    pair = ssl.PrivateCertificate.fromCertificateAndKeyPair(leaf, key)
    return ssl.CertificateOptions(
        privateKey=pair.privateKey.original,
        certificate=pair.original,
        extraCertChain=[c.original for c in chain],
    )


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {path}: {e.strerror}") from None


def _reason(e: Exception) -> str:
    return str(e) or type(e).__name__


def make_self_signed(hostname: str, days: int = 825) -> tuple[bytes, bytes]:
    """A self-signed certificate for ``hostname`` (and loopback), and its key; both PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        alt_names.append(x509.DNSName("localhost"))
    alt_names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                  x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_pair(certificate_path: str, key_path: str, hostname: str, days: int,
               force: bool = False) -> None:
    """Write a new self-signed pair; the key file is created readable by its owner only."""
    for path in (certificate_path, key_path):
        if os.path.exists(path) and not force:
            raise FileExistsError(f"{path} exists; use --force to replace it")
    cert_pem, key_pem = make_self_signed(hostname, days)
    write_atomically(key_path, key_pem, 0o600)
    write_atomically(certificate_path, cert_pem, 0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="engage-appliance-certificate",
        description="Write a self-signed TLS certificate and key for the SMTP listeners "
                    "(smtp.tls_certificate and smtp.tls_key).",
    )
    parser.add_argument("--certificate", default="var/tls/certificate.pem",
                        help="where to write the certificate (default: %(default)s)")
    parser.add_argument("--key", default="var/tls/key.pem",
                        help="where to write the private key (default: %(default)s)")
    parser.add_argument("--hostname", default="localhost",
                        help="the name the certificate is for, e.g. node.hostname (default: %(default)s)")
    parser.add_argument("--days", type=int, default=825, help="validity (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        write_pair(args.certificate, args.key, args.hostname, args.days, args.force)
    except (OSError, ValueError) as e:
        print(f"engage-appliance-certificate: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.certificate} and {args.key} (self-signed for {args.hostname}, {args.days} days)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
