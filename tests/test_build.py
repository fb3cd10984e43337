"""The builder: every file the configuration names is read once, and every problem told at once."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import ssl
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from appliance import tap
from appliance.build import Loaders, Parts, build, build_from_toml
from appliance.config import ConfigError
from appliance.links import KeyFileError, Keyring, new_keyring, read_keyring
from appliance.policy import PolicyError
from appliance.tls import load_server_options, write_pair
from appliance.users import set_user
from tests.building import LOADERS, configure
from tests.helpers import base_toml, make_config, merge


class Calls:
    """Loaders that note what they were asked to read, then read it as the appliance would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def note(self, name: str, result: Any) -> Any:
        def loader(*args: Any) -> Any:
            self.calls.append((name, args))
            return result(*args) if callable(result) else result

        return loader

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]


class BuildTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cert, self.key = os.path.join(self.dir, "c.pem"), os.path.join(self.dir, "k.pem")
        write_pair(self.cert, self.key, "localhost", 1)

    def test_every_problem_at_once_configuration_and_files(self) -> None:
        missing = os.path.join(self.dir, "missing")
        data = merge(base_toml(), {
            "smtp": {"max_connections": 0, "users_file": missing,
                     "tls_certificate": self.cert, "tls_key": missing},
            "delivery": {"tls": "required", "tls_verify": True, "tls_ca_file": missing,
                         "smarthost": "relay.example:587", "smarthost_username": "u",
                         "smarthost_password_file": missing},
            "webhooks": [{"target": "https://127.0.0.1/", "tls_ca_file": self.key}],
            "dkim": {"domain": "example.com", "selector": "s1", "key_file": missing},
        })
        e = self.assertRaises(ConfigError, configure, data)
        problems = dict(e.problems)
        self.assertEqual(sorted(problems), [
            "delivery.smarthost_password_file", "delivery.tls_ca_file", "dkim.key_file",
            "smtp.max_connections", "smtp.tls_certificate", "smtp.users_file", "webhooks[0].tls_ca_file",
        ])
        self.assertEqual(problems["delivery.tls_ca_file"], f"no such file: {missing}")
        self.assertIn(f"cannot read {missing}", problems["delivery.smarthost_password_file"])
        self.assertIn(f"cannot read {missing}", problems["smtp.users_file"])
        self.assertEqual(problems["webhooks[0].tls_ca_file"], f"{self.key}: no PEM certificate found")
        self.assertIn("x.toml", str(e))  # the source is named as for the configuration's own

    def test_what_is_built(self) -> None:
        users = os.path.join(self.dir, "users")
        set_user(users, "alice", b"pw", cost=10)
        password = os.path.join(self.dir, "password")
        with open(password, "w") as f:
            f.write("s3cret\n")
        parts = configure(merge(base_toml(), {
            "smtp": {"users_file": users, "tls_certificate": self.cert, "tls_key": self.key,
                     "listeners": {"default": {"endpoint": "tcp:2525"},
                                   "plain": {"endpoint": "tcp:2601", "tls": "off"}}},
            "delivery": {"tls": "required", "tls_verify": True, "tls_ca_file": self.cert,
                         "smarthost": "relay.example:587", "smarthost_username": "u",
                         "smarthost_password_file": password},
            "webhooks": [{"name": "hook", "target": "https://127.0.0.1/", "tls_ca_file": self.cert}],
        }))
        self.assertIsInstance(parts, Parts)
        self.assertEqual(list(parts.listener_tls), ["default"])  # tls = "off": none loaded
        self.assertIsInstance(parts.listener_tls["default"], ssl.CertificateOptions)
        self.assertIsNotNone(parts.delivery_trust)
        self.assertEqual(list(parts.webhook_trust), ["hook"])
        assert parts.users is not None
        self.assertEqual(list(parts.users.users), ["alice"])
        self.assertEqual(parts.config.delivery.smarthost_password, "s3cret")
        self.assertIsNone(parts.signer)
        self.assertIsNone(parts.policy_hook)

    def test_a_pair_shared_by_listeners_is_read_once(self) -> None:
        calls = Calls()
        loaders = Loaders(server_options=calls.note("tls", load_server_options), keyring=LOADERS.keyring)
        parts = build_from_toml(merge(base_toml(), {"smtp": {
            "tls_certificate": self.cert, "tls_key": self.key,
            "listeners": {"default": {"endpoint": "tcp:2525"},
                          "submission": {"endpoint": "tcp:2587", "tls": "required"}}}}), "x.toml", loaders)
        self.assertEqual(calls.named("tls"), [(self.cert, self.key)])
        self.assertIs(parts.listener_tls["default"], parts.listener_tls["submission"])

    def test_a_listener_pair_is_named_at_the_listener(self) -> None:
        other_key = os.path.join(self.dir, "k2.pem")
        write_pair(os.path.join(self.dir, "c2.pem"), other_key, "localhost", 1)
        e = self.assertRaises(ConfigError, configure, merge(base_toml(), {"smtp": {
            "tls_certificate": self.cert, "tls_key": self.key,
            "listeners": {"default": {"endpoint": "tcp:2525", "tls_key": other_key}}}}))
        self.assertEqual([path for path, _ in e.problems], ["smtp.listeners.default.tls_certificate"])
        self.assertIn("the key does not belong to the certificate", e.problems[0][1])

    def test_keyring_and_hook_wait_until_everything_else_is_right(self) -> None:
        """The key file may be created and the hook's module runs when imported: not for a bad file."""
        calls = Calls()
        loaders = Loaders(keyring=calls.note("keyring", new_keyring()), hook=calls.note("hook", None))
        config = make_config(self.dir, smtp={"users_file": os.path.join(self.dir, "missing")})
        self.assertRaises(ConfigError, build, config, loaders=loaders)
        self.assertEqual(calls.calls, [])
        self.assertFalse(os.path.exists(config.links.keys_file))
        config = make_config(self.dir, policy={"hook": "tests.policies:hold"})
        parts = build(config, loaders=loaders)
        self.assertEqual(calls.calls, [("keyring", (config.links.keys_file, True)),
                                       ("hook", ("tests.policies:hold", config.policy.path))])
        self.assertIsInstance(parts.keyring, Keyring)

    def test_keyring_and_hook_problems(self) -> None:
        def no_keys(path: str, create: bool) -> Keyring:
            raise KeyFileError(f"{path}: no such key file")

        def no_hook(spec: str, path: Any) -> None:
            raise PolicyError("policy.hook: cannot import 'nowhere'")

        config = make_config(self.dir)
        e = self.assertRaises(ConfigError, build, config, loaders=Loaders(keyring=no_keys, hook=no_hook))
        self.assertEqual(e.problems, [("links.keys_file", f"{config.links.keys_file}: no such key file"),
                                      ("", "policy.hook: cannot import 'nowhere'")])
        self.assertIn("\n  policy.hook: cannot import 'nowhere'", str(e))

    def test_the_suppression_database_is_opened_before_the_start(self) -> None:
        config = make_config(self.dir)
        build(config)
        self.assertTrue(os.path.isfile(config.suppression.database))  # created, empty
        unusable = os.path.join(self.dir, "a-directory")
        os.makedirs(unusable)
        config = make_config(self.dir, suppression={"database": unusable})
        e = self.assertRaises(ConfigError, build, config)
        [(path, message)] = e.problems
        self.assertEqual(path, "suppression.database")
        self.assertIn(f"{unusable}: cannot open the suppression database", message)

    def test_the_key_file_is_created_by_default(self) -> None:
        config = make_config(self.dir)
        parts = build(config)
        self.assertEqual(read_keyring(config.links.keys_file), parts.keyring)


