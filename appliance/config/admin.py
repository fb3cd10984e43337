"""``[admin]``: the operators' HTTP listener (health, metrics, the API) and its token."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config.tables import Table


@dataclass(frozen=True)
class AdminConfig:
    # A Twisted endpoint description; "" runs no admin listener.
    endpoint: str = "tcp:8025:interface=127.0.0.1"
    # The password of user "admin"; created with a random token on the first start (mode 0600).
    token_file: str = "var/admin.token"


def read_admin(t: Table) -> AdminConfig:
    if t.data.get("endpoint") == "":
        t.known.add("endpoint")
        endpoint = ""
    else:
        endpoint = t.endpoint("endpoint", AdminConfig.endpoint)
    c = AdminConfig(endpoint=endpoint, token_file=t.path_("token_file", AdminConfig.token_file))
    t.finish()
    return c
