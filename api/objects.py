"""Objects: uploaded files for build environments (docs/api.md §14) and `N/-/objects` (§8.8)."""

from __future__ import annotations

import logging

from aiohttp import web

from marid import mime, objects
from marid.api import idempotency, uploads
from marid.api.auth import Caller, optional, requires
from marid.api.http import api_url
from marid.api.keys import BLOBS, CONFIG, POOL
from marid.api.namespaces import NS, NS_PARAMS
from marid.api.openapi import (
    BEARER,
    INT,
    INVALID,
    NOT_FOUND,
    OPTIONAL,
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
    search_params,
)
from marid.api.resources import (
    announce,
    list_in_namespace,
    list_mine,
    readable,
    resolve_and_check_name,
    usable,
)
from marid.uploads import check_file, stored
from marid.users import User
from marid.validation import Errors

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
FIELDS = ("name", "namespace")


@routes.get("/objects")
@requires("object:read")
async def list_objects(request: web.Request, user: User) -> web.Response:
    return await list_mine(request, user, objects.count, objects.page, objects.to_json)


@routes.post("/objects")
@requires("object:write")
async def create_object(request: web.Request, user: User) -> web.Response:
    """Upload an object (docs/api.md §14.3); with an Idempotency-Key, a retry replays the first
    201 (§22)."""
    key = idempotency.header(request)  # a malformed key is refused before the upload
    max_size = request.config_dict[CONFIG].objects.max_size
    async with uploads.receive(request, FIELDS, max_size) as upload:
        return await idempotency.upload_once(
            request,
            user,
            key,
            "POST /objects",
            FIELDS,
            upload,
            lambda: create_from_upload(request, user, upload, key),
        )


async def create_from_upload(
    request: web.Request, user: User, upload: uploads.Upload, key: str | None
) -> web.Response:
    """Store the upload as the user's object (201 with its entity); raises ValidationError.
    The web interface's upload form comes through here too."""
    errors = Errors()
    name = upload.fields.get("name")
    objects.check_name(name, errors)
    check_file(upload.content, errors, request.config_dict[CONFIG].objects.max_size)
    # Stored only once its own checks pass; deleted again if the rest of the request fails.
    valid = None if errors.by_field else upload.content
    async with (
        stored(request.config_dict[BLOBS], valid) as blob,
        request.config_dict[POOL].acquire() as conn,
        conn.transaction(),
    ):
        reference = upload.fields.get("namespace")
        ns = await resolve_and_check_name(conn, user, reference, name, errors, objects.name_taken)
        errors.raise_if_any()
        assert name is not None and blob is not None
        created = await objects.create(conn, user, ns, name, mime.detect(upload.content.head), blob)
        [body] = await objects.to_json(conn, [created], api_url(request))
        await announce(conn, request, "objects", "created", created, objects.to_json, body)
        response = web.json_response(body, status=201)
        if key is not None:
            await idempotency.keep(conn, user, key, response)  # commits with the object
    log.info("object %d created", created.id)
    return response


@routes.get(r"/objects/{id:\d+}")
@optional
async def show_object(request: web.Request, caller: Caller) -> web.StreamResponse:
    """The Object entity, or its content when `Accept` is exactly its type (docs/api.md §14.4)."""
    async with request.config_dict[POOL].acquire() as conn:
        found = await readable(conn, request, caller, objects.get, "object:read")
        if request.headers.get("Accept") != found.type:
            [body] = await objects.to_json(conn, [found], api_url(request))
            return web.json_response(body)
    store = request.config_dict[BLOBS]
    return await uploads.send_blob(request, store, found.blob_key, found.type, found.size)


@routes.delete(r"/objects/{id:\d+}")
@requires("object:delete")
async def delete_object(request: web.Request, user: User) -> web.Response:
    await remove(request, user)
    return web.Response(status=204)


async def remove(request: web.Request, user: User) -> None:
    """Delete the object of the URL if the user may change it, then its content."""
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        found = await usable(conn, request, user, objects.get)
        await announce(conn, request, "objects", "deleted", found, objects.to_json)
        await objects.delete(conn, found)
    # Only after the commit: a rolled-back delete must still find its content.
    await request.config_dict[BLOBS].delete(found.blob_key)
    log.info("object %d deleted", found.id)


@routes.get(NS + "/-/objects")
@optional
async def list_namespace_objects(request: web.Request, caller: Caller) -> web.Response:
    return await list_in_namespace(request, caller, objects.count, objects.page, objects.to_json)


ID = [path_param("id", "object id")]
BINARY = {"type": "string", "format": "binary"}
SCHEMAS = {
    "Object": obj(
        {
            "id": INT,
            "author_id": INT,
            "user_id": INT,
            "namespace_id": nullable(INT),
            "name": STRING,
            "type": STRING,
            "size": INT,
            "md5": STRING,
            "sha256": STRING,
            "created_at": TIME,
            "url": URL,
            "builds_url": URL,
            "author": ref("User"),
            "user": ref("User"),
            "namespace": nullable(ref("Namespace")),
        }
    ),
    "ObjectUpload": obj(
        {"name": STRING, "namespace": STRING, "file": BINARY}, optional=("namespace",)
    ),
}
OPERATIONS: Operations = {
    ("get", "/objects"): op(
        "Objects the caller owns or may use through namespaces (object:read)",
        {"200": json_response("OK", list_of("Object")), **NOT_FOUND},
        security=BEARER,
        parameters=search_params(),
    ),
    ("post", "/objects"): {
        **op(
            "Upload an object: a raw body with query `name`, `namespace`, or multipart fields"
            " (object:write)",
            {"201": json_response("Created", ref("Object")), **INVALID, **NOT_FOUND},
            security=BEARER,
            parameters=[
                query_param("name", "object name (raw upload)"),
                query_param("namespace", "path[@owner] (raw upload)"),
            ],
        ),
        "requestBody": {
            "content": {
                "multipart/form-data": {"schema": ref("ObjectUpload")},
                "application/octet-stream": {"schema": BINARY},
            }
        },
    },
    ("get", "/objects/{id}"): op(
        "An object; its content when Accept equals its type (object:read; waived when public)",
        {
            "200": {
                "description": "The Object, or the raw content",
                "content": {
                    "application/json": {"schema": ref("Object")},
                    "*/*": {"schema": BINARY},
                },
            },
            **NOT_FOUND,
        },
        security=OPTIONAL,
        parameters=ID,
    ),
    ("delete", "/objects/{id}"): op(
        "Delete an object and its content (object:delete; owner or collaborator)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        parameters=ID,
    ),
    ("get", "/n/{username}/{path}/-/objects"): op(
        "Objects in the namespace (namespace:read; waived when public)",
        {"200": json_response("OK", list_of("Object")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=NS_PARAMS + search_params(),
    ),
}