class TapTests(SynchronousTestCase):
    """``twistd engage-appliance -c FILE``: the builder runs while the options are parsed."""

    def write(self, **changes: Any) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = {"spool": {"directory": os.path.join(directory, "spool")},
                  "events": {"log_file": os.path.join(directory, "events.jsonl")},
                  "links": {"keys_file": os.path.join(directory, "links.keys")},
                  "suppression": {"database": os.path.join(directory, "suppression.sqlite3")}}
        lines = []
        for table, values in merge(config, changes).items():
            lines.append(f"[{table}]")
            lines += [f'{key} = "{value}"' for key, value in values.items()]
        path = os.path.join(directory, "appliance.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n[smtp.listeners.default]\nendpoint = \"tcp:2525\"\n")
        return path

    def test_a_missing_key_fails_the_command(self) -> None:
        missing = os.path.abspath(os.path.join(self.mktemp(), "key.pem"))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        write_pair(cert, key, "localhost", 1)
        path = self.write(smtp={"tls_certificate": cert, "tls_key": missing})
        e = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["-c", path])
        self.assertIn(f"1 configuration error(s) in {path}:", str(e))
        self.assertIn("smtp.tls_certificate: cannot read", str(e))

    def test_the_service_gets_what_was_built(self) -> None:
        from twisted.internet import reactor

        options = tap.Options()
        options.parseOptions(["-c", self.write()])
        self.assertIsInstance(options.parts, Parts)
        appliance = tap.makeService(options)
        self.assertIs(appliance.reactor, reactor)
        self.assertEqual(appliance.links.keyring, options.parts.keyring)
        self.assertFalse(appliance.running)
