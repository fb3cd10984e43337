"""Loading the configured certificate pair, and the engage-appliance-certificate command."""

from __future__ import annotations

import io
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from appliance import tls


class CertificateTests(SynchronousTestCase):
    def test_command_writes_a_loadable_pair(self) -> None:
        d = self.mktemp()
        cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
        self.patch(sys, "stdout", io.StringIO())
        self.assertEqual(tls.main(["--certificate", cert, "--key", key, "--hostname", "mx.test"]), 0)
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)
        options = tls.load_server_options(cert, key)
        self.assertIsNotNone(options.getContext())
        # It does not overwrite by accident.
        self.patch(sys, "stderr", io.StringIO())
        self.assertEqual(tls.main(["--certificate", cert, "--key", key]), 1)
        self.assertIn("exists; use --force", sys.stderr.getvalue())

    def test_bad_pairs_are_named(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        c1, k1, c2, k2 = (os.path.join(d, n) for n in ("c1", "k1", "c2", "k2"))
        tls.write_pair(c1, k1, "a.test", 1)
        tls.write_pair(c2, k2, "b.test", 1)
        e = self.assertRaises(ValueError, tls.load_server_options, c1, k2)
        self.assertIn("the key does not belong to the certificate", str(e))
        e = self.assertRaises(ValueError, tls.load_server_options, k1, k1)
        self.assertIn("no PEM certificate found", str(e))
        e = self.assertRaises(ValueError, tls.load_server_options, c1, c1)
        self.assertIn("not a valid unencrypted PEM private key", str(e))
        e = self.assertRaises(ValueError, tls.load_server_options, os.path.join(d, "none"), k1)
        self.assertIn("cannot read the certificate file", str(e))

    def test_chain_is_kept(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        c1, k1, c2, k2 = (os.path.join(d, n) for n in ("c1", "k1", "c2", "k2"))
        tls.write_pair(c1, k1, "a.test", 1)
        tls.write_pair(c2, k2, "b.test", 1)
        chain = os.path.join(d, "chain.pem")
        with open(chain, "wb") as f:
            f.write(open(c1, "rb").read() + open(c2, "rb").read())
        options = tls.load_server_options(chain, k1)
        self.assertEqual(len(options.extraCertChain), 1)
