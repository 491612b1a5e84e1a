"""The scope model of docs/api.md §2 and docs/api.md §2.1: parse, format and check."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

# Canonical order (docs/api.md §2.1, EXT §0.1: token and app follow webhook; runner, for the
# administrators of docs/api.md §28, comes last).
RESOURCES = (
    "build",
    "invite",
    "image",
    "namespace",
    "object",
    "variable",
    "key",
    "cron",
    "webhook",
    "token",
    "app",
    "runner",
)
PERMISSIONS = ("read", "write", "delete")


class ScopeError(ValueError):
    """A scope string that does not parse; str() is the docs/api.md §2.2 error text."""


@dataclass(frozen=True)
class Scope:
    grants: frozenset[tuple[str, str]]

    def has(self, resource: str, permission: str) -> bool:
        return (resource, permission) in self.grants

    def covers(self, other: Scope) -> bool:
        """True when every permission of `other` is held by this scope."""
        return other.grants <= self.grants

    def __str__(self) -> str:
        items = []
        for resource in RESOURCES:
            perms = [p for p in PERMISSIONS if (resource, p) in self.grants]
            if perms:
                items.append(f"{resource}:{','.join(perms)}")
        return " ".join(items)


FULL = Scope(frozenset((r, p) for r in RESOURCES for p in PERMISSIONS))
EMPTY = Scope(frozenset())


@lru_cache(maxsize=1024)
def parse(text: str) -> Scope:
    """Parse a scope string (docs/api.md §2.2); raises ScopeError."""
    grants: set[tuple[str, str]] = set()
    for item in text.split():
        resource, colon, perms = item.partition(":")
        if not colon or not perms:
            raise ScopeError(f"invalid scope item: {item}")
        if resource not in RESOURCES:
            raise ScopeError(f"unknown resource: {resource}")
        for perm in perms.split(","):
            if perm not in PERMISSIONS:
                raise ScopeError(f"unknown permission: {perm}")
            grants.add((resource, perm))
    return Scope(frozenset(grants))


def canonical(text: str) -> str:
    """The canonical form of a scope string; raises ScopeError."""
    return str(parse(text))
