"""
``GET /healthz``: whether the appliance can do its work, for load balancers and monitors.

Each part registers a check that says what is wrong with it, or nothing; the
answer is 200 when every check is quiet and 503 naming each that is not. It
needs no authentication: it says no more than a port scan would.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger
from twisted.web import resource, server

from appliance.admin.responses import error, results

log = Logger()

# A check answers what is wrong, or None when its part is up; it runs on the reactor thread.
Check = Callable[[], str | None]


class Health:
    """The named checks, in the order they were added."""

    def __init__(self) -> None:
        self._checks: list[tuple[str, Check]] = []

    def add(self, name: str, check: Check) -> None:
        self._checks.append((name, check))

    def problems(self) -> dict[str, str]:
        """What is wrong, by check name; empty when all is well. A check that raises is wrong."""
        found = {}
        for name, check in self._checks:
            try:
                problem = check()
            except Exception as e:
                log.failure("health check {name} failed", name=name)
                problem = f"the check failed: {e}"
            if problem:
                found[name] = problem
        return found

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._checks]


class HealthResource(resource.Resource):
    """``{"results": {"status": "ok", ...}}``, or a 503 whose message names what is down."""

    isLeaf = True

    def __init__(self, health: Health) -> None:
        super().__init__()
        self.health = health

    def render_GET(self, request: server.Request) -> bytes:
        problems = self.health.problems()
        if problems:
            return error(request, 503, "; ".join(f"{name}: {why}" for name, why in problems.items()))
        return results(request, {"status": "ok", "checks": self.health.names})
