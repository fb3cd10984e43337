"""
An example policy for engage-appliance (configure it with ``[policy]``).

The appliance calls ``policy`` once per recipient after DATA, before the
message is accepted. Set ``smtpapi_*`` variables in ``context`` to choose
that recipient's tracking settings; they beat the message's ``X-MSYS-API``
header, which beats the configuration. Return (or raise) ``Reject`` to refuse
the recipient. To consult something slow (a database, an HTTP service),
return a Deferred that fires with ``None`` or a ``Reject``; never block.

Arguments:
    envelope        PolicyEnvelope: mail_from, rcpt_to (this recipient),
                    recipients (all of them), transmission_id, listener, helo, tls
    client_address  the SMTP client's IP address, as a string
    auth_user       the authenticated user name, or None
    headers         the message headers (email.message.Message); read only
    context         dict of strings, empty on entry; the variables you may set:
                    smtpapi_open_tracking, smtpapi_click_tracking ("1"/"0"/"true"/"false"),
                    smtpapi_campaign_id, smtpapi_metadata (a JSON object),
                    smtpapi_tags (a JSON array of strings), smtpapi_open_tracking_scheme,
                    smtpapi_click_tracking_scheme ("http"/"https"),
                    smtpapi_tracking_domain ("host[:port]"),
                    smtpapi_tracking_link_expiry (seconds, or "30d"-style)
"""

from __future__ import annotations

import json
from email.message import Message
from typing import Any

from appliance.policy import PolicyEnvelope, Reject

# Recipients at these domains never get tracked copies (e.g. internal seed lists).
UNTRACKED_DOMAINS = {"internal.example"}


def policy(envelope: PolicyEnvelope, client_address: str, auth_user: str | None,
           headers: Message, context: dict[str, str]) -> Any:
    domain = envelope.rcpt_to.rpartition("@")[2].lower()
    if domain.endswith(".invalid"):
        return Reject(550, "5.7.1 We do not send to .invalid domains")
    if domain in UNTRACKED_DOMAINS:
        context["smtpapi_open_tracking"] = "0"
        context["smtpapi_click_tracking"] = "0"
        return None
    # Everything injected on the listener [smtp.listeners.newsletter] is tracked, and the
    # campaign is taken from the sender's own X-Campaign header when there is one.
    if envelope.listener == "newsletter":
        context["smtpapi_open_tracking"] = "1"
        context["smtpapi_click_tracking"] = "1"
        campaign = " ".join(str(headers.get("X-Campaign", "newsletter")).split())
        context["smtpapi_campaign_id"] = campaign.encode()[:64].decode("utf-8", "ignore")
    # Who injected it travels with every event of the copy.
    context["smtpapi_metadata"] = json.dumps({"injected_by": auth_user or client_address})
    return None
