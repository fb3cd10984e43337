"""Policy hooks that the integration tests name in their configurations (``tests.policies:...``)."""

from __future__ import annotations

from email.message import Message
from typing import Any

from twisted.internet import defer

from appliance.policy import PolicyEnvelope, Reject

calls: list[tuple[PolicyEnvelope, str, str | None, str]] = []
held: list[defer.Deferred] = []  # decisions the test makes (``per_recipient``, ``hold``)


def per_recipient(envelope: PolicyEnvelope, client_address: str, auth_user: str | None,
                  headers: Message, context: dict[str, str]) -> Any:
    """
    Rejects no@, turns click tracking off for plain@, answers the others later: when the
    test fires their Deferreds in ``held``.
    """
    calls.append((envelope, client_address, auth_user, str(headers.get("Subject"))))
    local = envelope.rcpt_to.partition("@")[0].lower()
    if local == "no":
        raise Reject(550, "5.7.1 Not this one")
    if local == "plain":
        context["smtpapi_click_tracking"] = "0"
        return None
    d: defer.Deferred = defer.Deferred()

    def decide(_: object) -> None:
        context["smtpapi_campaign_id"] = "from-policy"
        context["smtpapi_tags"] = '["policy"]'

    held.append(d.addCallback(decide))
    return d


def reject_all(envelope: PolicyEnvelope, client_address: str, auth_user: str | None,
               headers: Message, context: dict[str, str]) -> Reject:
    return Reject(554, "Go away")


def broken(envelope: PolicyEnvelope, client_address: str, auth_user: str | None,
           headers: Message, context: dict[str, str]) -> None:
    if envelope.rcpt_to.startswith("b"):
        raise RuntimeError("the policy database is down")


deciding: list[str] = []  # transmission ids ``hold`` was asked about


def hold(envelope: PolicyEnvelope, client_address: str, auth_user: str | None,
         headers: Message, context: dict[str, str]) -> defer.Deferred:
    """Decides when the test fires its Deferred in ``held`` (no clock: for memory-reactor tests)."""
    deciding.append(envelope.transmission_id)
    d: defer.Deferred = defer.Deferred()
    held.append(d)
    return d
