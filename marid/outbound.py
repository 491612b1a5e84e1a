"""The outbound policy (docs/security.md §3): what marid's own requests may connect to.

Image downloads (api/downloads.py) and webhook deliveries (scheduler/hooks.py) reach public
addresses only, unless `outbound.allow` names the address, its network or the host name
(docs/configuration.md §1.3). The check is made on every connection, on the address actually
connected to: a literal host is read the way the C library reads it (`127.1`, `0x7f000001`,
`2130706433` and `017700000001` are all 127.0.0.1) and a name's DNS answers are checked one by
one, and only the addresses that pass are connected to.

This module does no HTTP (the domain does not import aiohttp, docs/architecture.md §2):
`Resolver` has the shape of aiohttp's resolver, and each process mixes in aiohttp's
`AbstractResolver` to hand it to its connector.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypedDict
from urllib.parse import SplitResult, urlsplit, urlunsplit

if TYPE_CHECKING:
    from marid.config import Config

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# What `webhooks.allow_loopback: true` adds to `outbound.allow` (the former switch).
LOOPBACK = ("127.0.0.0/8", "::1", "localhost")

# Refused unless allowed, first match wins: (reason, network). IPv6 outside 2000::/3 (global
# unicast) is refused as reserved when no line names it; IPv4 embedded in IPv6 (mapped, NAT64,
# 6to4) is judged as that IPv4 address.
_REFUSED: tuple[tuple[str, Network], ...] = tuple(
    (reason, ipaddress.ip_network(network))
    for reason, network in (
        ("unspecified", "0.0.0.0/8"),
        ("private", "10.0.0.0/8"),
        ("private", "100.64.0.0/10"),  # shared address space (carrier-grade NAT)
        ("loopback", "127.0.0.0/8"),
        ("link-local", "169.254.0.0/16"),  # cloud metadata services among them
        ("private", "172.16.0.0/12"),
        ("reserved", "192.0.0.0/24"),
        ("reserved", "192.0.2.0/24"),
        ("reserved", "192.88.99.0/24"),
        ("private", "192.168.0.0/16"),
        ("reserved", "198.18.0.0/15"),
        ("reserved", "198.51.100.0/24"),
        ("reserved", "203.0.113.0/24"),
        ("multicast", "224.0.0.0/4"),
        ("reserved", "240.0.0.0/4"),  # 255.255.255.255 among them
        ("unspecified", "::/128"),
        ("loopback", "::1/128"),
        ("reserved", "2001::/23"),  # Teredo and other protocol assignments
        ("reserved", "2001:db8::/32"),
        ("reserved", "3fff::/20"),
        ("unique-local", "fc00::/7"),
        ("link-local", "fe80::/10"),
        ("multicast", "ff00::/8"),
    )
)
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(Exception):
    """A host or address the policy does not let marid connect to."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(host, reason)
        self.host = host
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.host} is refused by policy ({self.reason}); see outbound.allow"


def parse_host(host: str) -> Address | None:
    """The address a URL host stands for when it is numeric, None for a name.

    IPv4 is read as the C library's inet_aton reads it: one to four parts separated by dots,
    each decimal, octal (a leading 0) or hexadecimal (0x), the last filling the bytes left
    (`127.1`, `0x7f.0.0.1`, `2130706433`). IPv6 may have brackets and a zone (`%eth0`, left out).
    A trailing dot is ignored, so `127.0.0.1.` is 127.0.0.1 too.
    """
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.partition("%")[0])
        except ValueError:
            return None
    parts = text.removesuffix(".").split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_inet_aton_part(part) for part in parts]
    if any(n is None for n in numbers):
        return None
    *leading, last = [n for n in numbers if n is not None]
    if any(n > 0xFF for n in leading) or last >= 1 << (8 * (4 - len(leading))):
        return None
    value = last
    for index, number in enumerate(leading):
        value |= number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _inet_aton_part(part: str) -> int | None:
    """One dotted part as inet_aton reads it: 0x.. hexadecimal, 0.. octal, else decimal; None
    when it is none of them."""
    if not part.isascii():
        return None
    lowered = part.lower()
    if lowered.startswith("0x"):
        digits, base = lowered[2:], 16
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    try:
        return int(digits, base) if digits.isalnum() else None
    except ValueError:
        return None


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries and reaches: IPv4-mapped (::ffff:a.b.c.d),
    NAT64 (64:ff9b::a.b.c.d) or 6to4 (2002:aabb:ccdd::); None otherwise."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def classify(address: Address) -> str | None:
    """Why `address` is refused by default (`loopback`, `private`, `link-local`,
    `unique-local`, `unspecified`, `multicast` or `reserved`); None for a public address."""
    inner = embedded_ipv4(address)
    if inner is not None:
        return classify(inner)
    for reason, network in _REFUSED:
        if address.version == network.version and address in network:
            return reason
    if address.version == 6 and address not in _GLOBAL_UNICAST:
        return "reserved"
    return None


