"""Every API module, in one list: each has `routes` (a RouteTableDef), `OPERATIONS` (its
OpenAPI operations) and optionally `SCHEMAS`. Add a module here to serve and document it."""

from __future__ import annotations

from types import ModuleType

from api import (
    artifacts,
    builds,
    images,
    invites,
    jobs,
    namespaces,
    objects,
    root,
    sshkeys,
    tokens,
    users,
    variables,
)

MODULES: tuple[ModuleType, ...] = (
    root,
    users,
    tokens,
    namespaces,
    invites,
    variables,
    sshkeys,
    objects,
    images,
    builds,
    jobs,
    artifacts,
)
