"""
The admin listener's site: ``/healthz`` for anyone, everything else behind HTTP Basic.

Authentication is Twisted's ``cred`` with ``guard``: user ``admin`` and the
token of ``admin.token_file`` as password, compared in constant time. A wrong
or missing password is a bare 401 that says nothing more. Behind it:

- ``/metrics``: Prometheus text;
- ``/api/v1/<name>``: the resources given in ``api`` (one entry each: queue,
  events, metrics, ...); more can be mounted later with ``AdminSite.mount``;
- ``/``: the dashboard resource when given, else a small page listing these.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from html import escape
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.cred import credentials, portal
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web import guard, resource, server
from zope.interface import implementer

from appliance.admin.health import Health, HealthResource
from appliance.admin.metrics import MetricsResource
from appliance.admin.responses import error
from appliance.admin.token import USER

REALM = "engage-appliance"


@implementer(ICredentialsChecker)
class TokenChecker:
    """User ``admin`` with the admin token; both compared in constant time."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

    def requestAvatarId(self, creds: Any) -> defer.Deferred:
        user = creds.username if isinstance(creds.username, bytes) else str(creds.username).encode()
        password = creds.password if isinstance(creds.password, bytes) else str(creds.password).encode()
        # Both compared whatever the first gave, so the time says nothing of which was wrong.
        right_user = hmac.compare_digest(user, USER.encode())
        right_password = hmac.compare_digest(password, self._token)
        if right_user and right_password:
            return defer.succeed(USER)
        return defer.fail(cred_error.UnauthorizedLogin())


@implementer(portal.IRealm)
class _Realm:
    def __init__(self, root: resource.IResource) -> None:
        self.root = root

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        if resource.IResource not in interfaces:
            raise NotImplementedError("the admin listener serves web resources only")
        return resource.IResource, self.root, lambda: None


class NotFound(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return error(request, 404, "no such resource")


class _Children(resource.Resource):
    """A node of the tree whose unknown children are JSON 404s."""

    def getChild(self, path: bytes, request: server.Request) -> resource.IResource:
        return NotFound()

    def render(self, request: server.Request) -> bytes:
        return error(request, 404, "no such resource")


def _leaves(node: resource.Resource, prefix: str = "") -> list[str]:
    """The mounted paths below ``node``, through the nodes ``_put`` made."""
    found = []
    for name in sorted(node.listNames()):
        if not name:
            continue  # the index itself
        child = node.children[name]
        path = prefix + name.decode("ascii", "replace")
        found.extend(_leaves(child, path + "/") if isinstance(child, _Children) else [path])
    return found


class Index(resource.Resource):
    """The page at ``/`` when there is no dashboard: what this listener serves."""

    isLeaf = True

    def __init__(self, api: resource.Resource) -> None:
        super().__init__()
        self.api = api

    def render_GET(self, request: server.Request) -> bytes:
        paths = ["/healthz", "/metrics"] + [f"/api/v1/{name}" for name in _leaves(self.api)]
        items = "".join(f'<li><a href="{escape(p)}">{escape(p)}</a></li>' for p in paths)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>engage-appliance</title>"
                f"</head><body><h1>engage-appliance</h1><ul>{items}</ul></body></html>").encode()


class _Protected(_Children):
    """Everything behind authentication."""

    def __init__(self, registry: CollectorRegistry, api: resource.Resource,
                 dashboard: resource.IResource | None) -> None:
        super().__init__()
        self.dashboard = dashboard
        self.putChild(b"metrics", MetricsResource(registry))
        versions = _Children()
        versions.putChild(b"v1", api)
        self.putChild(b"api", versions)
        index = Index(api)
        api.putChild(b"", index)  # /api/v1/: what is mounted, with or without a dashboard
        if dashboard is None:
            self.putChild(b"", index)

    def getChild(self, path: bytes, request: server.Request) -> resource.IResource:
        if self.dashboard is None:
            return NotFound()
        return self.dashboard.getChildWithDefault(path, request)


class _Root(resource.Resource):
    """``/healthz`` answered here; every other path goes through the guard."""

    def __init__(self, health: resource.IResource, guarded: resource.IResource) -> None:
        super().__init__()
        self.health = health
        self.guarded = guarded

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.IResource:
        if path == b"healthz":
            return self.health
        return self.guarded.getChildWithDefault(path, request)


class AdminSite(server.Site):
    """The admin listener's site; no access log (a scraper every few seconds would fill it)."""

    noisy = False

    def __init__(self, root: resource.IResource, api: resource.Resource, *,
                 reactor: IReactorTime | None = None) -> None:
        super().__init__(root, reactor=reactor)
        self.api = api
        self.displayTracebacks = False

    def mount(self, name: bytes, api_resource: resource.IResource) -> None:
        """Serve ``api_resource`` at ``/api/v1/<name>``."""
        self.api.putChild(name, api_resource)

    def log(self, request: Any) -> None:
        pass


def _put(node: resource.Resource, segments: list[bytes], child: resource.IResource) -> None:
    """Mount ``child`` at ``segments`` below ``node``, making the nodes between."""
    for segment in segments[:-1]:
        below = node.children.get(segment)
        if below is None:
            below = _Children()
            node.putChild(segment, below)
        node = below
    node.putChild(segments[-1], child)


def make_admin_site(token: str, health: Health, registry: CollectorRegistry,
                    api: Mapping[bytes, resource.IResource] | None = None,
                    dashboard: resource.IResource | None = None, *,
                    reactor: IReactorTime | None = None) -> AdminSite:
    """
    The admin site: ``token`` is user ``admin``'s password, ``health`` answers ``/healthz``,
    ``registry`` ``/metrics``; ``api`` maps names to the resources under ``/api/v1/``
    (a name may have several segments, as SparkPost's ``metrics/deliverability`` has).
    """
    api_root = _Children()
    for name, child in (api or {}).items():
        _put(api_root, name.split(b"/"), child)
    protected = _Protected(registry, api_root, dashboard)
    wrapper = guard.HTTPAuthSessionWrapper(
        portal.Portal(_Realm(protected), [TokenChecker(token)]),
        [guard.BasicCredentialFactory(REALM.encode())])
    return AdminSite(_Root(HealthResource(health), wrapper), api_root, reactor=reactor)
