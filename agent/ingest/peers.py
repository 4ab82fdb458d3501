"""Which calling AE titles may store, and from which hosts (``[[scp.peers]]``).

A peer's host is an IP address or a host name. A name is resolved when first needed and again
after ``ttl_s`` (a PACS container's address changes when it is recreated), and at once (at most
every ``retry_s``) when a caller's address matches none of the addresses known for its AE title.
A name that does not resolve keeps its last known addresses, so a DNS outage does not lock out a
PACS that was calling a minute ago; a name never resolved matches nothing (fail closed).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterable

from agent.logging import get_logger

log = get_logger(__name__)

Resolver = Callable[[str], Iterable[str]]


def normal_address(host: str) -> str:
    """An address as the policy compares it: canonical text, IPv4-mapped IPv6 as IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve(name: str) -> list[str]:
    """Every address ``name`` resolves to (A and AAAA)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)]


class PeerPolicy:
    """Calling AE title -> the hosts it may call from."""

    def __init__(
        self, peers: dict[str, set[str]], resolver: Resolver = resolve, ttl_s: float = 60.0, retry_s: float = 5.0
    ) -> None:
        self._peers = {ae: frozenset(hosts) for ae, hosts in peers.items()}
        self._resolver = resolver
        self._ttl_s = ttl_s
        self._retry_s = retry_s
        self._resolved: dict[str, tuple[float, frozenset[str]]] = {}  # name -> (monotonic time, addresses)
        self._lock = threading.Lock()

    def allows(self, ae_title: str, address: str) -> bool:
        """Whether ``ae_title`` may call from ``address``."""
        hosts = self._peers.get(ae_title)
        return hosts is not None and self._matches(hosts, normal_address(address))

    def known(self, address: str) -> bool:
        """Whether any peer may call from ``address`` (the connection-level filter)."""
        return self._matches(frozenset().union(*self._peers.values()), normal_address(address))

    def _matches(self, hosts: frozenset[str], address: str) -> bool:
        if any(address in self._addresses(h) for h in hosts):
            return True
        return any(address in self._addresses(h, stale_after_s=self._retry_s) for h in hosts if not _is_address(h))

    def _addresses(self, host: str, stale_after_s: float | None = None) -> frozenset[str]:
        if _is_address(host):
            return frozenset({normal_address(host)})
        limit = self._ttl_s if stale_after_s is None else stale_after_s
        with self._lock:  # one lookup at a time: a burst of associations does not flood the resolver
            at, addresses = self._resolved.get(host, (float("-inf"), frozenset()))
            if time.monotonic() - at < limit:
                return addresses
            try:
                fresh = frozenset(normal_address(a) for a in self._resolver(host))
            except (OSError, UnicodeError) as exc:  # UnicodeError: a label getaddrinfo cannot encode
                log.warning("peer_host_unresolved", host=host, error=exc.__class__.__name__, kept=len(addresses))
                fresh = addresses
            self._resolved[host] = (time.monotonic(), fresh)
            return fresh