def _is_localhost(name: str) -> bool:
    """`localhost` and the names under it, which always mean this machine (RFC 6761)."""
    return name == "localhost" or name.endswith(".localhost")


def _name(host: str) -> str:
    return host.lower().removesuffix(".")


class Policy:
    """What may be connected to: public addresses, and what `allow` lists (IP addresses,
    networks or host names)."""

    def __init__(self, allow: Iterable[str] = (), allow_loopback: bool = False) -> None:
        """`allow_loopback` is the legacy `webhooks.allow_loopback`: it adds LOOPBACK."""
        self.networks: list[Network] = []
        self.names: set[str] = set()
        for entry in [*allow, *(LOOPBACK if allow_loopback else ())]:
            literal = parse_host(entry)
            if literal is not None:  # any spelling of one address
                self.networks.append(ipaddress.ip_network(literal))
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(_name(entry))

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(config.outbound.allow, config.webhooks.allow_loopback)

    def allows_name(self, host: str) -> bool:
        """The host name is listed: it may be connected to, whatever it resolves to."""
        return _name(host) in self.names

    def refusal(self, address: Address) -> str | None:
        """Why `address` may not be connected to; None when it may."""
        inner = embedded_ipv4(address)
        if any(a.version == n.version and a in n
               for n in self.networks for a in (address, inner) if a is not None):  # fmt: skip
            return None
        return classify(address)

    def check_host(self, host: str) -> str:
        """A URL's host before connecting: a literal address in canonical form (`127.1` ->
        `127.0.0.1`), a name unchanged; raises Refused for a literal the policy refuses, and
        for `localhost` unless its name or a loopback address is allowed. Other names are
        checked when they are resolved (Resolver, addresses)."""
        address = parse_host(host)
        if address is not None:
            reason = self.refusal(address)
            if reason is not None:
                raise Refused(str(address), reason)
            return str(address)
        if _is_localhost(_name(host)) and not self.allows_name(host):
            loopback = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))
            if all(self.refusal(address) for address in loopback):
                raise Refused(host, "loopback")
        return host

    def checked_url(self, url: str) -> str:
        """`url` with its host checked by `check_host` and written canonically; raises Refused,
        or ValueError for a URL without a host or with an invalid port."""
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"no host in URL {parts.scheme}://{parts.netloc}")
        host = self.check_host(parts.hostname)
        return url if host == parts.hostname else _with_host(parts, host)

    async def addresses(
        self, host: str, port: int = 0, family: int = socket.AF_UNSPEC
    ) -> list[str]:
        """The addresses of `host` that may be connected to, in the resolver's order (a literal
        is not looked up); raises Refused when there is none, OSError when DNS fails."""
        literal = parse_host(host)
        if literal is not None:
            return [self.check_host(host)]
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, family=family, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG
        )
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if self.allows_name(host):
            return found
        reasons = [self.refusal(ipaddress.ip_address(a.partition("%")[0])) for a in found]
        allowed = [a for a, reason in zip(found, reasons, strict=True) if reason is None]
        if not allowed:
            raise Refused(host, next((r for r in reasons if r), "no address"))
        return allowed


def _with_host(parts: SplitResult, host: str) -> str:
    userinfo, at, _ = parts.netloc.rpartition("@")
    shown = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{shown}{port}"))


class ResolveResult(TypedDict):
    """aiohttp's ResolveResult (aiohttp.abc), field for field."""

    hostname: str
    host: str
    port: int
    family: int
    proto: int
    flags: int


class Resolver:
    """An aiohttp resolver that returns only the addresses the policy allows, so the
    connector connects to nothing else: give `class R(Resolver, AbstractResolver)` to
    `aiohttp.TCPConnector(resolver=...)`. aiohttp connects to literal IP hosts without asking
    its resolver: check a URL's host with `Policy.checked_url` before each request."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.policy.addresses(host, port, family)
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            }
            for address in found
        ]

    async def close(self) -> None:
        return None
