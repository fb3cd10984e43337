"""
Where a recipient domain's mail goes: a static route, the smarthost, or the DNS.

``Router.destination`` decides, from the configuration alone, which
*destination* a domain belongs to: copies for one destination share
connections and a concurrency limit. ``HopFinder.hops`` then turns a
destination into the ordered list of addresses to try, asking the DNS (MX,
then AAAA/A) where no route says otherwise. The ordering rules are plain
functions, so they are tested without a resolver.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dns_error

from appliance.config import DeliveryConfig, Route
from appliance.delivery.outcome import Outcome, internal
from appliance.reactors import Reactor

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def domain_problem(domain: str) -> str | None:
    """
    Why mail for ``domain`` can never be delivered, or ``None`` if it may be.

    Only what no DNS answer could change is refused here: a name that is not
    a host name, an address literal, or a name under ``.invalid``, which
    RFC 6761 reserves never to resolve. Everything else is asked of the DNS.
    """
    name = domain.lower().rstrip(".")
    if not name:
        return "the recipient address has no domain"
    if name.startswith("["):
        return f"address literals are not delivered to: {domain}"
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return f"not a valid domain name: {domain}"
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return f"not a valid domain name: {domain}"
    if name == "invalid" or name.endswith(".invalid"):
        return f"the domain {domain} is reserved never to exist (RFC 6761)"
    return None


@dataclass(frozen=True)
class Destination:
    """
    What copies that travel together have in common.

    ``key`` names the queue: the route's or smarthost's address, or the
    recipient domain when the DNS decides. ``route`` is ``None`` for the DNS.
    """

    key: str
    domain: str  # the DNS name to look up when ``route`` is None
    route: Route | None = None
    smarthost: bool = False


class Router:
    """The configuration's part of routing: routes (exact, then ``*.domain``), smarthost, DNS."""

    def __init__(self, config: DeliveryConfig) -> None:
        self.routes = config.routes
        self.smarthost = config.smarthost

    def static_route(self, domain: str) -> Route | None:
        """The route ``delivery.routes`` gives ``domain``: exact, else the closest ``*.parent``."""
        domain = domain.lower().rstrip(".")
        if domain in self.routes:
            return self.routes[domain]
        parts = domain.split(".")
        for i in range(1, len(parts)):
            wildcard = "*." + ".".join(parts[i:])
            if wildcard in self.routes:
                return self.routes[wildcard]
        return None

    def route(self, domain: str) -> Route | None:
        """The static route or smarthost for ``domain``; ``None`` means the DNS decides."""
        return self.static_route(domain) or self.smarthost

    def undeliverable(self, domain: str) -> str | None:
        """Why no route, smarthost or DNS answer could ever deliver to ``domain``."""
        if self.route(domain) is not None:
            return None  # the operator routed it: their call
        return domain_problem(domain)

    def destination(self, domain: str) -> Destination:
        domain = domain.lower().rstrip(".")
        route = self.static_route(domain)
        if route is not None:
            return Destination(key=f"route {route.host}:{route.port}", domain=route.host, route=route)
        if self.smarthost is not None:
            host = self.smarthost
            return Destination(key=f"smarthost {host.host}:{host.port}", domain=host.host,
                               route=host, smarthost=True)
        return Destination(key=domain, domain=domain)


@dataclass(frozen=True)
class Hop:
    """One address to try: ``name`` is the host's name (for TLS and messages), ``address`` its IP."""

    name: str
    address: str
    port: int = 25

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        label = f"{self.name}[{self.address}]" if self.name != self.address else host
        return f"{label}:{self.port}" if self.port != 25 else label


class NoHops(Exception):
    """The destination cannot be tried now (``outcome`` delays) or ever (it bounces)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.raw_reason)
        self.outcome = outcome


def order_mx(records: Sequence[tuple[int, str]], rng: random.Random) -> list[str]:
    """MX host names by preference, equal preferences shuffled (RFC 5321 §5.1)."""
    by_preference: dict[int, list[str]] = {}
    for preference, name in records:
        by_preference.setdefault(preference, []).append(name)
    ordered: list[str] = []
    for preference in sorted(by_preference):
        names = by_preference[preference]
        rng.shuffle(names)
        ordered += [n for n in names if n not in ordered]
    return ordered


def order_addresses(v6: list[str], v4: list[str], preference: str, rng: random.Random) -> list[str]:
    """One host's addresses in the order ``delivery.address_preference`` asks for."""
    if preference == "ipv4":
        return v4 + v6
    if preference == "ipv6":
        return v6 + v4
    first, second = (v6, v4) if rng.random() < 0.5 else (v4, v6)
    return first + second


def is_null_mx(name: str) -> bool:
    return name in ("", ".")


def _payloads(answers: Any, record_type: int) -> list[Any]:
    """The payloads of one record type, skipping the CNAMEs a resolver hands back as well."""
    return [rr.payload for rr in answers if rr.type == record_type]


def _is_temporary(exc: BaseException) -> bool:
    """SERVFAIL, REFUSED, timeouts: ask again later. NXDOMAIN and NODATA are answers."""
    return not isinstance(exc, dns_error.DomainError) or isinstance(
        exc, dns_error.DNSServerError | dns_error.DNSQueryRefusedError | dns_error.DNSUnknownError
        | dns_error.DNSFormatError | dns_error.DNSNotImplementedError)


