"""Configuration: the shipped file loads; every mistake is named by its key path, all at once."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from appliance.config import ConfigError, load_config, parse_config, parse_duration, parse_size
from tests.building import checked
from tests.helpers import SHIPPED_CONFIG, base_toml, merge


class ValueSyntaxTests(SynchronousTestCase):
    def test_sizes(self) -> None:
        self.assertEqual(parse_size("25M"), 25 * 1024 * 1024)
        self.assertEqual(parse_size("10k"), 10240)
        self.assertEqual(parse_size("1G"), 1 << 30)
        self.assertEqual(parse_size(512), 512)
        self.assertEqual(parse_size("512"), 512)
        for bad in ("big", "-1", "25X", True, 1.5, -3):
            self.assertRaises(ValueError, parse_size, bad)

    def test_durations(self) -> None:
        self.assertEqual(parse_duration("30s"), 30)
        self.assertEqual(parse_duration("5m"), 300)
        self.assertEqual(parse_duration("4h"), 4 * 3600)
        self.assertEqual(parse_duration("5d"), 5 * 86400)
        self.assertEqual(parse_duration(31536000), 31536000)
        self.assertEqual(parse_duration("90"), 90)
        for bad in ("soon", "5 minutes", "-5s", False):
            self.assertRaises(ValueError, parse_duration, bad)


class ShippedConfigTests(SynchronousTestCase):
    def test_shipped_file_loads(self) -> None:
        """Whatever an operator set in it; that it documents every key is tests.test_shipped_config."""
        config = load_config(SHIPPED_CONFIG)
        self.assertEqual(config.source, SHIPPED_CONFIG)
        self.assertTrue(os.path.isabs(config.spool.directory))
        self.assertTrue(os.path.isabs(config.events.log_file))


class DefaultsTests(SynchronousTestCase):
    """What a key left out of the file means (the shipped file states the same values)."""

    def test_defaults(self) -> None:
        config = parse_config(base_toml())
        self.assertFalse(config.smtpapi.open_tracking_enabled)
        self.assertFalse(config.smtpapi.click_tracking_enabled)
        self.assertEqual(config.smtpapi.tracking_link_expiry, 31536000)
        self.assertTrue(config.smtpapi.initial_open)
        self.assertTrue(config.engagement_tracker.click_tracking_include_metadata)
        self.assertEqual(config.engagement_tracker.max_metadata_len, 1000)
        self.assertEqual(config.smtp.max_message_size, 25 * 1024 * 1024)
        self.assertEqual(config.delivery.routes, {})
        self.assertEqual(config.delivery.max_queue_lifetime, 5 * 86400)
        self.assertTrue(os.path.isabs(config.spool.directory))
        self.assertTrue(os.path.isabs(config.events.log_file))

    def test_paths_default_under_var(self) -> None:
        data = base_toml()
        for table in ("spool", "events", "links"):
            del data[table]
        config = parse_config(data)
        self.assertEqual(config.spool.directory, os.path.abspath(os.path.join("var", "spool")))
        self.assertEqual(config.events.log_file, os.path.abspath(os.path.join("var", "log", "events.jsonl")))
        self.assertEqual(config.links.keys_file, os.path.abspath(os.path.join("var", "keys", "links.keys")))

    def test_empty_file_needs_a_listener(self) -> None:
        e = self.assertRaises(ConfigError, parse_config, {})
        self.assertEqual([p for p, _ in e.problems], ["smtp.listeners"])


class ErrorTests(SynchronousTestCase):
    def problems(self, **changes: object) -> dict[str, str]:
        e = self.assertRaises(ConfigError, parse_config, merge(base_toml(), changes), "x.toml")
        return dict(e.problems)

    def test_wrong_duration_names_key(self) -> None:
        p = self.problems(smtpapi={"tracking_link_expiry": "soon"})
        self.assertEqual(p, {"smtpapi.tracking_link_expiry": 'expected seconds, got "soon"'})

    def test_unknown_key_and_table(self) -> None:
        p = self.problems(smtpapi={"open_tracking_enabeld": True}, smpt={"x": 1})
        self.assertEqual(p["smtpapi.open_tracking_enabeld"], "unknown key")
        self.assertEqual(p["smpt"], "unknown table")

    def test_wrong_types(self) -> None:
        p = self.problems(smtpapi={"open_tracking_enabled": "yes"},
                          engagement_tracker={"max_metadata_len": "1000"},
                          node={"name": 7})
        self.assertEqual(set(p), {"smtpapi.open_tracking_enabled",
                                  "engagement_tracker.max_metadata_len", "node.name"})
        self.assertIn("expected true or false", p["smtpapi.open_tracking_enabled"])

    def test_bad_values(self) -> None:
        p = self.problems(
            smtpapi={"open_tracking_scheme": "ftp", "tracking_domain": "a b"},
            smtp={"relay_networks": ["10.0.0.0/33"], "max_message_size": "lots"},
            delivery={"routes": {"example.com": "host:99999", "bad domain": "h:25"},
                      "retry_initial": "10m", "retry_max": "1m"},
        )
        self.assertEqual(set(p), {
            "smtpapi.open_tracking_scheme", "smtpapi.tracking_domain", "smtp.relay_networks",
            "smtp.max_message_size", "delivery.routes.example.com", "delivery.routes.bad domain",
            "delivery.retry_max",
        })
        self.assertEqual(p["smtpapi.open_tracking_scheme"], "expected one of 'http', 'https', got \"ftp\"")

    def test_listener_errors_carry_listener_name(self) -> None:
        p = self.problems(smtp={"listeners": {"default": {"endpoint": "carrier-pigeon:1"},
                                              "other": {"smtpapi": {"click_tracking_enabled": 1}}}})
        self.assertEqual(set(p), {"smtp.listeners.default.endpoint", "smtp.listeners.other.endpoint",
                                  "smtp.listeners.other.smtpapi.click_tracking_enabled"})

    def test_all_errors_reported_at_once_in_message(self) -> None:
        e = self.assertRaises(ConfigError, parse_config,
                              merge(base_toml(), {"smtpapi": {"tracking_link_expiry": "soon",
                                                                 "initial_open": "no"}}), "x.toml")
        text = str(e)
        self.assertIn("2 configuration error(s) in x.toml", text)
        self.assertIn('smtpapi.tracking_link_expiry: expected seconds, got "soon"', text)
        self.assertIn("smtpapi.initial_open:", text)

    def test_unreadable_and_invalid_toml(self) -> None:
        e = self.assertRaises(ConfigError, load_config, "/nonexistent/appliance.toml")
        self.assertIn("cannot read", str(e))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[smtp\n")
        e = self.assertRaises(ConfigError, load_config, path)
        self.assertIn("not valid TOML", str(e))


class ListenerOverrideTests(SynchronousTestCase):
    def test_listener_overrides_smtpapi(self) -> None:
        config = parse_config(merge(base_toml(), {
            "smtpapi": {"open_tracking_enabled": True, "tracking_domain": "t.example.com"},
            "smtp": {"listeners": {"bulk": {"endpoint": "tcp:2600",
                                            "smtpapi": {"open_tracking_enabled": False},
                                            "max_recipients": 5}}},
        }))
        default, bulk = config.smtp.listeners
        self.assertTrue(default.smtpapi.open_tracking_enabled)
        self.assertFalse(bulk.smtpapi.open_tracking_enabled)
        self.assertEqual(bulk.smtpapi.tracking_domain, "t.example.com")
        self.assertEqual(bulk.max_recipients, 5)
        self.assertEqual(default.max_recipients, 1000)


class DeliveryConfigTests(SynchronousTestCase):
    """The delivery table's own keys (routing, TLS, DNS, smarthost AUTH, limits)."""

    def parse(self, **delivery: object) -> object:
        return checked(merge(base_toml(), {"delivery": delivery}), "x.toml").delivery

    def problems(self, **delivery: object) -> dict[str, str]:
        e = self.assertRaises(ConfigError, checked, merge(base_toml(), {"delivery": delivery}),
                              "x.toml")
        return dict(e.problems)

    def test_defaults(self) -> None:
        d = self.parse()
        self.assertEqual((d.tls, d.tls_verify, d.address_preference), ("opportunistic", False, "any"))
        self.assertEqual((d.dns_servers, d.mx_address_limit), ((), 5))
        self.assertEqual((d.retry_initial, d.retry_max, d.data_timeout), (300, 4000, 600))
        self.assertEqual((d.max_connections, d.max_connections_per_destination,
                          d.max_messages_per_connection), (50, 20, 100))
        self.assertEqual(d.connection_reuse_time, 2.0)  # Postfix's connection cache time

    def test_connection_reuse_time(self) -> None:
        self.assertEqual(self.parse(connection_reuse_time="0s").connection_reuse_time, 0.0)
        self.assertEqual(self.parse(connection_reuse_time="500ms").connection_reuse_time, 0.5)
        p = self.problems(connection_reuse_time="-1s")
        self.assertEqual(p["delivery.connection_reuse_time"], 'expected seconds, got "-1s"')

    def test_values(self) -> None:
        d = self.parse(tls="required", tls_verify=True, dns_servers=["192.0.2.53", "[2001:db8::53]:5353"],
                       address_preference="ipv6", max_connections_per_destination=2)
        self.assertEqual(d.dns_servers, (("192.0.2.53", 53), ("2001:db8::53", 5353)))
        self.assertEqual((d.tls, d.tls_verify, d.address_preference), ("required", True, "ipv6"))
        self.assertEqual(d.max_connections_per_destination, 2)

    def test_mistakes_named_by_key(self) -> None:
        p = self.problems(tls="always", tls_verify=True, dns_servers=["ns.example.com"],
                          address_preference="v6", data_timeout="0s", mx_address_limit=0,
                          tls_ca_file="/nonexistent/ca.pem", max_messages_per_connection=0)
        self.assertIn("expected one of 'opportunistic', 'required', 'none'", p["delivery.tls"])
        self.assertEqual(p["delivery.tls_verify"], 'needs tls = "required"')
        self.assertIn("expected IP addresses", p["delivery.dns_servers"])
        self.assertIn("delivery.address_preference", p)
        self.assertEqual(p["delivery.data_timeout"], "must be more than 0 seconds")
        self.assertIn("delivery.mx_address_limit", p)
        self.assertIn("delivery.max_messages_per_connection", p)
        self.assertEqual(p["delivery.tls_ca_file"], "no such file: /nonexistent/ca.pem")

    def test_tls_ca_file_must_hold_certificates(self) -> None:
        from tests.fakes import self_signed

        base = os.path.abspath(self.mktemp())
        _one, first = self_signed(os.path.join(base, "one"))
        _two, second = self_signed(os.path.join(base, "two"))
        bundle = os.path.join(base, "bundle.pem")
        with open(bundle, "wb") as out:
            for path in (first, second):
                with open(path, "rb") as f:
                    out.write(f.read())
        self.assertEqual(self.parse(tls="required", tls_verify=True, tls_ca_file=bundle).tls_ca_file,
                         bundle)
        not_pem = os.path.join(base, "not-pem.pem")
        with open(not_pem, "wb") as f:
            f.write(b"this is not a certificate\n")
        p = self.problems(tls_ca_file=not_pem)
        self.assertEqual(p["delivery.tls_ca_file"], f"{not_pem}: no PEM certificate found")
        broken = os.path.join(base, "broken.pem")
        with open(first, "rb") as f, open(broken, "wb") as out:
            out.write(f.read() + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        p = self.problems(tls_ca_file=broken)
        self.assertTrue(p["delivery.tls_ca_file"].startswith(
            f"{broken}: certificate 2 is not a valid PEM certificate ("), p)

    def test_tls_ca_file_needs_a_certificate_check(self) -> None:
        # Nothing would read the file: a setting that seems to protect, and does not, is an error.
        from tests.fakes import self_signed

        _key, ca = self_signed(os.path.join(os.path.abspath(self.mktemp()), "ca"))
        p = self.problems(tls="required", tls_ca_file=ca)
        self.assertEqual(p, {"delivery.tls_ca_file": "set, but tls_verify is false and there is no "
                                                     "smarthost_username, so no certificate is checked"})
        password = self.mktemp()
        with open(password, "w") as f:
            f.write("s3cret\n")
        # Credentials for the smarthost are only sent to a server whose certificate is checked.
        d = self.parse(smarthost="relay.example:587", smarthost_username="u",
                       smarthost_password_file=password, tls_ca_file=ca)
        self.assertEqual(d.tls_ca_file, ca)

    def test_smarthost_password_from_its_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("s3cret\n")
        d = self.parse(smarthost="relay.example:587", smarthost_username="u",
                       smarthost_password_file=path)
        self.assertEqual((d.smarthost_username, d.smarthost_password), ("u", "s3cret"))
        self.assertNotIn("s3cret", repr(d))  # never in a log line that prints the config

    def test_smarthost_auth_mistakes(self) -> None:
        p = self.problems(smarthost="relay.example:587", smarthost_username="u")
        self.assertIn("needs both", p["delivery.smarthost_password_file"])
        p = self.problems(smarthost_username="u", smarthost_password_file="/nonexistent/pw")
        self.assertEqual(p["delivery.smarthost_username"], "set, but there is no smarthost")
        self.assertIn("cannot read /nonexistent/pw", p["delivery.smarthost_password_file"])

    def test_smarthost_auth_needs_tls(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("s3cret\n")
        p = self.problems(smarthost="relay.example:587", smarthost_username="u",
                          smarthost_password_file=path, tls="none")
        self.assertEqual(p, {"delivery.smarthost_username":
                             'credentials are only sent over TLS, and tls = "none"; '
                             'use "opportunistic" or "required"'})
        for tls in ("opportunistic", "required"):
            d = self.parse(smarthost="relay.example:587", smarthost_username="u",
                           smarthost_password_file=path, tls=tls)
            self.assertEqual((d.smarthost_username, d.tls), ("u", tls))
        self.assertEqual(self.parse(smarthost="relay.example:587", tls="none").tls, "none")


class EventsFileModeTests(SynchronousTestCase):
    """``events.file_mode``: the mode a new event log is created with."""

    def test_default_and_set(self) -> None:
        self.assertEqual(parse_config(base_toml()).events.file_mode, 0o640)
        for text, mode in (("0600", 0o600), ("644", 0o644), ("0660", 0o660)):
            config = parse_config(merge(base_toml(), {"events": {"file_mode": text}}))
            self.assertEqual(config.events.file_mode, mode)

    def test_bad_modes_name_the_key(self) -> None:
        for bad in ("rw-r-----", "0800", "00640", "0440", "", 0o640):
            changes = {"events": {"file_mode": bad}}
            e = self.assertRaises(ConfigError, parse_config, merge(base_toml(), changes))
            self.assertEqual([p for p, _ in e.problems], ["events.file_mode"], bad)
