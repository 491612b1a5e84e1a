"""Every API module, in one list: each has `routes` (a RouteTableDef), `OPERATIONS` (its
OpenAPI operations) and optionally `SCHEMAS`. Add a module here to serve and document it.

MODULES serve under the API base URL (`server.api_url`); ROOT_MODULES under the server root
(`server.url`), like the OAuth pages of docs/api.md §16."""

from __future__ import annotations

from types import ModuleType

from marid.api import (
    apps,
    artifacts,
    builds,
    caches,
    crons,
    images,
    invites,
    jobs,
    namespaces,
    oauth,
    objects,
    root,
    runner,
    runners,
    sshkeys,
    tokens,
    users,
    variables,
    webhooks,
)

MODULES: tuple[ModuleType, ...] = (
    root,
    users,
    tokens,
    apps,
    namespaces,
    invites,
    variables,
    sshkeys,
    objects,
    images,
    builds,
    jobs,
    artifacts,
    caches,
    crons,
    webhooks,
    runner,
    runners,
)

ROOT_MODULES: tuple[ModuleType, ...] = (oauth,)
