"""
How a webhook proves who it is to its receiver: the four ways SparkPost's webhooks do.

- ``none``: nothing;
- ``token``: the ``X-MessageSystems-Webhook-Token`` header;
- ``basic``: ``Authorization: Basic`` (RFC 7617), the user name and password in UTF-8;
- ``oauth2``: ``Authorization: Bearer`` with an access token got by the client-credentials
  grant (RFC 6749 §4.4): ``grant_type=client_credentials`` POSTed to ``auth_token_url``
  with the client's id and secret as HTTP Basic (§2.3.1), answered with JSON
  ``access_token`` and ``expires_in``. The token is kept until it expires, or until the
  receiver answers ``401``, and fetched again then. The client's secret goes only to the
  token URL and the token only to the target: the agent follows no redirect.

A token endpoint that is down, slow or answers garbage fails the attempt like a
receiver that is down would: the batch waits with back-off (``appliance.webhooks.posting``).
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from appliance.config import WebhookConfig
from appliance.webhooks.http import BytesProducer, describe_failure, read_prefix

Header = tuple[bytes, bytes]

# An access token is a b64token (RFC 6750 §2.1): nothing that could end a header.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# A token endpoint's answer is small; more than this is not one.
MAX_TOKEN_ANSWER = 64 * 1024
# A token is renewed this long before it expires (at most a tenth of its life),
# so a batch is not sent with a token that runs out on the way.
EXPIRY_MARGIN = 60.0


class Authorizer(Protocol):
    """The credentials a webhook sends with each batch."""

    kind: str

    def credentials(self) -> defer.Deferred:
        """Fires with the headers (a list of ``(name, value)``) for the next request."""

    def rejected(self) -> bool:
        """
        The receiver answered ``401`` to the last credentials: forget them. True when new
        credentials may be accepted at once (a token kept from before), so the batch is
        posted again without waiting.
        """


class NoAuth:
    kind = "none"

    def credentials(self) -> defer.Deferred:
        return defer.succeed([])

    def rejected(self) -> bool:
        return False


class TokenAuth:
    """SparkPost's own header: the token as given."""

    kind = "token"

    def __init__(self, token: str) -> None:
        self._headers = [(b"X-MessageSystems-Webhook-Token", token.encode("ascii"))]

    def credentials(self) -> defer.Deferred:
        return defer.succeed(list(self._headers))

    def rejected(self) -> bool:
        return False


def basic_authorization(username: str, password: str) -> bytes:
    """The ``Authorization`` value of HTTP Basic auth (RFC 7617, charset UTF-8)."""
    return b"Basic " + base64.b64encode(f"{username}:{password}".encode())


class BasicAuth:
    kind = "basic"

    def __init__(self, username: str, password: str) -> None:
        self._headers = [(b"Authorization", basic_authorization(username, password))]

    def credentials(self) -> defer.Deferred:
        return defer.succeed(list(self._headers))

    def rejected(self) -> bool:
        return False


class TokenError(Exception):
    """No usable access token; the message says why, for the log line of the failed attempt."""


def parse_token_answer(code: int, body: bytes, now: float) -> tuple[bytes, float | None]:
    """
    The access token of a token endpoint's answer and when to stop using it (None: until a
    ``401``); raises ``TokenError`` for anything else (RFC 6749 §5.1, §5.2).
    """
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeError):
        answer = None
    if code != 200:
        detail = ""
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            detail = answer["error"][:100]  # invalid_client, unauthorized_client, ...
        else:
            detail = body[:200].decode("utf-8", "replace").strip().replace("\n", " ")
        raise TokenError(f"HTTP {code}" + (f": {detail}" if detail else ""))
    if not isinstance(answer, dict):
        raise TokenError("the answer is not a JSON object")
    token = answer.get("access_token")
    if not isinstance(token, str) or not _B64TOKEN.fullmatch(token):
        raise TokenError("the answer has no usable access_token")
    token_type = answer.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenError(f"token_type is {token_type!r}, not Bearer")
    expires_in = answer.get("expires_in")
    if expires_in is None:
        return token.encode("ascii"), None
    try:
        seconds = float(expires_in)
    except (TypeError, ValueError):
        raise TokenError(f"expires_in is {expires_in!r}, not a number of seconds") from None
    if seconds != seconds:  # NaN
        raise TokenError("expires_in is not a number of seconds")
    return token.encode("ascii"), now + seconds - min(EXPIRY_MARGIN, max(seconds, 0.0) / 10)


class OAuth2ClientCredentials:
    """A bearer token from the client-credentials grant, kept until it expires or is refused."""

    kind = "oauth2"

    def __init__(self, token_url: str, client_id: str, client_secret: str, agent: IAgent,
                 clock: IReactorTime, timeout: float, user_agent: bytes = b"engage-appliance") -> None:
        self.token_url = token_url
        self._agent = agent
        self._clock = clock
        self._timeout = timeout
        self._user_agent = user_agent
        # RFC 6749 §2.3.1: id and secret are form-encoded before they are joined.
        self._client = basic_authorization(urllib.parse.quote_plus(client_id),
                                           urllib.parse.quote_plus(client_secret))
        self._token: bytes | None = None
        self._expires_at: float | None = None
        self._fresh = False  # the last credentials came from a fetch just made
        self.fetches = 0

    def credentials(self) -> defer.Deferred:
        if self._token is not None and (self._expires_at is None
                                        or self._clock.seconds() < self._expires_at):
            self._fresh = False
            return defer.succeed(self._bearer(self._token))
        self._token = None
        return self._fetch().addCallback(self._bearer)

    def rejected(self) -> bool:
        kept = self._token is not None and not self._fresh
        self._token = None
        return kept

    @staticmethod
    def _bearer(token: bytes) -> list[Header]:
        return [(b"Authorization", b"Bearer " + token)]

    def _fetch(self) -> defer.Deferred:
        self.fetches += 1
        headers = Headers({
            b"Content-Type": [b"application/x-www-form-urlencoded"],
            b"Accept": [b"application/json"],
            b"User-Agent": [self._user_agent],
            b"Authorization": [self._client],
        })
        d = self._agent.request(b"POST", self.token_url.encode("ascii"), headers,
                                BytesProducer(b"grant_type=client_credentials"))

        def answered(response: IResponse) -> defer.Deferred:
            return read_prefix(response, MAX_TOKEN_ANSWER).addCallback(
                lambda body: parse_token_answer(response.code, body, self._clock.seconds()))

        def got(result: tuple[bytes, float | None]) -> bytes:
            self._token, self._expires_at = result
            self._fresh = True
            return self._token

        def failed(failure: Failure) -> Failure:
            why = str(failure.value) if failure.check(TokenError) else describe_failure(failure)
            error = TokenError(f"no access token from {self.token_url}: {why}")
            return Failure(error)

        d.addCallback(answered)
        d.addTimeout(self._timeout, self._clock)
        return d.addCallbacks(got, failed)


def authorizer(config: WebhookConfig, agent: IAgent, clock: IReactorTime,
               user_agent: bytes = b"engage-appliance") -> Authorizer:
    """The ``Authorizer`` of ``config.auth_type``; the secrets are the builder's (``appliance.build``)."""
    if config.auth_type == "oauth2":
        return OAuth2ClientCredentials(config.auth_token_url, config.auth_client_id,
                                       config.auth_client_secret, agent, clock, config.timeout, user_agent)
    if config.auth_type == "basic":
        return BasicAuth(config.auth_username, config.auth_password)
    if config.auth_type == "token" or config.auth_token:
        return TokenAuth(config.auth_token)
    return NoAuth()
