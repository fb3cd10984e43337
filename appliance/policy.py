"""
The policy hook: the appliance's counterpart of Momentum's per-recipient Lua policy.

An operator names a Python callable in the configuration
(``policy.hook = "package.module:function"``). After DATA it is called once
per recipient as ``hook(envelope, client_address, auth_user, headers,
context)`` and may set ``smtpapi_*`` variables in ``context`` (SPEC §4),
reject the recipient (return or raise ``Reject``), or return a Deferred that
does either later.

A hook that fails, times out, returns something else or sets a variable to a
bad value is a configuration problem, not the sender's: the message is
answered ``451 4.3.5`` so the client retries, and the problem is logged
(Postfix treats a broken policy service the same way).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.settings import ContextSettings, PolicyValueError, parse_context

log = Logger()

Hook = Callable[..., Any]

TEMPORARY_FAILURE = (451, "4.3.5 Policy not available, try again later")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}( |$)")


class PolicyError(Exception):
    """The configured hook cannot be loaded."""


class Reject(Exception):  # noqa: N818 - it is what a policy says, not an error
    """
    Refuse one recipient: ``return Reject(550, "5.7.1 Not allowed")`` or raise it.

    ``code`` must be a 4xx or 5xx reply code; ``text`` one line of printable
    ASCII. Without an enhanced status code the text gets ``X.7.1``.
    """

    def __init__(self, code: int = 550, text: str = "") -> None:
        if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 599:
            raise ValueError(f"a policy rejection needs a 4xx or 5xx code, not {code!r}")
        if not isinstance(text, str) or not re.fullmatch(r"[ -~]{0,400}", text):
            raise ValueError("a policy rejection text must be one line of printable ASCII "
                             "(at most 400 characters)")
        text = text.strip() or "Rejected by policy"
        if not _ENHANCED.match(text):
            text = f"{code // 100}.7.1 {text}"
        super().__init__(code, text)
        self.code = code
        self.text = text


@dataclass(frozen=True)
class PolicyEnvelope:
    """What the hook learns of the transaction, for the recipient it is asked about."""

    mail_from: str
    rcpt_to: str
    recipients: tuple[str, ...]
    transmission_id: str
    listener: str
    helo: str
    tls: bool


@dataclass(frozen=True)
class Verdict:
    """The policy's answer for one recipient: accepted with its settings, or a reply code."""

    code: int = 250
    text: str = ""
    context: ContextSettings = ContextSettings()

    @property
    def accepted(self) -> bool:
        return self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


ACCEPT = Verdict()


def load_hook(spec: str, path: Sequence[str] = ()) -> Hook | None:
    """The callable ``spec`` names, importing its module; ``None`` when no hook is configured."""
    if not spec:
        return None
    module_name, _, attribute = spec.partition(":")
    for directory in reversed(path):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise PolicyError(f"policy.hook: cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    hook = getattr(module, attribute, None)
    if not callable(hook):
        raise PolicyError(f"policy.hook: {module_name!r} has no function {attribute!r}")
    return hook


class Policy:
    """Calls the hook for each recipient and turns whatever it does into a ``Verdict``."""

    def __init__(self, hook: Hook | None, timeout: float, clock: IReactorTime,
                 max_metadata_len: int) -> None:
        self.hook = hook
        self.timeout = timeout
        self.clock = clock
        self.max_metadata_len = max_metadata_len

    def check(self, envelope: PolicyEnvelope, client_address: str, auth_user: str | None,
              headers: Message) -> defer.Deferred:
        """Fires with the recipient's ``Verdict``; never errbacks."""
        if self.hook is None:
            return defer.succeed(ACCEPT)
        context: dict[str, str] = {}
        d = defer.maybeDeferred(self.hook, envelope, client_address, auth_user, headers, context)
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(envelope, context),
                       errbackArgs=(envelope,))
        return d

    def check_all(self, envelopes: list[PolicyEnvelope], client_address: str,
                  auth_user: str | None, headers: Message) -> defer.Deferred:
        """Every recipient's ``Verdict``, in order; the hook calls run concurrently."""
        return defer.gatherResults([self.check(e, client_address, auth_user, headers)
                                    for e in envelopes])

    def _answered(self, result: Any, envelope: PolicyEnvelope, context: dict[str, Any]) -> Verdict:
        if isinstance(result, Reject):
            return Verdict(result.code, result.text)
        if result is not None:
            log.error("policy hook returned {result!r} for {rcpt}; expected None or Reject",
                      result=result, rcpt=envelope.rcpt_to)
            return Verdict(*TEMPORARY_FAILURE)
        try:
            return Verdict(context=parse_context(context, self.max_metadata_len))
        except PolicyValueError as e:
            log.error("policy hook set a bad value for {rcpt}: {problem}", rcpt=envelope.rcpt_to,
                      problem=str(e))
            return Verdict(*TEMPORARY_FAILURE)

    @staticmethod
    def _failed(failure: Failure, envelope: PolicyEnvelope) -> Verdict:
        if failure.check(Reject):
            return Verdict(failure.value.code, failure.value.text)
        if failure.check(defer.TimeoutError, defer.CancelledError):
            log.error("policy hook timed out for {rcpt}", rcpt=envelope.rcpt_to)
        else:
            log.failure("policy hook failed for {rcpt}", failure, rcpt=envelope.rcpt_to)
        return Verdict(*TEMPORARY_FAILURE)
