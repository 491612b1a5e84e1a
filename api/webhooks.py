"""A namespace's webhooks (docs/api.md §10): owner or collaborator only, whatever the visibility."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from marid import namespaces, outbound, webhooks
from marid.api.auth import requires
from marid.api.http import Page, api_url, path_id, read_body
from marid.api.keys import CIPHER, CONFIG, POOL
from marid.api.namespaces import NS, NS_PARAMS, load_namespace
from marid.api.openapi import (
    BEARER,
    BOOL,
    INT,
    INVALID,
    NOT_FOUND,
    STRING,
    TIME,
    URL,
    Operations,
    json_response,
    list_of,
    nullable,
    obj,
    op,
    path_param,
    query_param,
    ref,
)
from marid.namespaces import Namespace
from marid.users import User
from marid.validation import NotFound
from marid.webhooks import Webhook, WebhookForm

routes = web.RouteTableDef()
HOOK = NS + r"/-/webhooks/{id:\d+}"


async def usable_namespace(conn: asyncpg.Connection, request: web.Request, user: User) -> Namespace:
    """The namespace of the URL if the caller owns or collaborates on it (§10.2)."""
    ns = await load_namespace(conn, request)
    if not (await namespaces.rights(conn, user, ns)).use:
        raise NotFound()
    return ns


async def usable_webhook(
    conn: asyncpg.Connection, request: web.Request, user: User
) -> tuple[Webhook, Namespace]:
    ns = await usable_namespace(conn, request, user)
    hook = await webhooks.get(conn, path_id(request))
    if hook is None or hook.namespace_id != ns.id:
        raise NotFound()
    return hook, ns


async def _shown(
    conn: asyncpg.Connection, request: web.Request, hook: Webhook, ns: Namespace
) -> web.Response:
    last = await webhooks.last_responses(conn, [hook.id])
    return web.json_response(webhooks.to_json(hook, ns, last.get(hook.id), api_url(request)))


@routes.get(NS + "/-/webhooks")
@requires("webhook:read")
async def list_webhooks(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        ns = await usable_namespace(conn, request, user)
        found = await webhooks.in_namespace(conn, ns.id)
        last = await webhooks.last_responses(conn, [hook.id for hook in found])
    base = api_url(request)
    return web.json_response([webhooks.to_json(h, ns, last.get(h.id), base) for h in found])


@routes.post(NS + "/-/webhooks")
@requires("webhook:write")
async def create_webhook(request: web.Request, user: User) -> web.Response:
    body = await read_body(request)
    policy = outbound.Policy.from_config(request.config_dict[CONFIG])
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        ns = await usable_namespace(conn, request, user)  # 404 before any field error
        form = WebhookForm.parse(body, policy, None)
        hook = await webhooks.create(conn, request.config_dict[CIPHER], user, ns, form)
    return web.json_response(webhooks.to_json(hook, ns, None, api_url(request)), status=201)


@routes.get(HOOK)
@requires("webhook:read")
async def show_webhook(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        hook, ns = await usable_webhook(conn, request, user)
        return await _shown(conn, request, hook, ns)


@routes.patch(HOOK)
@requires("webhook:write")
async def update_webhook(request: web.Request, user: User) -> web.Response:
    body = await read_body(request)
    policy = outbound.Policy.from_config(request.config_dict[CONFIG])
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        hook, ns = await usable_webhook(conn, request, user)
        form = WebhookForm.parse(body, policy, hook)
        hook = await webhooks.update(conn, request.config_dict[CIPHER], hook, form)
        return await _shown(conn, request, hook, ns)


@routes.delete(HOOK)
@requires("webhook:delete")
async def delete_webhook(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        hook, _ = await usable_webhook(conn, request, user)
        await webhooks.delete(conn, hook)
    return web.Response(status=204)


@routes.get(HOOK + "/deliveries")
@requires("webhook:read")
async def list_deliveries(request: web.Request, user: User) -> web.Response:
    """Every delivery attempt of the webhook, newest first, paginated (an extension)."""
    async with request.config_dict[POOL].acquire() as conn:
        hook, _ = await usable_webhook(conn, request, user)
        page = Page(request, await webhooks.count_attempts(conn, hook))
        found = await webhooks.attempts(conn, hook, page.offset, page.limit)
    return page.response([webhooks.attempt_json(attempt) for attempt in found])


EVENT_NAMES = {**STRING, "enum": list(webhooks.EVENTS)}
SCHEMAS = {
    "Webhook": obj(
        {
            "id": INT,
            "user_id": INT,
            "author_id": INT,
            "namespace_id": INT,
            "payload_url": URL,
            "ssl": BOOL,
            "active": BOOL,
            "events": {"type": "array", "items": EVENT_NAMES},
            "url": URL,
            "namespace": ref("Namespace"),
            "last_response": nullable(
                obj(
                    {
                        "code": nullable(INT),
                        "duration": {**INT, "description": "nanoseconds"},
                        "error": nullable(STRING),
                        "created_at": TIME,
                    }
                )
            ),
        }
    ),
    "WebhookDelivery": obj(
        {
            "id": INT,
            "delivery_id": {**INT, "description": "the event's delivery; retries share it"},
            "event": EVENT_NAMES,
            "attempt": {**INT, "description": "1 for the first attempt"},
            "code": nullable(INT),
            "duration": {**INT, "description": "nanoseconds"},
            "error": nullable(STRING),
            "created_at": TIME,
            "state": {**STRING, "enum": ["pending", "delivered", "failed"]},
        }
    ),
    "WebhookRequest": obj(
        {
            "payload_url": URL,
            "secret": STRING,
            "remove_secret": {**BOOL, "description": "PATCH only: clear the secret"},
            "ssl": BOOL,
            "active": BOOL,
            "events": {
                "type": "array",
                "items": EVENT_NAMES,
                "description": "absent or [] = every event",
            },
        },
        optional=("secret", "remove_secret", "ssl", "active", "events"),
    ),
}
PARAMS = [*NS_PARAMS, path_param("id", "webhook id")]
OPERATIONS: Operations = {
    ("get", "/n/{username}/{path}/-/webhooks"): op(
        "Webhooks of the namespace (webhook:read; owner or collaborator)",
        {"200": json_response("OK", list_of("Webhook")), **NOT_FOUND},
        security=BEARER,
        parameters=NS_PARAMS,
    ),
    ("post", "/n/{username}/{path}/-/webhooks"): op(
        "Create a webhook (webhook:write; owner or collaborator)",
        {"201": json_response("Created", ref("Webhook")), **INVALID, **NOT_FOUND},
        security=BEARER,
        parameters=NS_PARAMS,
        body=ref("WebhookRequest"),
    ),
    ("get", "/n/{username}/{path}/-/webhooks/{id}"): op(
        "A webhook with its latest delivery (webhook:read; owner or collaborator)",
        {"200": json_response("OK", ref("Webhook")), **NOT_FOUND},
        security=BEARER,
        parameters=PARAMS,
    ),
    ("get", "/n/{username}/{path}/-/webhooks/{id}/deliveries"): op(
        "The webhook's delivery log, newest first (webhook:read; owner or collaborator)",
        {"200": json_response("OK", list_of("WebhookDelivery")), **NOT_FOUND},
        security=BEARER,
        parameters=[*PARAMS, query_param("page", "page number, 25 items a page", INT)],
        extension=True,
    ),
    ("patch", "/n/{username}/{path}/-/webhooks/{id}"): op(
        "Change a webhook (webhook:write; owner or collaborator)",
        {"200": json_response("OK", ref("Webhook")), **INVALID, **NOT_FOUND},
        security=BEARER,
        parameters=PARAMS,
        body=ref("WebhookRequest"),
    ),
    ("delete", "/n/{username}/{path}/-/webhooks/{id}"): op(
        "Delete a webhook and its delivery records (webhook:delete; owner or collaborator)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        parameters=PARAMS,
    ),
}
