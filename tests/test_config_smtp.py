"""The [smtp] keys of the hardened injection server: TLS, AUTH, limits and timeouts."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from appliance.config import ConfigError
from appliance.tls import write_pair
from appliance.users import set_user
from tests.building import checked
from tests.helpers import base_toml, merge


class SmtpConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        self.cert, self.key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
        write_pair(self.cert, self.key, "localhost", 1)
        self.users = os.path.join(d, "users")
        set_user(self.users, "alice", b"pw", cost=10)
        self.dir = d

    def parse(self, **smtp: object) -> object:
        return checked(merge(base_toml(), {"smtp": smtp}), "x.toml")

    def problems(self, **smtp: object) -> dict[str, str]:
        e = self.assertRaises(ConfigError, self.parse, **smtp)
        return dict(e.problems)

    def test_defaults(self) -> None:
        c = self.parse().smtp
        self.assertEqual((c.max_connections, c.max_connections_per_client), (200, 20))
        self.assertEqual((c.timeout, c.command_timeout, c.data_timeout), (300, 60, 1800))
        self.assertEqual((c.tls_certificate, c.users_file), ("", ""))
        self.assertEqual(c.listeners[0].tls, "off")
        self.assertFalse(c.listeners[0].require_auth)

    def test_listener_budgets_and_session_limits(self) -> None:
        c = self.parse(max_connections=50, max_connections_per_client=5, junk_command_limit=30,
                       hard_error_limit=7, listeners={
                           "default": {"endpoint": "tcp:2525"},
                           "public": {"endpoint": "tcp:25", "max_connections": 300,
                                      "max_connections_per_client": 2}}).smtp
        self.assertEqual([(li.name, li.max_connections, li.max_connections_per_client)
                          for li in c.listeners], [("default", 50, 5), ("public", 300, 2)])
        self.assertEqual((c.junk_command_limit, c.hard_error_limit), (30, 7))
        d = self.parse().smtp
        self.assertEqual((d.junk_command_limit, d.hard_error_limit), (100, 20))
        self.assertEqual((d.auth_attempts_per_second, d.auth_failure_backoff, d.auth_failure_backoff_max),
                         (10, 1.0, 60.0))
        a = self.parse(auth_attempts_per_second=3, auth_failure_backoff="2s",
                       auth_failure_backoff_max="10m").smtp
        self.assertEqual((a.auth_attempts_per_second, a.auth_failure_backoff, a.auth_failure_backoff_max),
                         (3, 2.0, 600.0))
        self.assertEqual(self.problems(auth_failure_backoff="2m", auth_failure_backoff_max="1m"),
                         {"smtp.auth_failure_backoff": "must not be more than auth_failure_backoff_max"})
        self.assertEqual(self.problems(hard_error_limit=0, listeners={
            "default": {"endpoint": "tcp:2525", "max_connections": 0}}),
            {"smtp.hard_error_limit": "expected an integer >= 1, got 0",
             "smtp.listeners.default.max_connections": "expected an integer >= 1, got 0"})

    def test_certificate_turns_starttls_on_and_listeners_choose(self) -> None:
        c = self.parse(tls_certificate=self.cert, tls_key=self.key, users_file=self.users, listeners={
            "default": {"endpoint": "tcp:2525"},
            "submission": {"endpoint": "tcp:2587", "tls": "required", "require_auth": True},
            "smtps": {"endpoint": "tcp:2465", "tls": "implicit"},
            "plain": {"endpoint": "tcp:2601", "tls": "off"},
        }).smtp
        self.assertEqual([(li.name, li.tls, li.require_auth) for li in c.listeners],
                         [("default", "starttls", False), ("submission", "required", True),
                          ("smtps", "implicit", False), ("plain", "off", False)])
        self.assertEqual(c.listeners[0].tls_certificate, self.cert)

    def test_ssl_endpoint_is_implicit_tls(self) -> None:
        endpoint = f"ssl:2465:privateKey={self.key}:certKey={self.cert}"
        c = self.parse(listeners={"smtps": {"endpoint": endpoint}}).smtp
        self.assertEqual({li.name: li.tls for li in c.listeners}, {"default": "off", "smtps": "implicit"})
        self.assertEqual(self.problems(listeners={"smtps": {"endpoint": endpoint, "tls": "implicit"}}),
                         {"smtp.listeners.smtps.tls": "not with an ssl: endpoint, which is implicit "
                                                     "TLS already"})

    def test_every_mistake_named(self) -> None:
        other_key = os.path.join(self.dir, "k2.pem")
        write_pair(os.path.join(self.dir, "c2.pem"), other_key, "localhost", 1)
        with open(os.path.join(self.dir, "bad-users"), "w") as f:
            f.write("alice\n")
        p = self.problems(
            tls_certificate=self.cert, tls_key=other_key,
            users_file=os.path.join(self.dir, "bad-users"),
            max_connections=0, max_connections_per_client="many", command_timeout="0s",
            data_timeout="soon",
            listeners={"default": {"endpoint": "tcp:2525", "tls": "sometimes", "require_auth": "yes"}},
        )
        self.assertIn("the key does not belong to the certificate", p["smtp.tls_certificate"])
        self.assertIn("line 1: expected name:hash", p["smtp.users_file"])
        self.assertEqual(p["smtp.max_connections"], "expected an integer >= 1, got 0")
        self.assertEqual(p["smtp.max_connections_per_client"], 'expected an integer, got "many"')
        self.assertEqual(p["smtp.command_timeout"], "must be more than 0 seconds")
        self.assertEqual(p["smtp.data_timeout"], 'expected seconds, got "soon"')
        self.assertIn("expected one of 'off', 'starttls', 'required', 'implicit'",
                      p["smtp.listeners.default.tls"])
        self.assertEqual(p["smtp.listeners.default.require_auth"], 'expected true or false, got "yes"')

    def test_inconsistent_settings(self) -> None:
        p = self.problems(tls_certificate=self.cert,
                          listeners={"default": {"endpoint": "tcp:2525", "require_auth": True}})
        self.assertEqual(p["smtp.tls_key"], "tls_certificate and tls_key must be set together")
        self.assertEqual(p["smtp.listeners.default.require_auth"], "needs smtp.users_file")
        p = self.problems(users_file=self.users,
                          listeners={"default": {"endpoint": "tcp:2525", "tls": "starttls",
                                                 "require_auth": True}})
        self.assertEqual(p["smtp.listeners.default.tls"],
                         'tls = "starttls" needs smtp.tls_certificate and smtp.tls_key')
        p = self.problems(users_file=os.path.join(self.dir, "missing"))
        self.assertIn("cannot read", p["smtp.users_file"])

    def test_ssl_endpoint_refuses_a_certificate_of_its_own(self) -> None:
        # The connection would use the endpoint's certKey, whatever these said.
        endpoint = f"ssl:2465:privateKey={self.key}:certKey={self.cert}"
        p = self.problems(listeners={"smtps": {"endpoint": endpoint, "tls_certificate": self.cert,
                                               "tls_key": self.key}})
        expected = ("not with an ssl: endpoint, whose privateKey= and certKey= give the certificate "
                    '(or use a tcp: endpoint with tls = "implicit")')
        self.assertEqual(p, {"smtp.listeners.smtps.tls_certificate": expected,
                             "smtp.listeners.smtps.tls_key": expected})
        # The [smtp] pair stays meaningful for the other listeners and is no error here.
        c = self.parse(tls_certificate=self.cert, tls_key=self.key,
                       listeners={"smtps": {"endpoint": endpoint}}).smtp
        self.assertEqual({li.name: (li.tls, li.tls_certificate) for li in c.listeners},
                         {"default": ("starttls", self.cert), "smtps": ("implicit", "")})

    def test_max_hops(self) -> None:
        self.assertEqual(self.parse().smtp.max_hops, 50)
        self.assertEqual(self.parse(max_hops=100).smtp.max_hops, 100)
        self.assertEqual(self.problems(max_hops=0), {"smtp.max_hops": "expected an integer >= 1, got 0"})
        self.assertEqual(self.problems(max_hops="50"), {"smtp.max_hops": 'expected an integer, got "50"'})
