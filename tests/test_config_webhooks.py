"""The [[webhooks]] tables: defaults, and every mistake named as webhooks[i].key."""

from __future__ import annotations

import os
import tomllib

from twisted.trial.unittest import SynchronousTestCase

from appliance.config import EVENT_TYPES, Config, ConfigError, parse_config
from appliance.tls import load_trust_root
from tests.building import checked
from tests.fakes import self_signed
from tests.helpers import SHIPPED_CONFIG, base_toml, merge


def load_error(path: str) -> str:
    try:
        load_trust_root(path)
    except ValueError as e:
        return str(e)
    raise AssertionError(f"{path} loaded")


class WebhookConfigTests(SynchronousTestCase):
    def parse(self, *webhooks: object) -> Config:
        return checked(merge(base_toml(), {"webhooks": list(webhooks)}), "x.toml")

    def problems(self, *webhooks: object) -> dict[str, str]:
        e = self.assertRaises(ConfigError, self.parse, *webhooks)
        return dict(e.problems)

    def test_none_by_default(self) -> None:
        self.assertEqual(parse_config(base_toml()).webhooks, ())

    def test_defaults(self) -> None:
        [hook] = self.parse({"target": "https://hooks.example.com/sparkpost?x=1"}).webhooks
        self.assertEqual(hook.events, frozenset(EVENT_TYPES))
        self.assertEqual(hook.auth_token, "")
        self.assertEqual((hook.max_batch_size, hook.batch_interval, hook.timeout), (10000, 30, 10))
        self.assertEqual(hook.max_batch_bytes, 5 * 1024 * 1024)
        # SparkPost retries a batch for 8 hours.
        self.assertEqual((hook.retry_initial, hook.retry_max, hook.retry_lifetime),
                         (30, 1800, 8 * 3600))
        self.assertEqual(hook.auth_type, "none")
        # The queue is named after the target, so it is the same across restarts.
        self.assertRegex(hook.name, r"^hooks\.example\.com-[0-9a-f]{8}$")
        [again] = self.parse({"target": "https://hooks.example.com/sparkpost?x=1"}).webhooks
        self.assertEqual(again.name, hook.name)
        [other] = self.parse({"target": "https://hooks.example.com/other"}).webhooks
        self.assertNotEqual(other.name, hook.name)

    def test_written_as_toml_array_of_tables(self) -> None:
        text = """
[[webhooks]]
target = "http://127.0.0.1:8000/a"
events = ["click", "open", "click"]
auth_token = "abc"
batch_interval = "5s"

[[webhooks]]
name = "audit"
target = "http://127.0.0.1:8000/b"
retry_lifetime = "8h"
"""
        a, b = parse_config(merge(base_toml(), tomllib.loads(text))).webhooks
        self.assertEqual((a.events, a.auth_token, a.batch_interval), (frozenset({"click", "open"}), "abc", 5))
        self.assertEqual((b.name, b.retry_lifetime), ("audit", 8 * 3600))

    def test_every_mistake_named_at_once(self) -> None:
        problems = self.problems(
            {"events": ["open"]},
            {"target": "ftp://example.com/"},
            {"target": "http://u:p@example.com/", "auth_type": "token"},
            {"target": "http://example.com/ x"},
            {"target": "http://example.com:99999/"},
            {"target": "http://example.com/#frag"},
            {"target": "http://example.com/", "events": ["opne", "click"]},
            {"target": "http://example.com/", "events": []},
            {"target": "http://example.com/", "auth_token": "a\r\nX-Evil: 1"},
            {"target": "http://example.com/", "max_batch_size": 20000, "batch_interval": "0s",
             "retry_initial": "1h", "retry_max": "1m", "bogus": 1},
            {"target": "http://example.com/", "name": "../up"},
            "not a table",
        )
        self.assertEqual(problems, {
            "webhooks[0].target": "missing: the http(s) URL that receives the batches",
            "webhooks[1].target": 'expected an http:// or https:// URL, got "ftp://example.com/"',
            "webhooks[2].target": 'credentials in the URL are sent as HTTP Basic auth, not with '
                                  'auth_type "token"',
            "webhooks[2].auth_token": 'missing: auth_type "token" sends it as X-MessageSystems-Webhook-Token',
            "webhooks[3].target": "expected an http(s) URL without spaces or non-ASCII characters, "
                                  'got "http://example.com/ x"',
            "webhooks[4].target": 'bad port in "http://example.com:99999/"',
            "webhooks[5].target": 'a URL fragment is never sent; remove it from "http://example.com/#frag"',
            "webhooks[6].events": 'unknown event type(s) "opne"; expected some of ' + ", ".join(EVENT_TYPES),
            "webhooks[7].events": "must name at least one event type",
            "webhooks[8].auth_token": "must be printable ASCII (it is sent as an HTTP header)",
            "webhooks[9].max_batch_size": "expected an integer from 1 to 10000, got 20000",
            "webhooks[9].batch_interval": "must be more than 0 seconds",
            "webhooks[9].retry_max": "must not be less than retry_initial",
            "webhooks[9].bogus": "unknown key",
            "webhooks[10].name": "expected letters, digits, '.', '_' or '-' (at most 64), got \"../up\"",
            "webhooks[11]": "expected a table, got a string",
        })

    def test_max_batch_bytes(self) -> None:
        target = "http://example.com/"
        a, b = self.parse({"target": target, "max_batch_bytes": "900K"},
                          {"target": target, "name": "b", "max_batch_bytes": 65536}).webhooks
        self.assertEqual((a.max_batch_bytes, b.max_batch_bytes), (900 * 1024, 65536))
        problems = self.problems({"target": target, "max_batch_bytes": "0"},
                                 {"target": target, "max_batch_bytes": "1 TB"},
                                 {"target": target, "max_batch_bytes": -1})
        self.assertEqual(problems, {
            "webhooks[0].max_batch_bytes": "must be more than 0 bytes",
            "webhooks[1].max_batch_bytes": 'expected a size such as 25M, got "1 TB"',
            "webhooks[2].max_batch_bytes": "expected a size such as 25M, got -1",
        })

    def test_names_must_differ(self) -> None:
        target = "http://example.com/"
        problems = self.problems({"target": target}, {"target": target, "events": ["click"]})
        self.assertEqual(list(problems), ["webhooks[1].name"])
        self.assertIn("is also the name of webhooks[0]", problems["webhooks[1].name"])
        # Two webhooks to one target are fine with their own names.
        self.assertEqual(len(self.parse({"target": target}, {"target": target, "name": "x"}).webhooks), 2)

    def test_webhooks_must_be_an_array(self) -> None:
        e = self.assertRaises(ConfigError, parse_config,
                              merge(base_toml(), {"webhooks": {"target": "http://x/"}}))
        self.assertEqual(e.problems, [("webhooks", "expected an array of tables, written [[webhooks]]")])

    def test_shipped_example_is_valid(self) -> None:
        """Each commented-out [[webhooks]] example in etc/appliance.toml loads when uncommented."""
        with open(SHIPPED_CONFIG, encoding="utf-8") as f:
            text = f.read()
        example = text[text.index("# [[webhooks]]"):]
        uncommented = "\n".join(line[2:] for line in example.splitlines() if line.startswith("# "))
        hook, basic, oauth = parse_config(merge(base_toml(), tomllib.loads(uncommented))).webhooks
        self.assertEqual((hook.name, hook.target, hook.auth_type, hook.auth_token),
                         ("hooks", "https://hooks.example.com/sparkpost", "token", "secret"))
        self.assertEqual(hook.events, frozenset({"delivery", "bounce", "open", "click"}))
        self.assertEqual((hook.max_batch_size, hook.max_batch_bytes, hook.batch_interval,
                          hook.retry_lifetime), (10000, 5 * 1024 * 1024, 30, 8 * 3600))
        self.assertEqual((basic.name, basic.auth_type, basic.auth_username, basic.auth_password_file),
                         ("anymail", "basic", "webhook", "/etc/engage-appliance/webhook.password"))
        self.assertEqual((oauth.name, oauth.auth_type, oauth.auth_token_url, oauth.auth_client_id,
                          oauth.auth_client_secret_file),
                         ("oauth", "oauth2", "https://auth.example.com/oauth2/token", "engage-appliance",
                          "/etc/engage-appliance/oauth.secret"))

    def test_tls_ca_file(self) -> None:
        directory = os.path.abspath(self.mktemp())
        _, certificate = self_signed(directory)
        garbage = os.path.join(directory, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("not a certificate\n")
        [hook] = self.parse({"target": "https://127.0.0.1:8443/", "tls_ca_file": certificate}).webhooks
        self.assertEqual(hook.tls_ca_file, certificate)
        missing = os.path.join(directory, "missing.pem")
        problems = self.problems(
            {"target": "https://127.0.0.1/a", "tls_ca_file": missing},
            {"target": "https://127.0.0.1/b", "tls_ca_file": garbage},
            {"target": "http://127.0.0.1/", "tls_ca_file": certificate},
        )
        self.assertEqual(problems, {
            "webhooks[0].tls_ca_file": load_error(missing),
            "webhooks[1].tls_ca_file": f"{garbage}: no PEM certificate found",
            "webhooks[2].tls_ca_file": "set, but the target is not an https:// URL",
        })


class WebhookAuthConfigTests(SynchronousTestCase):
    """auth_type and the keys of each kind: what is implied, and every combination that cannot work."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.password = self.secret_file("password", "pa:ss wörd\n")
        self.client_secret = self.secret_file("client", "cl1ent-secret\n")

    def secret_file(self, name: str, text: str) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def parse(self, *webhooks: object) -> Config:
        return checked(merge(base_toml(), {"webhooks": list(webhooks)}), "x.toml")

    def problems(self, *webhooks: object) -> dict[str, str]:
        e = self.assertRaises(ConfigError, self.parse, *webhooks)
        return dict(e.problems)

    def test_implied_by_the_keys_given(self) -> None:
        none, token, empty_token, basic, oauth = self.parse(
            {"target": "https://h.example/a"},
            {"target": "https://h.example/b", "auth_token": "t"},
            {"target": "https://h.example/c", "auth_token": ""},
            {"target": "https://h.example/d", "auth_username": "ann", "auth_password_file": self.password},
            {"target": "https://h.example/e", "auth_token_url": "https://auth.example/token",
             "auth_client_id": "engage", "auth_client_secret_file": self.client_secret},
        ).webhooks
        self.assertEqual([h.auth_type for h in (none, token, empty_token, basic, oauth)],
                         ["none", "token", "none", "basic", "oauth2"])
        # The builder read each secret file once, without its line end.
        self.assertEqual((basic.auth_username, basic.auth_password), ("ann", "pa:ss wörd"))
        self.assertEqual((oauth.auth_token_url, oauth.auth_client_id, oauth.auth_client_secret),
                         ("https://auth.example/token", "engage", "cl1ent-secret"))
        self.assertNotIn("wörd", repr(basic))
        self.assertNotIn("cl1ent", repr(oauth))

    def test_credentials_in_the_target_are_basic_auth(self) -> None:
        [hook] = self.parse({"target": "https://us%40er:s%3Axyzzy@hooks.example/anymail/?x=1"}).webhooks
        self.assertEqual((hook.auth_type, hook.auth_username, hook.auth_password),
                         ("basic", "us@er", "s:xyzzy"))
        self.assertEqual(hook.target, "https://hooks.example/anymail/?x=1")
        self.assertNotIn("xyzzy", hook.name)
        self.assertNotIn("xyzzy", repr(hook))
        # The queue is named after the URL without credentials: a new password keeps it.
        [again] = self.parse({"target": "https://us%40er:other@hooks.example/anymail/?x=1"}).webhooks
        [bare] = self.parse({"target": "https://hooks.example/anymail/?x=1"}).webhooks
        self.assertEqual({hook.name, again.name, bare.name}, {hook.name})
        [written] = self.parse({"target": "https://u:p@hooks.example/", "auth_type": "basic"}).webhooks
        self.assertEqual((written.auth_username, written.auth_password), ("u", "p"))

    def test_every_combination_that_cannot_work(self) -> None:
        target = "https://h.example/"
        oauth = {"auth_token_url": "https://auth.example/token", "auth_client_id": "engage",
                 "auth_client_secret_file": self.client_secret}
        problems = self.problems(
            {"target": target, "auth_type": "kerberos"},
            {"target": target, "auth_type": "token"},
            {"target": target, "auth_type": "basic"},
            {"target": target, "auth_username": "ann"},
            {"target": target, "auth_password_file": self.password},
            {"target": "https://u:p@h.example/", "auth_username": "ann"},
            {"target": "https://:p@h.example/"},
            {"target": target, "auth_username": "a:b", "auth_password_file": self.password},
            {"target": target, "auth_type": "oauth2"},
            {"target": target, "auth_type": "oauth2", **oauth, "auth_token_url": "https://x:y@auth.example/"},
            {"target": target, "auth_token": "t", "auth_username": "ann", **oauth},
            {"target": "https://u:p@h.example/", "auth_type": "none"},
            {"target": target, "auth_type": "none", "auth_token": "t"},
            {"target": target, "auth_username": "ann",
             "auth_password_file": os.path.join(self.directory, "missing")},
            {"target": "https://a%3Ab:p@h.example/"},
        )
        missing = os.path.join(self.directory, "missing")
        implied = " (set auth_type, or it follows from auth_token)"
        self.assertEqual(problems, {
            "webhooks[0].auth_type": "expected one of 'none', 'token', 'basic', 'oauth2', got \"kerberos\"",
            "webhooks[1].auth_token": 'missing: auth_type "token" sends it as X-MessageSystems-Webhook-Token',
            "webhooks[2].auth_username": 'missing: auth_type "basic" needs auth_username and '
                                         "auth_password_file, or credentials in the target",
            "webhooks[3].auth_password_file": "missing: the file that holds auth_username's password",
            "webhooks[4].auth_username": 'missing: auth_type "basic" needs auth_username and '
                                         "auth_password_file, or credentials in the target",
            "webhooks[5].auth_username": "the target carries credentials already; give them in one place",
            "webhooks[6].target": "the credentials in the URL have no user name",
            "webhooks[7].auth_username": "the user name must not contain ':' (HTTP Basic auth, RFC 7617)",
            "webhooks[8].auth_token_url": 'missing: auth_type "oauth2" needs auth_token_url, auth_client_id '
                                          "and auth_client_secret_file",
            "webhooks[8].auth_client_id": 'missing: auth_type "oauth2" needs auth_token_url, auth_client_id '
                                          "and auth_client_secret_file",
            "webhooks[8].auth_client_secret_file": 'missing: auth_type "oauth2" needs auth_token_url, '
                                                   "auth_client_id and auth_client_secret_file",
            "webhooks[9].auth_token_url": "must not hold credentials; the client's are auth_client_id and "
                                          "its secret file",
            "webhooks[10].auth_username": 'not used with auth_type "token"' + implied,
            "webhooks[10].auth_token_url": 'not used with auth_type "token"' + implied,
            "webhooks[10].auth_client_id": 'not used with auth_type "token"' + implied,
            "webhooks[10].auth_client_secret_file": 'not used with auth_type "token"' + implied,
            "webhooks[11].target": 'credentials in the URL are sent as HTTP Basic auth, not with auth_type '
                                   '"none"',
            "webhooks[12].auth_token": 'not used with auth_type "none"',
            "webhooks[13].auth_password_file": f"cannot read {missing}: [Errno 2] No such file or directory: "
                                               f"'{missing}'",
            "webhooks[14].target": "the user name must not contain ':' (HTTP Basic auth, RFC 7617)",
        })

    def test_no_password_in_any_message(self) -> None:
        problems = self.problems({"target": "ftp://ann:hunter2@h.example/"},
                                 {"target": "https://ann:hunter2@h.example:99999/"},
                                 {"target": "https://ann:hunter2@h.example/#x"},
                                 {"target": "https://ann:hunter2@h.example/ x"})
        self.assertEqual(len(problems), 4)
        self.assertFalse([m for m in problems.values() if "hunter2" in m], problems)
