"""
How the ``engage-appliance`` commands call the running appliance's admin API.

It reads ``[admin]`` from the configuration the appliance runs with, and the
token from ``admin.token_file`` (the commands run as the appliance's user, or
as one who may read that file), then makes one blocking HTTP request with
Basic authentication. Every failure is an ``AdminError`` whose message says
what to do: the listener is off, not reachable at its address, refused the
token, or answered with SparkPost's error shape.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from appliance.admin.token import USER, read_token
from appliance.config import AdminConfig


class AdminError(Exception):
    """The API could not be used, or answered with an error; ``status`` is its HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def base_url(endpoint: str) -> str:
    """
    The URL the commands reach a server endpoint description at.

    A listener on every address (no ``interface``) is reached on loopback.
    """
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", endpoint)]
    kind, args = parts[0], parts[1:]
    if kind not in ("tcp", "tcp6") or not args:
        raise AdminError(f"admin.endpoint {endpoint!r}: the commands reach tcp endpoints only")
    options = dict(a.split("=", 1) for a in args if "=" in a)
    positional = [a for a in args if "=" not in a]
    port = options.get("port") or (positional[0] if positional else "")
    host = options.get("interface") or (positional[2] if len(positional) > 2 else "")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class AdminClient:
    """One appliance's admin API; each call is one request."""

    def __init__(self, url: str, token: str, timeout: float = 30.0, token_file: str = "") -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token_file = token_file
        self._authorization = "Basic " + base64.b64encode(f"{USER}:{token}".encode()).decode("ascii")

    @classmethod
    def from_config(cls, admin: AdminConfig, timeout: float = 30.0) -> AdminClient:
        """The client of the listener ``admin`` describes, with the token of its file."""
        if not admin.endpoint:
            raise AdminError("the admin listener is off (admin.endpoint is empty); "
                             "set it to use this command")
        try:
            token = read_token(admin.token_file)
        except ValueError as e:
            raise AdminError(f"admin.token_file: {e}") from None
        return cls(base_url(admin.endpoint), token, timeout, admin.token_file)

    def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET ``path`` (``/api/v1/queue``) with ``params``; the parsed JSON answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return self._request("GET", path + query, None)

    def post(self, path: str, body: Any = None) -> Any:
        """POST ``body`` as JSON to ``path``; the parsed JSON answer."""
        data = json.dumps(body if body is not None else {}).encode()
        return self._request("POST", path, data)

    def _request(self, method: str, path: str, data: bytes | None) -> Any:
        url = self.url + path
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": self._authorization, "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                body = answer.read()
        except urllib.error.HTTPError as e:
            raise self._refused(e) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise AdminError(f"admin listener not reachable at {self.url}: {reason} "
                             "(is the appliance running? see admin.endpoint)") from None
        try:
            return json.loads(body)
        except ValueError:
            raise AdminError(f"{method} {url}: the answer is not JSON") from None

    def _refused(self, e: urllib.error.HTTPError) -> AdminError:
        if e.code == 401:
            where = f" in {self.token_file}" if self.token_file else ""
            return AdminError(f"the admin listener at {self.url} refused the token{where} "
                              "(admin.token_file must be the one the appliance runs with)", 401)
        try:
            messages = [err["message"] for err in json.loads(e.read())["errors"]]
        except (ValueError, KeyError, TypeError, OSError):
            messages = [f"HTTP {e.code} {e.reason}"]
        return AdminError("; ".join(messages), e.code)
