"""What the injector and the policy hook know of the client behind a transaction."""

from __future__ import annotations

import ipaddress

from appliance.config import ListenerConfig


class Session:
    """What the injector and the policy hook need to know of the client behind a transaction."""

    __slots__ = ("listener", "client_address", "helo", "tls", "auth_user")

    def __init__(self, listener: ListenerConfig, client_address: str, helo: str, tls: bool,
                 auth_user: str | None) -> None:
        self.listener = listener
        self.client_address = client_address
        self.helo = helo
        self.tls = tls
        self.auth_user = auth_user

    def may_relay(self) -> bool:
        if self.auth_user is not None:
            return True
        try:
            ip = ipaddress.ip_address(self.client_address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.listener.relay_networks)
