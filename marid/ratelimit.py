"""The arithmetic of rate limiting (docs/api.md §20): fixed windows per key, in memory.

A limiter belongs to one server process ("per server instance"); api/ratelimit.py decides the
key of each request and answers 429.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field

from marid.config import RateLimitConfig

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Limiter:
    settings: RateLimitConfig
    api_prefix: str  # the path of the API base URL, e.g. "/api"
    window: int = -1  # the fixed window the counts belong to (time // settings.window)
    counts: dict[str, int] = field(default_factory=dict)
    proxies: tuple[Network, ...] = ()
    uncounted: frozenset[str] = frozenset()  # paths of GET /health and GET /metrics
    runner_paths: str = "/runner/"  # the runner protocol's, not limited (api/runner.py)

    def __post_init__(self) -> None:
        self.proxies = tuple(
            ipaddress.ip_network(entry, strict=False) for entry in self.settings.trusted_proxies
        )
        self.uncounted = frozenset(self.api_prefix + path for path in ("/health", "/metrics"))
        self.runner_paths = self.api_prefix + "/runner/"

    def take(self, key: str, limit: int, now: float) -> tuple[bool, int, int]:
        """Count one request for `key` unless it is over `limit`; returns (allowed, remaining
        after it, Unix time the window ends)."""
        used, reset = self._used(key, now)
        if used >= limit:
            return False, 0, reset
        self.counts[key] = used + 1
        return True, limit - used - 1, reset

    def peek(self, key: str, limit: int, now: float) -> tuple[bool, int, int]:
        """As `take` for a request that is not counted: always allowed, nothing counted."""
        used, reset = self._used(key, now)
        return True, max(0, limit - used), reset

    def begin_login(self, keys: tuple[str, ...], now: float) -> int | None:
        """Count a password check against each failed-login budget in `keys` before any
        hashing (issue 11 row 6); returns when the window ends if one is spent (nothing
        counted then), else None. Counting first bounds concurrent guesses too."""
        limit = self.settings.failed_logins
        used = [self._used(key, now) for key in keys]
        if any(count >= limit for count, _ in used):
            return max(reset for _, reset in used)
        for key, (count, _) in zip(keys, used, strict=True):
            self.counts[key] = count + 1
        return None

    def forgive_login(self, keys: tuple[str, ...]) -> None:
        """A right password: take back what `begin_login` counted, so only failures count."""
        for key in keys:
            if self.counts.get(key, 0) > 0:  # the window may have started again meanwhile
                self.counts[key] -= 1

    def client(self, peer: str, forwarded: str) -> str:
        """The client's address: the first X-Forwarded-For entry when the peer is a trusted
        proxy and the entry is an address, else the peer."""
        if forwarded and self.trusted(peer):
            first = forwarded.split(",")[0].strip()
            if address(first) is not None:
                return first
        return peer

    def _used(self, key: str, now: float) -> tuple[int, int]:
        """Requests counted for `key` in the window of `now`, and when that window ends."""
        length = self.settings.window
        window = int(now // length)
        if window != self.window:  # a new window: every count starts again
            self.window, self.counts = window, {}
        return self.counts.get(key, 0), math.ceil((window + 1) * length)

    def trusted(self, peer: str) -> bool:
        found = address(peer)
        return found is not None and any(found in network for network in self.proxies)


def address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
