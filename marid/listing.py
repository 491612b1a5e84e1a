"""Which namespaced resources (variables, keys, objects, images) a listing covers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Listing:
    """Set exactly one field. Builds have a richer one of their own (marid/builds.py)."""

    visible_to: int | None = None  # "my" resources of docs/api.md §3.3 for this user id
    namespace_id: int | None = None  # resources in this exact namespace (§8.8)
