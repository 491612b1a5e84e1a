"""Timestamps as docs/api.md §1.3 wants them: RFC 3339, UTC, `Z` suffix."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(value: datetime | None) -> str | None:
    """`2024-03-01T09:00:00Z` (microseconds only when non-zero); None stays None."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def now() -> datetime:
    return datetime.now(UTC)
