"""Images: qemu disks and docker archives (docs/api.md §12, docs/manifest.md §9.2), `N/-/images`
(§8.8)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import asyncpg
from aiohttp import web

from marid import images, webhooks
from marid.api import idempotency, uploads
from marid.api.auth import Caller, optional, requires
from marid.api.downloads import DOWNLOADS
from marid.api.http import api_url, read_body
from marid.api.keys import BLOBS, CIPHER, CONFIG, POOL
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
from marid.uploads import stored
from marid.users import User
from marid.validation import Errors, NotFound

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
FIELDS = ("name", "namespace", "driver")


@routes.get("/images")
@requires("image:read")
async def list_images(request: web.Request, user: User) -> web.Response:
    return await list_mine(request, user, images.count, images.page, images.to_json)


@routes.post("/images")
@requires("image:write")
async def create_image(request: web.Request, user: User) -> web.Response:
    """Three forms (docs/api.md §12.3): a JSON body downloads, anything else is an upload. With
    an Idempotency-Key, a retry replays the first 201 (§22)."""
    key = idempotency.header(request)  # a malformed key is refused before the body is read
    if request.content_type == "application/json":
        if key is None:
            return await _create_download(request, user, None)
        body_sha256 = hashlib.sha256(await request.read()).hexdigest()
        digest = idempotency.fingerprint("POST /images", body_sha256=body_sha256)
        return await idempotency.once(
            request, user, key, lambda: _create_download(request, user, key), digest
        )
    max_size = request.config_dict[CONFIG].images.max_size
    async with uploads.receive(request, FIELDS, max_size) as upload:
        return await idempotency.upload_once(
            request,
            user,
            key,
            "POST /images",
            FIELDS,
            upload,
            lambda: create_from_upload(request, user, upload, key),
        )


async def create_from_upload(
    request: web.Request, user: User, upload: uploads.Upload, key: str | None
) -> web.Response:
    """Store the upload as the user's image (201 with its entity); raises ValidationError.
    The web interface's upload form comes through here too."""
    max_size = request.config_dict[CONFIG].images.max_size
    errors = Errors()
    driver = images.check_driver(upload.fields.get("driver"), errors)
    name = upload.fields.get("name")
    images.check_name(name, driver, errors)
    await images.check_content(upload.content, driver, errors, max_size)
    # Stored only once its own checks pass; deleted again if the rest of the request fails.
    valid = None if errors.by_field else upload.content
    async with (
        stored(request.config_dict[BLOBS], valid) as blob,
        request.config_dict[POOL].acquire() as conn,
        conn.transaction(),
    ):
        reference = upload.fields.get("namespace")
        ns = await resolve_and_check_name(conn, user, reference, name, errors, images.name_taken)
        errors.raise_if_any()
        assert driver is not None and name is not None and blob is not None
        image_id = await images.create(conn, user, ns, driver, name, blob)
        response = await _created(conn, request, user, image_id, key)
    log.info("image %d uploaded", image_id)
    return response


async def _create_download(request: web.Request, user: User, key: str | None) -> web.Response:
    downloads = request.config_dict[DOWNLOADS]
    form = await read_body(request)
    errors = form.errors
    driver = images.check_driver(form.string("driver", "Driver"), errors)
    name = form.string("name", "Name")
    if not errors.has("name"):
        images.check_name(name, driver, errors)
    reference = form.string("namespace", "Namespace")
    url = form.string("download_url", "Download URL")
    if url:
        images.check_download_url(url, driver, errors, downloads.policy)
    elif not errors.has("download_url"):
        errors.add("file", "File field required")  # neither a file nor a URL (§12.3)
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        ns = await resolve_and_check_name(conn, user, reference, name, errors, images.name_taken)
        errors.raise_if_any()
        assert name is not None and url is not None
        image_id = await images.create(conn, user, ns, "qemu", name, None)
        secret = images.seal_url(request.config_dict[CIPHER], image_id, url)
        await images.add_download(conn, image_id, images.redact(url), secret)
        response = await _created(conn, request, user, image_id, key)
    downloads.start(image_id)  # only once committed: the task reads the row
    log.info("image %d created, download pending", image_id)
    return response


async def _created(
    conn: asyncpg.Connection, request: web.Request, user: User, image_id: int, key: str | None
) -> web.Response:
    """The 201 for a new image, in the transaction that creates it: sends `images` (`created`)
    and keeps the outcome of `key` (docs/api.md §22)."""
    body = await _entity(conn, image_id, api_url(request))
    await webhooks.emit(conn, body["namespace_id"], "images", {"action": "created", "image": body})
    response = web.json_response(body, status=201)
    if key is not None:
        await idempotency.keep(conn, user, key, response)
    return response


async def _entity(conn: asyncpg.Connection, image_id: int, base: str) -> dict[str, Any]:
    image = await images.get(conn, image_id)
    assert image is not None
    [body] = await images.to_json(conn, [image], base)
    return body


