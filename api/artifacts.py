"""A build's artifacts and its snapshot of objects, variables and keys (docs/api.md §7.10 to
§7.14)."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from marid import builds, jobs, mime, users
from marid.api.auth import Caller, optional
from marid.api.builds import PARAMS, B, Loaded, readable_build
from marid.api.http import UNTRUSTED_CONTENT, Page, api_url, query, url_path
from marid.api.keys import BLOBS, POOL
from marid.api.openapi import (
    BOOL,
    INT,
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
)
from marid.times import rfc3339
from marid.validation import NotFound

routes = web.RouteTableDef()
MASK = "xxxxxx"


def build_url(loaded: Loaded, base: str) -> str:
    return builds.url(loaded.build, loaded.owner, base)


async def artifacts_json(
    conn: asyncpg.Connection, rows: list[asyncpg.Record], loaded: Loaded, base: str
) -> list[dict[str, Any]]:
    """Artifact entities (docs/api.md §7.1) with their user, build and job embedded."""
    build = loaded.json(base)
    found = {job.id: job for job in await jobs.list_for(conn, loaded.build.id)}
    url = build_url(loaded, base)
    return [
        {
            "id": row["id"],
            "user_id": row["user_id"],
            "build_id": row["build_id"],
            "job_id": row["job_id"],
            "source": row["source"],
            "name": row["name"],
            "size": row["size"],
            "md5": row["md5"],
            "sha256": row["sha256"],
            "created_at": rfc3339(row["created_at"]),
            "deleted_at": rfc3339(row["deleted_at"]),
            "url": f"{url}/artifacts/{url_path(row['name'])}",
            "user": users.to_json(loaded.owner),
            "build": build,
            "job": jobs.to_json(found[row["job_id"]], url, build),
        }
        for row in rows
    ]


@routes.get(B + "/artifacts")
@optional
async def list_artifacts(request: web.Request, caller: Caller) -> web.Response:
    search = query(request, "search") or ""
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
        total = await conn.fetchval(
            "SELECT count(*) FROM build_artifacts"
            " WHERE build_id = $1 AND strpos(lower(name), lower($2)) > 0",
            loaded.build.id,
            search,
        )
        page = Page(request, total)
        rows = await artifact_rows(conn, loaded.build.id, search, page.offset, page.limit)
        return page.response(await artifacts_json(conn, rows, loaded, api_url(request)))


async def artifact_rows(
    conn: asyncpg.Connection, build_id: int, search: str, offset: int, limit: int
) -> list[asyncpg.Record]:
    """The build's artifacts whose name contains `search`, by name."""
    return list(
        await conn.fetch(
            """
            SELECT * FROM build_artifacts
            WHERE build_id = $1 AND strpos(lower(name), lower($2)) > 0
            ORDER BY name OFFSET $3 LIMIT $4
            """,
            build_id,
            search,
            offset,
            limit,
        )
    )


async def artifact_named(conn: asyncpg.Connection, build_id: int, name: str) -> asyncpg.Record:
    """The build's artifact `name`; NotFound if there is none."""
    row = await conn.fetchrow(
        "SELECT * FROM build_artifacts WHERE build_id = $1 AND name = $2", build_id, name
    )
    if row is None:
        raise NotFound()
    return row


@routes.get(B + "/artifacts/{name:.+}")
@optional
async def show_artifact(request: web.Request, caller: Caller) -> web.StreamResponse:
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
        row = await artifact_named(conn, loaded.build.id, request.match_info["name"])
        if request.headers.get("Accept") != "application/octet-stream":
            [body] = await artifacts_json(conn, [row], loaded, api_url(request))
            return web.json_response(body)
    if row["blob_key"] is None or row["deleted_at"] is not None:
        raise NotFound()
    return await download(request, row["blob_key"], row["size"])


