"""Which addresses a node may have, checked where they are used.

A self-registered node's URL is checked when it registers (:func:`check_url`)
and again every time a connection is opened to it: :class:`GuardedResolver` is
the resolver of Ballast's client sessions, so a name that resolved to a public
address at registration and to ``127.0.0.1`` later (DNS rebinding) is refused at
connect time. Static nodes from the config file are the operator's own and are
not restricted.

Always refused: link-local addresses (the usual cloud metadata address
169.254.169.254 among them), the other metadata services of the major clouds
(IPv4 and IPv6), unspecified, multicast and broadcast addresses, and the
router's own listen address. Then, with ``registry.allowed_networks`` set, an
address must lie in one of those networks; without it, it must be a global
(public) address: no loopback, private, shared (CGNAT) or reserved ranges.
An IPv6 address that carries an IPv4 one (NAT64 ``64:ff9b::/96``, 6to4
``2002::/16``, Teredo ``2001::/32``, the IPv4-mapped, -translated and
-compatible forms) is judged by that IPv4 address, as a connection to it reaches
it; a local-use NAT64 address (``64:ff9b:1::/48``), whose IPv4 address only its
network knows, is refused.

Requests Ballast sends carry ``x-ballast-via`` (the ids of the routers they
passed); a router refuses a request that has already passed it, or too many
routers, with 508, so a node that points back at a router cannot make a loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from router.config import Config, url_problem

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata and platform services of the major clouds, outside link-local.
METADATA = tuple(
    ipaddress.ip_network(n)
    for n in (
        "fd00:ec2::254/128",  # AWS IMDS over IPv6
        "fd00:ec2::23/128",  # AWS time sync over IPv6
        "100.100.100.200/32",  # Alibaba Cloud
        "168.63.129.16/32",  # Azure WireServer
        "192.0.0.192/32",  # Oracle Cloud
        "fd20:ce::254/128",  # Google Cloud over IPv6
    )
)
# IPv6 ranges that carry an IPv4 address a connection really goes to (by NAT64,
# SIIT or the deprecated IPv4-compatible form); 6to4, Teredo and IPv4-mapped
# addresses are read by ``ipaddress`` itself.
CARRY_IPV4 = tuple(
    ipaddress.ip_network(n)
    for n in (
        "64:ff9b::/96",  # NAT64, well-known prefix (RFC 6052)
        "::ffff:0:0:0/96",  # IPv4-translated (RFC 2765)
        "::/96",  # IPv4-compatible (RFC 4291, deprecated); :: and ::1 are judged as such
    )
)
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215)
LOOPBACK6, UNSPECIFIED6 = ipaddress.IPv6Address("::1"), ipaddress.IPv6Address("::")
VIA_HEADER = "x-ballast-via"
MAX_HOPS = 4  # routers one request may pass


class AddressRules:
    """The rules for a self-registered node's addresses."""

    def __init__(self, allowed_networks: Iterable[str], own_port: int | None = None) -> None:
        self.allowed: list[IPNetwork] = [
            ipaddress.ip_network(c, strict=False) for c in allowed_networks
        ]
        self.own_port = own_port
        self.own_addresses: set[IPAddress] = set()

    @classmethod
    def of(cls, cfg: Config) -> AddressRules:
        """The rules of a router configuration, its own listen address learnt."""
        rules = cls(cfg.registry.allowed_networks, cfg.listen.port or None)
        rules.learn_own_addresses(cfg.listen.host)
        return rules

    def learn_own_addresses(self, host: str) -> None:
        """The addresses this router listens on (its host name's, for a wildcard)."""
        names = {host} if host not in ("", "0.0.0.0", "::") else {socket.gethostname()}
        for name in names:
            try:
                infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            except OSError:
                continue
            for info in infos:
                self.own_addresses.update(carried(ipaddress.ip_address(info[4][0])))

    def refused(self, addr: IPAddress, port: int) -> str | None:
        """Why a node may not be reached at ``addr``:``port``, or None. An IPv6
        address carrying IPv4 ones (NAT64, 6to4, Teredo, IPv4-mapped, -translated or
        -compatible) is judged by those, each by the same rules as any IPv4 address."""
        inner = carried(addr)
        if not inner:
            return "a local-use NAT64 address (the IPv4 address it reaches is unknown)"
        for one in inner:
            if (why := self._refused(one, port)) is not None:
                return why if one == addr else f"carries {one}, {why}"
        return None

    def _refused(self, addr: IPAddress, port: int) -> str | None:
        if addr.is_link_local or any(addr in net for net in METADATA):
            return "a link-local or cloud metadata address"
        if (
            addr.is_unspecified
            or addr.is_multicast
            or addr == ipaddress.IPv4Address("255.255.255.255")
        ):
            return "not a unicast address"
        if port == self.own_port and (addr.is_loopback or addr in self.own_addresses):
            return "this router's own address"
        if self.allowed:
            if any(addr in net for net in self.allowed):
                return None
            return "outside registry.allowed_networks"
        if not addr.is_global:
            return "not a public address (set registry.allowed_networks to allow it)"
        return None


def carried(addr: IPAddress) -> tuple[IPAddress, ...]:
    """The addresses ``addr`` is judged by: the IPv4 ones an IPv6 transition address
    carries (Teredo: its server and its client), else ``addr`` itself; none for a
    local-use NAT64 address, whose mapping only its network knows."""
    if isinstance(addr, ipaddress.IPv4Address) or addr in (LOOPBACK6, UNSPECIFIED6):
        return (addr,)
    if addr in NAT64_LOCAL:
        return ()
    if addr.ipv4_mapped is not None:
        return (addr.ipv4_mapped,)
    if addr.sixtofour is not None:
        return (addr.sixtofour,)
    if addr.teredo is not None:
        return addr.teredo
    if any(addr in net for net in CARRY_IPV4):
        return (ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF),)
    return (addr,)


async def check_url(url: str, rules: AddressRules) -> str | None:
    """Why ``url`` may not be registered, or None when it may."""
    if (problem := url_problem(url)) is not None:
        return f"url {problem}"
    parts = urlsplit(url)
    assert parts.hostname is not None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, port, type=socket.SOCK_STREAM
        )
    except OSError:
        return f"url host {parts.hostname[:64]!r} does not resolve"
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if (why := rules.refused(addr, port)) is not None:
            return f"url resolves to {addr}: {why}"
    return None


class GuardedResolver(AbstractResolver):
    """A resolver that drops addresses a node may not have, at every connection.

    Hosts of static nodes (``trusted``) resolve as usual. Addresses given as IP
    literals never reach a resolver; they are checked at registration."""

    def __init__(self, rules: AddressRules, trusted: Iterable[str]) -> None:
        self.rules = rules
        self.trusted = frozenset(h.lower() for h in trusted)
        self.inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        if host.lower() in self.trusted:
            return found
        allowed = [
            r for r in found if self.rules.refused(ipaddress.ip_address(r["host"]), port) is None
        ]
        if not allowed:
            raise OSError(f"{host[:64]} resolves only to addresses a node may not have")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


def via_refused(via: str, own_id: str) -> bool:
    """Whether a request with this ``x-ballast-via`` must not be routed (a loop)."""
    hops = via.split(",")
    return len(hops) >= MAX_HOPS or own_id in (h.strip() for h in hops)


def hosts_of(urls: Iterable[str]) -> list[str]:
    return [h for u in urls if (h := urlsplit(u).hostname)]
