"""
The ESMTP injection server.

- ``server``: one session, the command dialogue on top of Twisted's ``ESMTP``.
- ``twisted_server``: the only code that touches ``ESMTP``'s internals.
- ``data``: the DATA reader (message text read whole, checked as it comes).
- ``envelope``: MAIL, RCPT and the commands around them, and which addresses and parameters are taken.
- ``auth``: AUTH PLAIN and LOGIN, and the decisions of the exchange.
- ``guard``: the rate of password checks and each address's back-off after failed logins.
- ``hold``: input held while a reply is being decided.
- ``drain``: connection limits and the drain of sessions at a stop.
- ``listener``: the factory of one configured listener.
- ``session``: what the injector knows of the client.
"""

from appliance.smtp.auth import AuthExchange, SessionAuth
from appliance.smtp.data import MAX_LINE, DataReader
from appliance.smtp.drain import ConnectionBudget, ConnectionLimits, SessionDrain
from appliance.smtp.guard import AuthGuard
from appliance.smtp.listener import InjectionFactory, listener_factory
from appliance.smtp.server import MAX_COMMAND_LINE, InjectionESMTP
from appliance.smtp.session import Session

__all__ = [
    "MAX_COMMAND_LINE",
    "MAX_LINE",
    "AuthExchange",
    "AuthGuard",
    "ConnectionBudget",
    "ConnectionLimits",
    "DataReader",
    "InjectionESMTP",
    "InjectionFactory",
    "Session",
    "SessionAuth",
    "SessionDrain",
    "listener_factory",
]
