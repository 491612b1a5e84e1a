"""Field-keyed validation errors and typed readers for JSON request bodies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ValidationError(Exception):
    """Rendered as 400 {"field": ["message", ...]}."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__(errors)
        self.errors = errors


class RequestError(Exception):
    """A request-level failure, rendered as {"message": ...} with `status` (400 by default)."""

    def __init__(
        self, message: str, status: int = 400, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers


class NotFound(Exception):
    """Rendered as 404 {"message": "Not Found"} (docs/api.md §1.6: never 401/403)."""


@dataclass
class Errors:
    by_field: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, message: str) -> None:
        self.by_field.setdefault(name, []).append(message)

    def has(self, name: str) -> bool:
        return name in self.by_field

    def raise_if_any(self) -> None:
        if self.by_field:
            raise ValidationError(self.by_field)


class Body:
    """A JSON object body whose typed readers record docs/api.md §1.2 type errors.

    Absent and null both mean "not given" and read as None.
    """

    def __init__(self, data: dict[str, Any], errors: Errors | None = None) -> None:
        self.data = data
        self.errors = errors if errors is not None else Errors()

    def string(self, key: str, label: str) -> str | None:
        value = self.data.get(key)
        if value is None or isinstance(value, str):
            return value
        self.errors.add(key, f"{label} must be a string")
        return None

    def boolean(self, key: str, label: str) -> bool | None:
        value = self.data.get(key)
        if value is None or isinstance(value, bool):
            return value
        self.errors.add(key, f"{label} must be a boolean")
        return None

    def strings(self, key: str, label: str) -> list[str] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        self.errors.add(key, f"{label} must be an array of strings")
        return None

    def required_string(self, key: str, label: str, message: str | None = None) -> str | None:
        """A string that must be present and non-empty; `message` overrides the default."""
        value = self.string(key, label)
        if value is None and self.errors.has(key):
            return None
        if not value:
            self.errors.add(key, message or f"{label} field required")
            return None
        return value