class HopFinder:
    """Turns a destination into the addresses to try, in order, using an injected resolver."""

    def __init__(self, config: DeliveryConfig, resolver: Any = None, rng: random.Random | None = None,
                 mx_port: int = 25, reactor: Reactor | None = None) -> None:
        """Without a ``resolver``, the system's is made on ``reactor``, which must then be given."""
        if resolver is None and reactor is None:
            raise TypeError("HopFinder needs a resolver, or a reactor to make the system's on")
        self._resolver = resolver
        self._reactor = reactor
        self.mx_port = mx_port  # SMTP's port; tests move it off the privileged range
        self.dns_servers = config.dns_servers
        self.preference = config.address_preference
        self.limit = config.mx_address_limit
        self.rng = rng or random.Random()

    @property
    def resolver(self) -> Any:
        """The injected resolver, else the system's, made on first use (an IP route never needs it)."""
        if self._resolver is None:
            self._resolver = make_resolver(self.dns_servers, self._reactor)
        return self._resolver

    @defer.inlineCallbacks
    def hops(self, destination: Destination) -> Any:
        """Fires with a non-empty list of ``Hop``s, or fails with ``NoHops``."""
        route = destination.route
        if route is not None:
            addresses = yield self._host_addresses(route.host, required=True)
            return [Hop(route.host, a, route.port) for a in addresses][: self.limit]
        domain = destination.domain
        names = yield self._mx_names(domain)
        if names is None:  # no MX at all: the domain is its own (implicit) MX
            addresses = yield self._host_addresses(domain, required=True)
            return [Hop(domain, a, self.mx_port) for a in addresses][: self.limit]
        hops: list[Hop] = []
        results = yield defer.gatherResults(
            [self._host_addresses(n, required=False) for n in names], consumeErrors=True)
        for name, addresses in zip(names, results, strict=True):
            hops += [Hop(name, a, self.mx_port) for a in addresses]
        if not hops:
            raise NoHops(internal(451, "4.4.4", f"no address found for any MX host of {domain} "
                                  f"({', '.join(names)})"))
        return hops[: self.limit]

    @defer.inlineCallbacks
    def _mx_names(self, domain: str) -> Any:
        """The MX host names in order, ``None`` if the domain has no MX records."""
        try:
            answers, _authority, _additional = yield self.resolver.lookupMailExchange(domain)
        except Exception as e:
            if isinstance(e, dns_error.DNSNameError):
                raise NoHops(internal(550, "5.1.2", f"the domain {domain} does not exist "
                                      "(DNS: no such domain)")) from None
            if _is_temporary(e):
                raise NoHops(internal(451, "4.4.3", f"DNS lookup of MX for {domain} failed: "
                                      f"{_dns_error_text(e)}")) from None
            return None  # NODATA: no MX records
        records = [(mx.preference, str(mx.name).rstrip(".").lower())
                   for mx in _payloads(answers, dns.MX)]
        if not records:
            return None
        real = [(p, n) for p, n in records if not is_null_mx(n)]
        if not real:
            raise NoHops(internal(556, "5.1.10", f"the domain {domain} accepts no mail "
                                  "(null MX, RFC 7505)"))
        return order_mx(real, self.rng)

    @defer.inlineCallbacks
    def _host_addresses(self, host: str, required: bool) -> Any:
        """A host's addresses; an IP literal is its own. Fails with ``NoHops`` only if ``required``."""
        try:
            return [ipaddress.ip_address(host).compressed]
        except ValueError:
            pass
        v6_lookup = self.resolver.lookupIPV6Address(host)
        v4_lookup = self.resolver.lookupAddress(host)
        (ok6, r6), (ok4, r4) = yield defer.DeferredList([v6_lookup, v4_lookup], consumeErrors=True)
        v6 = [socket.inet_ntop(socket.AF_INET6, p.address) for p in _payloads(r6[0], dns.AAAA)] if ok6 else []
        v4 = [p.dottedQuad() for p in _payloads(r4[0], dns.A)] if ok4 else []
        addresses = order_addresses(v6, v4, self.preference, self.rng)
        if addresses or not required:
            return addresses
        errors = [r.value for ok, r in ((ok6, r6), (ok4, r4)) if not ok]
        if any(isinstance(e, dns_error.DNSNameError) for e in errors):
            raise NoHops(internal(550, "5.1.2", f"the host {host} does not exist (DNS: no such domain)"))
        temporary = [e for e in errors if _is_temporary(e)]
        if temporary:
            raise NoHops(internal(451, "4.4.3", f"DNS lookup of the address of {host} failed: "
                                  f"{_dns_error_text(temporary[0])}"))
        raise NoHops(internal(550, "5.4.4", f"the host {host} has no address (no MX, A or AAAA record)"))


def _dns_error_text(e: BaseException) -> str:
    names = {
        dns_error.DNSServerError: "server failure (SERVFAIL)",
        dns_error.DNSQueryRefusedError: "query refused",
        dns_error.DNSQueryTimeoutError: "no answer in time",
        dns_error.DNSFormatError: "format error",
        dns_error.DNSNotImplementedError: "not implemented",
        dns_error.DNSUnknownError: "unknown error",
    }
    for cls, text in names.items():
        if isinstance(e, cls):
            return text
    if isinstance(e, defer.TimeoutError):
        return "no answer in time"
    return str(e) or type(e).__name__


def make_resolver(servers: Sequence[tuple[str, int]], reactor: Reactor) -> Any:
    """
    The resolver used outside tests: /etc/hosts, a cache, then the name servers.

    With ``servers`` empty, the name servers of /etc/resolv.conf are used (and
    the file re-read when it changes); otherwise exactly ``servers``.
    """
    from twisted.names import cache, client, hosts, resolve

    if servers:
        upstream = client.Resolver(servers=list(servers), reactor=reactor)
    else:
        upstream = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    return resolve.ResolverChain([hosts.Resolver(b"/etc/hosts"), cache.CacheResolver(reactor=reactor),
                                  upstream])