async def download(
    request: web.Request, key: str, size: int, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    """Stream a blob with its sniffed type (docs/api.md §7.11) and `headers`."""
    chunks = await request.config_dict[BLOBS].open(key)
    first = b""
    async for chunk in chunks:
        first = chunk
        break
    response = web.StreamResponse(
        headers={
            "Content-Type": mime.detect(first[:512]),
            "Content-Length": str(size),
            **UNTRUSTED_CONTENT,
            **(headers or {}),
        }
    )
    await response.prepare(request)
    await response.write(first)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


@routes.get(B + "/objects")
@optional
async def list_build_objects(request: web.Request, caller: Caller) -> web.Response:
    search = query(request, "search") or ""
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
        total = await conn.fetchval(
            "SELECT count(*) FROM build_objects"
            " WHERE build_id = $1 AND strpos(lower(source), lower($2)) > 0",
            loaded.build.id,
            search,
        )
        page = Page(request, total)
        rows = await object_rows(conn, loaded.build.id, search, page.offset, page.limit)
    base = api_url(request)
    build = loaded.json(base)
    return page.response(
        [
            {
                "id": row["id"],
                "build_id": row["build_id"],
                "source": row["source"],
                "name": row["name"],
                "type": row["type"],
                "md5": row["md5"],
                "sha256": row["sha256"],
                "placed": row["placed"],
                "object_url": f"{base}/objects/{row['object_id']}" if row["type"] else None,
                "build": build,
            }
            for row in rows
        ]
    )


@routes.get(B + "/variables")
@optional
async def list_build_variables(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
        rows = await variable_rows(conn, loaded.build.id)
    base = api_url(request)
    build = loaded.json(base)
    return web.json_response(
        [
            {
                "id": row["id"],
                "build_id": row["build_id"],
                "key": row["key"],
                "value": MASK if row["masked"] else row["value"],
                "masked": row["masked"],
                "variable_url": (
                    f"{base}/variables/{row['variable_id']}" if row["variable_id"] else None
                ),
                "build": build,
            }
            for row in rows
        ]
    )


async def object_rows(
    conn: asyncpg.Connection, build_id: int, search: str, offset: int, limit: int
) -> list[asyncpg.Record]:
    """The objects the build declared whose source contains `search`, by source."""
    return list(
        await conn.fetch(
            """
            SELECT bo.id, bo.build_id, bo.source, bo.name, bo.placed, bo.object_id,
                   o.type, o.md5, o.sha256
            FROM build_objects bo LEFT JOIN objects o ON o.id = bo.object_id
            WHERE bo.build_id = $1 AND strpos(lower(bo.source), lower($2)) > 0
            ORDER BY bo.source, bo.id OFFSET $3 LIMIT $4
            """,
            build_id,
            search,
            offset,
            limit,
        )
    )


async def variable_rows(conn: asyncpg.Connection, build_id: int) -> list[asyncpg.Record]:
    """The variables the build was submitted with, by key (values of masked ones sealed)."""
    return list(
        await conn.fetch(
            """
            SELECT id, build_id, variable_id, key, value, masked FROM build_variables
            WHERE build_id = $1 ORDER BY key, id
            """,
            build_id,
        )
    )


@routes.get(B + "/keys")
@optional
async def list_build_keys(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
        rows = await conn.fetch(
            """
            SELECT id, build_id, key_id, name, config, location FROM build_keys
            WHERE build_id = $1 ORDER BY name, id
            """,
            loaded.build.id,
        )
    build = loaded.json(api_url(request))
    return web.json_response([{**dict(row), "build": build} for row in rows])


SEARCH = [*PARAMS, query_param("search", "substring filter"), query_param("page", "page", INT)]
ARTIFACT = [*PARAMS, path_param("name", "artifact name (may contain /)")]
SCHEMAS = {
    "Artifact": obj(
        {
            "id": INT,
            "user_id": INT,
            "build_id": INT,
            "job_id": INT,
            "source": STRING,
            "name": STRING,
            "size": nullable(INT),
            "md5": nullable(STRING),
            "sha256": nullable(STRING),
            "created_at": TIME,
            "deleted_at": nullable(TIME),
            "url": URL,
            "user": ref("User"),
            "build": ref("Build"),
            "job": ref("Job"),
        }
    ),
    "BuildObject": obj(
        {
            "id": INT,
            "build_id": INT,
            "source": STRING,
            "name": STRING,
            "type": nullable(STRING),
            "md5": nullable(STRING),
            "sha256": nullable(STRING),
            "placed": BOOL,
            "object_url": nullable(URL),
            "build": ref("Build"),
        }
    ),
    "BuildVariable": obj(
        {
            "id": INT,
            "build_id": INT,
            "key": STRING,
            "value": STRING,
            "masked": BOOL,
            "variable_url": nullable(URL),
            "build": ref("Build"),
        }
    ),
    "BuildKey": obj(
        {
            "id": INT,
            "build_id": INT,
            "key_id": nullable(INT),
            "name": STRING,
            "config": STRING,
            "location": STRING,
            "build": ref("Build"),
        }
    ),
}
OPERATIONS: Operations = {
    ("get", "/b/{username}/{number}/artifacts"): op(
        "Artifacts by name (build:read; waived when public)",
        {"200": json_response("OK", list_of("Artifact")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=SEARCH,
    ),
    ("get", "/b/{username}/{number}/artifacts/{name}"): op(
        "An artifact; its content with Accept: application/octet-stream",
        {
            "200": {
                "description": "The entity, or the raw content",
                "content": {
                    "application/json": {"schema": ref("Artifact")},
                    "application/octet-stream": {"schema": {"type": "string"}},
                },
            },
            **NOT_FOUND,
        },
        security=OPTIONAL,
        parameters=ARTIFACT,
    ),
    ("get", "/b/{username}/{number}/objects"): op(
        "Objects the build declared (build:read; waived when public)",
        {"200": json_response("OK", list_of("BuildObject")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=SEARCH,
    ),
    ("get", "/b/{username}/{number}/variables"): op(
        "The build's variables, masked values hidden (build:read; waived when public)",
        {"200": json_response("OK", list_of("BuildVariable")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=PARAMS,
    ),
    ("get", "/b/{username}/{number}/keys"): op(
        "The build's SSH keys, never their content (build:read; waived when public)",
        {"200": json_response("OK", list_of("BuildKey")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=PARAMS,
    ),
}
