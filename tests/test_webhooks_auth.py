"""Webhook credentials on a test clock: Basic, OAuth 2.0 client credentials, 401s, a bad token endpoint."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance.webhooks import QueueDirectory
from appliance.webhooks.auth import (
    EXPIRY_MARGIN,
    BasicAuth,
    NoAuth,
    OAuth2ClientCredentials,
    TokenAuth,
    TokenError,
    authorizer,
    parse_token_answer,
)
from tests.test_webhooks import START, FakeAgent, Request, ServiceTestCase, config, event

TARGET = b"http://127.0.0.1:9/events"
TOKEN_URL = "https://auth.example.test/oauth2/token"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def oauth_config(**changes: Any) -> Any:
    return config(auth_type="oauth2", auth_token_url=TOKEN_URL, auth_client_id="engage id",
                  auth_client_secret="s3cr:t&", **changes)


def token_answer(token: str = "tok-1", expires_in: Any = 3600, **more: Any) -> bytes:
    return json.dumps({"access_token": token, "token_type": "bearer", "expires_in": expires_in,
                       **more}).encode()


class TokenAnswerTests(SynchronousTestCase):
    def test_a_good_answer(self) -> None:
        token, expires = parse_token_answer(200, token_answer("abc.DEF-_~+/=", 3600), 1000.0)
        self.assertEqual(token, b"abc.DEF-_~+/=")
        self.assertEqual(expires, 1000.0 + 3600 - EXPIRY_MARGIN)
        # A short life loses a tenth of it, not a minute; a string of digits is a number too.
        self.assertEqual(parse_token_answer(200, token_answer(expires_in="100"), 0.0)[1], 90.0)
        # Without expires_in it is kept until a 401.
        self.assertIsNone(parse_token_answer(200, b'{"access_token": "x", "token_type": "Bearer"}', 0)[1])

    def test_what_is_not_a_token(self) -> None:
        cases = {
            (401, b'{"error": "invalid_client"}'): "HTTP 401: invalid_client",
            (503, b"<html>\nBusy</html>"): "HTTP 503: <html> Busy</html>",
            (200, b"not json"): "the answer is not a JSON object",
            (200, b"[1]"): "the answer is not a JSON object",
            (200, b'{"token_type": "bearer"}'): "the answer has no usable access_token",
            (200, token_answer("a b\r\nX-Evil: 1")): "the answer has no usable access_token",
            (200, token_answer(token_type="mac")): "token_type is 'mac', not Bearer",
            (200, token_answer(expires_in="soon")): "expires_in is 'soon', not a number of seconds",
        }
        for (code, body), why in cases.items():
            e = self.assertRaises(TokenError, parse_token_answer, code, body, 0.0)
            self.assertEqual(str(e), why)


class AuthorizerTests(SynchronousTestCase):
    def headers(self, auth: Any) -> list[tuple[bytes, bytes]]:
        return self.successResultOf(auth.credentials())

    def test_each_kind(self) -> None:
        agent, clock = FakeAgent(), Clock()
        self.assertIsInstance(authorizer(config(), agent, clock), NoAuth)
        self.assertEqual(self.headers(authorizer(config(), agent, clock)), [])
        token = authorizer(config(auth_type="token", auth_token="t0k"), agent, clock)
        self.assertIsInstance(token, TokenAuth)
        self.assertEqual(self.headers(token), [(b"X-MessageSystems-Webhook-Token", b"t0k")])
        user = authorizer(config(auth_type="basic", auth_username="ann", auth_password="pä:ss"), agent, clock)
        self.assertIsInstance(user, BasicAuth)
        self.assertEqual(self.headers(user), [(b"Authorization", basic("ann", "pä:ss").encode())])
        self.assertFalse(user.rejected())
        self.assertIsInstance(authorizer(oauth_config(), agent, clock), OAuth2ClientCredentials)
        self.assertEqual(agent.requests, [])


class OAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.agent = FakeAgent()
        self.auth = authorizer(oauth_config(timeout=10.0), self.agent, self.clock)

    def test_the_grant_request(self) -> None:
        """RFC 6749 §4.4.2 with client authentication by HTTP Basic, id and secret form-encoded first."""
        d = self.auth.credentials()
        self.assertNoResult(d)
        request = self.agent.last
        self.assertEqual((request.method, request.uri), (b"POST", TOKEN_URL.encode()))
        self.assertEqual(request.body, b"grant_type=client_credentials")
        self.assertEqual(request.header(b"Content-Type"), "application/x-www-form-urlencoded")
        self.assertEqual(request.header(b"Authorization"), basic("engage+id", "s3cr%3At%26"))
        request.answer(200, token_answer("tok-1"))
        self.assertEqual(self.successResultOf(d), [(b"Authorization", b"Bearer tok-1")])

    def test_kept_until_it_expires(self) -> None:
        self.auth.credentials()
        self.agent.last.answer(200, token_answer("tok-1", 600))
        self.clock.advance(600 - EXPIRY_MARGIN - 1)
        self.assertEqual(self.successResultOf(self.auth.credentials()), [(b"Authorization", b"Bearer tok-1")])
        self.assertEqual(len(self.agent.requests), 1)
        self.clock.advance(1)
        d = self.auth.credentials()
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.last.answer(200, token_answer("tok-2", 600))
        self.assertEqual(self.successResultOf(d), [(b"Authorization", b"Bearer tok-2")])

    def test_a_401_forgets_the_token(self) -> None:
        self.auth.credentials()
        self.agent.last.answer(200, token_answer("tok-1"))
        # Just fetched: refused at once means no new token helps now.
        self.assertFalse(self.auth.rejected())
        self.auth.credentials()
        self.agent.last.answer(200, token_answer("tok-2"))
        self.successResultOf(self.auth.credentials())  # kept from before
        self.assertTrue(self.auth.rejected())
        self.auth.credentials()
        self.assertEqual(len(self.agent.requests), 3)

    def test_a_slow_endpoint_is_a_failure(self) -> None:
        d = self.auth.credentials()
        self.clock.advance(10)
        self.assertTrue(self.agent.last.cancelled)
        failure = self.failureResultOf(d, TokenError)
        self.assertEqual(str(failure.value), f"no access token from {TOKEN_URL}: no answer in time")


class PostingWithCredentialsTests(ServiceTestCase):
    def requests_to(self, uri: bytes) -> list[Request]:
        return [r for r in self.agent.requests if r.uri == uri]

    def last_answer(self) -> dict[str, Any] | None:
        return QueueDirectory(self.directory).last_answer()

    def test_basic_from_the_target(self) -> None:
        """Credentials written into the URL go as a header; the URL requested has none."""
        from tests.building import checked
        from tests.helpers import base_toml, merge

        [hook] = checked(merge(base_toml(), {"webhooks": [
            {"name": "hook", "target": "http://an%40n:p%C3%A4ss@127.0.0.1:9/events"}]})).webhooks
        svc = self.webhooks(hook).webhooks[0]
        self.emit(event())
        svc.seal()
        request = self.agent.last
        self.assertEqual(request.uri, TARGET)
        self.assertEqual(request.header(b"Authorization"), basic("an@n", "päss"))

    def test_a_401_with_basic_is_logged_once_per_batch(self) -> None:
        svc = self.service(auth_type="basic", auth_username="ann", auth_password="wrong")
        self.emit(event())
        svc.seal()
        for _ in range(5):
            self.agent.last.answer(401, b"bad credentials")
            self.clock.advance(1800)
        self.assertEqual(len(self.agent.requests), 6)  # five refused, the sixth in flight
        [error] = self.messages("error")
        self.assertIn("refuses the credentials of auth_type basic (HTTP 401", error)
        self.assertIn(svc.batches[0].batch_id, error)
        self.assertNotIn("wrong", error)
        self.assertEqual(self.messages("warn"), [])
        # The next batch's refusal is logged again, once.
        self.agent.last.answer(200)
        self.emit(event("delivery", 2))
        svc.seal()
        self.agent.last.answer(401)
        self.clock.advance(30)
        self.agent.last.answer(401)
        self.assertEqual(len(self.messages("error")), 2)

    def test_the_token_goes_to_the_target_and_the_secret_to_the_token_url(self) -> None:
        svc = self.service(**vars_of(oauth_config()))
        self.emit(event())
        svc.seal()
        [grant] = self.agent.requests
        self.assertEqual(grant.uri, TOKEN_URL.encode())
        grant.answer(200, token_answer("tok-1"))
        [post] = self.requests_to(TARGET)
        self.assertEqual(post.header(b"Authorization"), "Bearer tok-1")
        self.assertIsNone(post.header(b"X-MessageSystems-Webhook-Token"))
        post.answer(200)
        # The next batch reuses the token.
        self.emit(event("delivery", 2))
        svc.seal()
        self.assertEqual(len(self.requests_to(TOKEN_URL.encode())), 1)
        self.assertEqual(self.agent.last.header(b"Authorization"), "Bearer tok-1")

    def test_a_401_to_a_kept_token_posts_again_at_once_with_a_new_one(self) -> None:
        svc = self.service(**vars_of(oauth_config()))
        self.emit(event())
        svc.seal()
        self.agent.last.answer(200, token_answer("tok-1"))
        self.agent.last.answer(200)
        self.emit(event("delivery", 2))
        svc.seal()
        refused = self.agent.last
        refused.answer(401)  # revoked before it expired
        self.agent.last.answer(200, token_answer("tok-2"))
        again = self.agent.last
        self.assertEqual((again.uri, again.batch_id, again.header(b"Authorization")),
                         (TARGET, refused.batch_id, "Bearer tok-2"))
        again.answer(200)
        self.assertEqual((svc.failures, svc.batches), (0, []))
        self.assertEqual(self.messages("error"), [])

    def test_a_token_endpoint_that_is_down_delays_the_batch(self) -> None:
        """Down, garbage, slow: each a failed attempt with back-off and a log line; nothing dropped."""
        svc = self.service(**vars_of(oauth_config(timeout=10.0)))
        self.emit(event())
        svc.seal()
        self.agent.last.fail(ConnectionRefusedError("refused"))
        self.clock.advance(30)
        self.agent.last.answer(200, b"<html>oops</html>")
        self.clock.advance(60)
        self.clock.advance(10)  # no answer in time
        warnings = self.messages("warn")
        self.assertEqual(len(warnings), 3)
        for warning, why in zip(warnings, ("refused", "the answer is not a JSON object",
                                           "no answer in time"), strict=True):
            self.assertIn(f"no access token from {TOKEN_URL}: ", warning)
            self.assertIn(why, warning)
        self.assertIn("next attempt in 120s", warnings[2])
        self.assertEqual(self.requests_to(TARGET), [])
        self.assertEqual(len(svc.batches), 1)
        self.assertFalse(self.last_answer()["accepted"])
        # Events keep being taken meanwhile: a hanging token request holds up nothing else.
        self.clock.advance(120)
        self.emit(event("delivery", 2))
        svc.seal()
        self.assertEqual(len(svc.batches), 2)
        self.agent.last.answer(200, token_answer())
        self.agent.last.answer(200)
        self.agent.last.answer(200)
        self.assertEqual(svc.batches, [])

    def test_not_dropped_before_the_retry_lifetime(self) -> None:
        svc = self.service(**vars_of(oauth_config(retry_lifetime=8 * 3600.0)))
        self.emit(event())
        svc.seal()
        for _ in range(8 * 3600 - 1):
            if not self.agent.last.deferred.called:
                self.agent.last.answer(500)
            self.clock.advance(1)
        self.assertEqual(len(svc.batches), 1)
        self.assertEqual(self.messages("error"), [])
        self.clock.advance(1)
        self.agent.last.answer(500)
        self.assertEqual(svc.batches, [])
        self.assertIn("within 8 hours", self.messages("error")[0])

    def test_the_last_answer_is_kept_in_the_queue_directory(self) -> None:
        svc = self.service()
        self.emit(event())
        svc.seal()
        batch_id = self.agent.last.batch_id
        self.agent.last.answer(503, b"busy")
        self.assertEqual(self.last_answer(), {"time": int(START), "batch_id": batch_id, "accepted": False,
                                              "answer": "HTTP 503 Internal Server Error: busy"})
        self.clock.advance(30)
        self.agent.last.answer(200)
        self.assertEqual(self.last_answer(), {"time": int(START) + 30, "batch_id": batch_id,
                                              "accepted": True, "answer": "HTTP 200 OK"})
        # It is not a batch: a restart leaves it alone and posts nothing for it.
        self.stop()
        self.service()
        self.assertIn("last-answer", os.listdir(self.directory))
        self.assertEqual(len(self.agent.requests), 2)


def vars_of(c: Any) -> dict[str, Any]:
    """A WebhookConfig's fields as ``service(**changes)`` takes them."""
    return {k: getattr(c, k) for k in ("auth_type", "auth_token_url", "auth_client_id", "auth_client_secret",
                                       "timeout", "retry_lifetime")}


class HeadersAreNotShared(SynchronousTestCase):
    def test_each_request_gets_its_own_list(self) -> None:
        """A caller that adds to the headers it got cannot change the next request's."""
        auth = BasicAuth("a", "b")
        first = self.successResultOf(auth.credentials())
        first.append((b"X", b"y"))
        self.assertEqual(len(self.successResultOf(auth.credentials())), 1)


class StopWhileFetchingTests(ServiceTestCase):
    def test_a_stop_cancels_the_token_request(self) -> None:
        svc = self.service(**vars_of(oauth_config()))
        self.emit(event())
        svc.seal()
        grant = self.agent.last
        self.stop()
        self.assertTrue(grant.cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.messages("warn"), [])
        # After the next start the batch is posted, with a token fetched then.
        self.service(**vars_of(oauth_config()))
        self.agent.last.answer(200, token_answer("tok-2"))
        self.assertEqual(self.agent.last.header(b"Authorization"), "Bearer tok-2")
        self.assertEqual(self.agent.last.batch_id, svc.batches[0].batch_id)
