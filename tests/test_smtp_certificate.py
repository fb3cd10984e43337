"""smtp.create_certificate: STARTTLS out of the box, with a self-signed pair made at the first start."""

from __future__ import annotations

import os
import stat

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from appliance.build import build_from_toml
from appliance.config import ConfigError
from appliance.tls import write_pair
from tests.helpers import base_toml, merge


class CreatedCertificateTests(SynchronousTestCase):
    def setUp(self) -> None:
        # The created pair goes under var/tls/ of the start-up directory: a directory of this test's.
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.directory)
        self.certificate = os.path.join(self.directory, "var", "tls", "certificate.pem")
        self.key = os.path.join(self.directory, "var", "tls", "key.pem")

    def toml(self, **smtp: object) -> dict:
        return merge(base_toml(os.path.join(self.directory, "var")),
                     {"node": {"hostname": "mx.example.net"}, "smtp": {"create_certificate": True, **smtp}})

    def test_first_start_creates_a_pair_for_the_host_name_and_offers_starttls(self) -> None:
        parts = build_from_toml(self.toml())
        self.assertEqual(parts.config.smtp.listeners[0].tls, "starttls")
        self.assertIn("default", parts.listener_tls)
        self.assertEqual(stat.S_IMODE(os.stat(self.key).st_mode), 0o600)
        with open(self.certificate, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "mx.example.net")

    def test_later_starts_keep_the_pair(self) -> None:
        build_from_toml(self.toml())
        with open(self.certificate, "rb") as f:
            first = f.read()
        build_from_toml(self.toml())
        with open(self.certificate, "rb") as f:
            self.assertEqual(f.read(), first)

    def test_a_pair_of_the_operator_replaces_it(self) -> None:
        own_cert, own_key = os.path.join(self.directory, "c.pem"), os.path.join(self.directory, "k.pem")
        write_pair(own_cert, own_key, "own.example.net", 30)
        parts = build_from_toml(self.toml(tls_certificate=own_cert, tls_key=own_key))
        self.assertEqual(parts.config.smtp.listeners[0].tls_certificate, own_cert)
        self.assertFalse(parts.config.smtp.certificate_created)
        self.assertFalse(os.path.exists(self.certificate))
        self.assertIn("default", parts.listener_tls)

    def test_off(self) -> None:
        parts = build_from_toml(self.toml(create_certificate=False))
        self.assertEqual(parts.config.smtp.listeners[0].tls, "off")
        self.assertEqual(parts.listener_tls, {})
        self.assertFalse(os.path.exists(self.certificate))

    def test_on_by_default(self) -> None:
        data = self.toml()
        del data["smtp"]["create_certificate"]
        parts = build_from_toml(data)
        self.assertTrue(parts.config.smtp.certificate_created)
        self.assertEqual(parts.config.smtp.tls_certificate, self.certificate)

    def test_no_listener_with_tls_creates_nothing(self) -> None:
        build_from_toml(self.toml(listeners={"default": {"endpoint": "tcp:0", "tls": "off"}}))
        self.assertFalse(os.path.exists(self.certificate))

    def test_cannot_create(self) -> None:
        os.makedirs(os.path.join(self.directory, "var"))
        with open(os.path.join(self.directory, "var", "tls"), "w"):
            pass  # a file where the directory should be
        e = self.assertRaises(ConfigError, build_from_toml, self.toml())
        self.assertIn("smtp.create_certificate", dict(e.problems))
