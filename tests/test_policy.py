"""The policy hook: loading it, calling it, and every way it can answer or fail."""

from __future__ import annotations

import os
from email.message import Message
from typing import Any

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from appliance.config import ConfigError
from appliance.policy import ACCEPT, Policy, PolicyEnvelope, PolicyError, Reject, Verdict, load_hook
from appliance.settings import ContextSettings
from tests.helpers import REPO, make_config

ENVELOPE = PolicyEnvelope("s@example.net", "r@example.test", ("r@example.test",), "1", "default",
                          "client.example", False)


class PolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()

    def verdict(self, hook: Any, timeout: float = 5.0) -> defer.Deferred:
        return Policy(hook, timeout, self.clock, 100).check(ENVELOPE, "192.0.2.1", "user", Message())

    def test_no_hook_accepts(self) -> None:
        self.assertEqual(self.successResultOf(self.verdict(None)), ACCEPT)

    def test_arguments_and_context(self) -> None:
        seen: list[Any] = []

        def hook(envelope: Any, client: str, user: Any, headers: Message, context: dict) -> None:
            seen.append((envelope, client, user, dict(context)))
            context.update(smtpapi_open_tracking="1", smtpapi_tags='["a"]', other="ignored")

        verdict = self.successResultOf(self.verdict(hook))
        self.assertEqual(verdict, Verdict(context=ContextSettings(open_tracking=True, tags=("a",))))
        self.assertEqual(seen, [(ENVELOPE, "192.0.2.1", "user", {})])

    def test_reject_returned_or_raised(self) -> None:
        def returns(*args: Any) -> Reject:
            return Reject(550, "5.7.1 No")

        def raises(*args: Any) -> None:
            raise Reject(450, "try later")

        self.assertEqual(self.successResultOf(self.verdict(returns)), Verdict(550, "5.7.1 No"))
        verdict = self.successResultOf(self.verdict(raises))
        self.assertEqual((verdict.code, verdict.text, verdict.temporary), (450, "4.7.1 try later", True))
        self.assertEqual(Reject().text, "5.7.1 Rejected by policy")

    def test_reject_codes_and_texts_are_checked(self) -> None:
        for code in (250, 399, 600, True, "550", 550.0):
            self.assertRaises(ValueError, Reject, code, "x")
        for text in ("a\r\nb", "é", "x" * 401):
            self.assertRaises(ValueError, Reject, 550, text)

        def bad(*args: Any) -> Reject:
            return Reject(250, "fine")  # raises ValueError inside the hook

        self.assertEqual(self.successResultOf(self.verdict(bad)), Verdict(451, "4.3.5 Policy not "
                                                                         "available, try again later"))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_deferred(self) -> None:
        def later(envelope: Any, client: str, user: Any, headers: Message, context: dict) -> Any:
            d: defer.Deferred = defer.Deferred()

            def decide() -> None:
                context["smtpapi_campaign_id"] = "late"
                d.callback(None)

            self.clock.callLater(1, decide)
            return d

        d = self.verdict(later)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d).context.campaign_id, "late")

        def later_reject(*args: Any) -> defer.Deferred:
            return defer.fail(Reject(551, "5.1.1 gone"))

        self.assertEqual(self.successResultOf(self.verdict(later_reject)), Verdict(551, "5.1.1 gone"))

    def test_timeout(self) -> None:
        d = self.verdict(lambda *args: defer.Deferred(), timeout=3)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(d).code, 451)

    def test_failures_are_temporary(self) -> None:
        def crashes(*args: Any) -> None:
            raise KeyError("x")

        self.assertEqual(self.successResultOf(self.verdict(crashes)).code, 451)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(self.successResultOf(self.verdict(lambda *a: "yes")).code, 451)

        def bad_value(envelope: Any, client: str, user: Any, headers: Message, context: dict) -> None:
            context["smtpapi_metadata"] = "not json"

        self.assertEqual(self.successResultOf(self.verdict(bad_value)).code, 451)

    def test_values_nothing_could_store_are_temporary_failures(self) -> None:
        """Half a character or JSON nested past recursion is a bad value, not a crash."""
        for name, value in (("smtpapi_campaign_id", "\ud800"), ("smtpapi_tags", '["\\udfff"]'),
                            ("smtpapi_metadata", '{"a":' * 5000 + "1" + "}" * 5000),
                            ("smtpapi_metadata", '{"a":1e999}')):
            def hook(envelope: Any, client: str, user: Any, headers: Message, context: dict,
                     name: str = name, value: str = value) -> None:
                context[name] = value

            self.assertEqual(self.successResultOf(self.verdict(hook)),
                             Verdict(451, "4.3.5 Policy not available, try again later"))


class LoadTests(SynchronousTestCase):
    def test_shipped_example(self) -> None:
        hook = load_hook("policy_example:policy", [os.path.join(REPO, "etc")])
        assert hook is not None
        context: dict[str, str] = {}
        headers = Message()
        headers["X-Campaign"] = "Spring"
        envelope = PolicyEnvelope("s@x", "a@y.example", ("a@y.example",), "1", "newsletter", "h", True)
        self.assertIsNone(hook(envelope, "127.0.0.1", None, headers, context))
        self.assertEqual(context["smtpapi_campaign_id"], "Spring")
        settings = Policy(hook, 1, task.Clock(), 1000)._answered(None, envelope, context)
        self.assertTrue(settings.context.open_tracking)
        self.assertEqual(settings.context.metadata, {"injected_by": "127.0.0.1"})
        rejected = hook(envelope.__class__(**{**envelope.__dict__, "rcpt_to": "a@b.invalid"}),
                        "127.0.0.1", None, headers, {})
        self.assertIsInstance(rejected, Reject)

    def test_errors(self) -> None:
        self.assertIsNone(load_hook(""))
        e = self.assertRaises(PolicyError, load_hook, "no_such_module_here:f")
        self.assertIn("policy.hook: cannot import 'no_such_module_here'", str(e))
        e = self.assertRaises(PolicyError, load_hook, "tests.policies:nothing")
        self.assertIn("has no function 'nothing'", str(e))

    def test_config(self) -> None:
        config = make_config(self.mktemp(), policy={"hook": "tests.policies:broken", "timeout": "2s"})
        self.assertEqual((config.policy.hook, config.policy.timeout), ("tests.policies:broken", 2.0))
        e = self.assertRaises(ConfigError, make_config, self.mktemp(),
                              policy={"hook": "not a hook", "timeout": 0, "extra": 1})
        self.assertEqual(sorted(path for path, _ in e.problems),
                         ["policy.extra", "policy.hook", "policy.timeout"])