@routes.get(r"/images/{id:\d+}")
@optional
async def show_image(request: web.Request, caller: Caller) -> web.StreamResponse:
    """The Image entity, or its content for the driver's `Accept` type (docs/api.md §12.4)."""
    async with request.config_dict[POOL].acquire() as conn:
        found = await readable(conn, request, caller, images.get, "image:read")
        content_type = images.CONTENT_TYPES[found.driver]
        if request.headers.get("Accept") != content_type:
            [body] = await images.to_json(conn, [found], api_url(request))
            return web.json_response(body)
    if found.blob_key is None or found.size is None:  # a download not (yet) finished
        raise NotFound()
    store = request.config_dict[BLOBS]
    return await uploads.send_blob(request, store, found.blob_key, content_type, found.size)


@routes.delete(r"/images/{id:\d+}")
@requires("image:delete")
async def delete_image(request: web.Request, user: User) -> web.Response:
    await remove(request, user)
    return web.Response(status=204)


async def remove(request: web.Request, user: User) -> None:
    """Delete the image of the URL if the user may change it, then its content (and stop its
    download)."""
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        found = await usable(conn, request, user, images.get)
        await announce(conn, request, "images", "deleted", found, images.to_json)
        key = await images.delete(conn, found)
    # Only after the commit: a rolled-back delete must still find its content.
    downloads = request.config_dict.get(DOWNLOADS)
    if downloads is not None:
        downloads.cancel(found.id)
    if key is not None:
        await request.config_dict[BLOBS].delete(key)
    log.info("image %d deleted", found.id)


@routes.get(NS + "/-/images")
@optional
async def list_namespace_images(request: web.Request, caller: Caller) -> web.Response:
    return await list_in_namespace(request, caller, images.count, images.page, images.to_json)


ID = [path_param("id", "image id")]
BINARY = {"type": "string", "format": "binary"}
DRIVER = {"enum": list(images.DRIVERS)}
SCHEMAS = {
    "Image": obj(
        {
            "id": INT,
            "author_id": INT,
            "user_id": INT,
            "namespace_id": nullable(INT),
            "driver": DRIVER,
            "name": STRING,
            "created_at": TIME,
            "url": URL,
            "author": ref("User"),
            "user": ref("User"),
            "namespace": nullable(ref("Namespace")),
            "download": nullable(ref("ImageDownload")),
        }
    ),
    "ImageDownload": obj(
        {
            "source": STRING,
            "error": nullable(STRING),
            "created_at": TIME,
            "started_at": nullable(TIME),
            "finished_at": nullable(TIME),
        }
    ),
    "ImageUpload": obj(
        {"name": STRING, "namespace": STRING, "driver": DRIVER, "file": BINARY},
        optional=("namespace", "driver"),
    ),
    "ImageDownloadRequest": obj(
        {"name": STRING, "namespace": STRING, "driver": DRIVER, "download_url": URL},
        optional=("namespace", "driver"),
    ),
}
OPERATIONS: Operations = {
    ("get", "/images"): op(
        "Images the caller owns or may use through namespaces (image:read)",
        {"200": json_response("OK", list_of("Image")), **NOT_FOUND},
        security=BEARER,
        parameters=search_params(),
    ),
    ("post", "/images"): {
        **op(
            "Upload an image (raw body with query parameters, or multipart), or download one"
            " (JSON body with download_url) (image:write)",
            {"201": json_response("Created", ref("Image")), **INVALID, **NOT_FOUND},
            security=BEARER,
            parameters=[
                query_param("name", "image name (raw upload)"),
                query_param("namespace", "path[@owner] (raw upload)"),
                query_param("driver", "qemu (default) or docker (raw upload)"),
            ],
        ),
        "requestBody": {
            "content": {
                "multipart/form-data": {"schema": ref("ImageUpload")},
                "application/json": {"schema": ref("ImageDownloadRequest")},
                "application/octet-stream": {"schema": BINARY},
            }
        },
    },
    ("get", "/images/{id}"): op(
        "An image; its content with Accept application/x-qemu-disk (qemu) or"
        " application/x-tar (docker) (image:read; waived when public)",
        {
            "200": {
                "description": "The Image, or the raw content",
                "content": {
                    "application/json": {"schema": ref("Image")},
                    "application/x-qemu-disk": {"schema": BINARY},
                    "application/x-tar": {"schema": BINARY},
                },
            },
            **NOT_FOUND,
        },
        security=OPTIONAL,
        parameters=ID,
    ),
    ("delete", "/images/{id}"): op(
        "Delete an image and its content (image:delete; owner or collaborator)",
        {"204": {"description": "Deleted"}, **NOT_FOUND},
        security=BEARER,
        parameters=ID,
    ),
    ("get", "/n/{username}/{path}/-/images"): op(
        "Images in the namespace (namespace:read; waived when public)",
        {"200": json_response("OK", list_of("Image")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=NS_PARAMS + search_params(),
    ),
}
