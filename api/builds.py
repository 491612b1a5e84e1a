"""Builds: list, submit, show, kill, pin and tags (docs/api.md §7.3 to §7.7, §7.15 to §7.18)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from marid import builds, lifecycle, manifest, namespaces, objects, users, webhooks
from marid import submit as submitting
from marid.api import idempotency, resources
from marid.api.auth import Caller, optional, requires
from marid.api.http import (
    MAX_NUMBER,
    Page,
    api_url,
    path_id,
    query,
    query_flag,
    read_body,
    read_json,
    url_path,
)
from marid.api.keys import BLOBS, CONFIG, POOL
from marid.api.namespaces import NS, NS_PARAMS, load_namespace
from marid.api.openapi import (
    BEARER,
    BOOL,
    INT,
    INVALID,
    NOT_FOUND,
    OPTIONAL,
    OUTPUT,
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
from marid.blobs import BlobStore
from marid.builds import Build, Filters, Listing, Viewer
from marid.config import Config
from marid.manifest import ManifestLimits
from marid.namespaces import Namespace, Rights
from marid.submit import Submission, submit
from marid.users import User
from marid.validation import Body, Errors, NotFound, RequestError, ValidationError

routes = web.RouteTableDef()

B = r"/b/{username}/{number:\d+}"


@dataclass(frozen=True)
class Loaded:
    """A build named by the URL with what access checks and rendering need."""

    build: Build
    owner: User
    namespace: Namespace | None
    rights: Rights

    def json(self, base: str) -> dict[str, Any]:
        return builds.to_json(self.build, self.owner, self.namespace, base)

    @property
    def url_path(self) -> str:
        return f"/b/{self.owner.username}/{self.build.number}"


async def load_build(conn: asyncpg.Connection, request: web.Request, user: User | None) -> Loaded:
    """The build of `/b/:username/:number` and the caller's rights on it; NotFound if missing."""
    number = path_id(request, "number", MAX_NUMBER)
    blobs = request.config_dict[BLOBS]
    build = await builds.get_by_number(conn, request.match_info["username"], number, blobs)
    if build is None:
        raise NotFound()
    owner = (await users.by_ids(conn, {build.user_id}))[build.user_id]
    ns = await namespaces.get(conn, build.namespace_id) if build.namespace_id else None
    rights = await namespaces.resource_rights(conn, user, build.user_id, ns)
    return Loaded(build, owner, ns, rights)


async def readable_build(conn: asyncpg.Connection, request: web.Request, caller: Caller) -> Loaded:
    """A build the caller may read (`build:read`, waived for public namespaces)."""
    loaded = await load_build(conn, request, caller.user)
    caller.check_read(loaded.rights, "build:read")
    return loaded


async def usable_build(conn: asyncpg.Connection, request: web.Request, user: User) -> Loaded:
    """A build the caller may pin, tag or kill (owner or collaborator)."""
    loaded = await load_build(conn, request, user)
    if not loaded.rights.use:
        raise NotFound()
    return loaded


def filters_of(request: web.Request) -> Filters:
    return Filters(
        tag=query(request, "tag"),
        search=query(request, "search"),
        status=query(request, "status"),
        pinned=bool(query_flag(request, "pinned")),
    )


def viewer_of(caller: Caller, may_read: bool) -> Viewer:
    """The caller as a build listing's reader; `may_read` when the listing's own scope check
    stands for `build:read` (docs/api.md §8.8), else the caller's own `build:read`."""
    user_id = caller.user.id if caller.user else None
    return Viewer(user_id, may_read or caller.can("build", "read"))


async def page_of_builds(
    request: web.Request, conn: asyncpg.Connection, listing: Listing, viewer: Viewer
) -> web.Response:
    """A paginated build listing with the build filters of docs/api.md §1.8, holding only the
    builds `viewer` could read one by one (§7.2)."""
    filters = filters_of(request)
    page = Page(request, await builds.count(conn, listing, filters, viewer))
    blobs = request.config_dict[BLOBS]
    found = await builds.page(conn, listing, filters, viewer, page.offset, page.limit, blobs)
    return page.response(await builds.many_to_json(conn, found, api_url(request)))


@routes.get("/builds")
@requires("build:read")
async def list_builds(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        listing = Listing(visible_to=user.id)
        return await page_of_builds(request, conn, listing, Viewer(user.id, may_read=True))


async def parse_submission(
    conn: asyncpg.Connection, request: web.Request, user: User
) -> Submission:
    """The POST /builds body (docs/api.md §7.4) checked in one pass; raises ValidationError."""
    body = await read_body(request)
    text = body.string("manifest", "Manifest")
    comment = body.string("comment", "Comment")
    tags = body.strings("tags", "Tags")
    config = request.config_dict[CONFIG]
    return await check_submission(conn, config, user, text, comment, tags, body.errors)


async def check_submission(
    conn: asyncpg.Connection,
    config: Config,
    user: User,
    text: str | None,
    comment: str | None,
    tags: list[str] | None,
    errors: Errors,
) -> Submission:
    """A submission of `text` (the manifest) by `user` checked, `errors` found so far
    included; raises ValidationError. The API and the web interface's form share it."""
    if not text and not errors.has("manifest"):
        errors.add("manifest", "Manifest field required")
    parsed, ns = None, None
    if text:
        try:
            limits, drivers = ManifestLimits.from_config(config), config.drivers_for(user.username)
            parsed = manifest.parse(text, limits, drivers)
        except manifest.ManifestError as exc:
            ns_errors = Errors()
            await namespaces.resolve(conn, user, exc.namespace, ns_errors, "manifest", True)
            messages = ns_errors.by_field.get("manifest", [])
            errors.by_field.update(exc.with_namespace(messages).errors)
        else:
            ns = await namespaces.resolve(conn, user, parsed.namespace, errors, "manifest", True)
    errors.raise_if_any()
    assert parsed is not None
    owner = ns.owner if ns else user
    return Submission(user, owner, ns, parsed, comment or "", tuple(tags or ()))


async def submit_checked(conn: asyncpg.Connection, sub: Submission, base: str) -> dict[str, Any]:
    """Store the submission as a queued build and announce it (build.submitted); its JSON."""
    [build] = await builds.with_pending(conn, [await submit(conn, sub)])
    body = builds.to_json(build, sub.owner, sub.namespace, base)
    await webhooks.emit(conn, build.namespace_id, "build.submitted", body)
    return body


@routes.post("/builds")
@requires("build:write")
async def create_build(request: web.Request, user: User) -> web.Response:
    """Submit a build; with an Idempotency-Key, a retry replays the first 201 (EXT g)."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return await _submit(request, user)
    return await idempotency.once(request, user, key, lambda: _submit(request, user))


async def _submit(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        sub = await parse_submission(conn, request, user)
        body = await submit_checked(conn, sub, api_url(request))
    return web.json_response(body, status=201)


@routes.get(NS + "/-/builds")
@optional
async def list_namespace_builds(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        ns = await load_namespace(conn, request)
        caller.check_read(await namespaces.rights(conn, caller.user, ns), "namespace:read")
        listing = Listing(namespace_id=ns.id)
        return await page_of_builds(request, conn, listing, viewer_of(caller, may_read=True))


@routes.get(r"/objects/{id:\d+}/builds")
@optional
async def list_object_builds(request: web.Request, caller: Caller) -> web.Response:
    """Builds that declared the object (docs/api.md §14.5): object:read and build:read."""
    async with request.config_dict[POOL].acquire() as conn:
        found = await resources.readable(
            conn, request, caller, objects.get, "object:read", "build:read"
        )
        listing = Listing(object_id=found.id)
        return await page_of_builds(request, conn, listing, viewer_of(caller, may_read=False))


@routes.get(B)
@optional
async def show_build(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
    return web.json_response(loaded.json(api_url(request)))


@routes.delete(B)
@requires("build:delete")
async def kill_build(request: web.Request, user: User) -> web.Response:
    """Kill (docs/api.md §7.6): a queued build never runs; a running one is stopped by its
    runner."""
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        loaded = await usable_build(conn, request, user)
        await kill(conn, loaded, api_url(request))
    return web.Response(status=204)


async def kill(conn: asyncpg.Connection, loaded: Loaded, base: str) -> None:
    """Kill a build the caller may use (docs/api.md §7.6); build.finished once it ends so."""
    if await lifecycle.kill(conn, loaded.build.id):
        await webhooks.emit_build(conn, loaded.build.id, "build.finished", base)


async def pin(
    conn: asyncpg.Connection, loaded: Loaded, pinned: bool, blobs: BlobStore, base: str
) -> dict[str, Any]:
    """Pin or unpin a build the caller may use; its JSON (build.pinned / build.unpinned)."""
    build = await builds.set_pinned(conn, loaded.build, pinned, blobs)
    body = builds.to_json(build, loaded.owner, loaded.namespace, base)
    if loaded.build.pinned != pinned:
        event = "build.pinned" if pinned else "build.unpinned"
        await webhooks.emit(conn, build.namespace_id, event, body)
    return body


async def set_pinned(request: web.Request, user: User, pinned: bool) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        loaded = await usable_build(conn, request, user)
        blobs = request.config_dict[BLOBS]
        body = await pin(conn, loaded, pinned, blobs, api_url(request))
    return web.json_response(body)


@routes.post(B + "/restart")
@requires("build:write")
async def restart_build(request: web.Request, user: User) -> web.Response:
    """Restart a finished build (docs/api.md §27): a new build from its stored snapshot."""
    body = await read_body(request)
    config = request.config_dict[CONFIG]
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        loaded = await usable_build(conn, request, user)
        made = await restart(conn, config, loaded, user, body, api_url(request))
    return web.json_response(made, status=201)


async def restart(
    conn: asyncpg.Connection, config: Config, loaded: Loaded, user: User, body: Body, base: str
) -> dict[str, Any]:
    """Check and make the restart of a build the caller may use; its JSON (build.submitted).
    Raises ValidationError or RequestError."""
    job = body.string("from", "From")
    if job == "":
        body.errors.add("from", "From cannot be empty: name a job, or leave it out")
    body.errors.raise_if_any()
    build = loaded.build
    if build.status not in builds.FINAL:
        raise RequestError(
            f"Build #{build.number} is {build.status}: only a finished build can be restarted"
        )
    if build.driver not in config.drivers_for(user.username):
        # The driver was disabled since, or is not open to this user (os_driver.users).
        raise ValidationError({"manifest": [manifest.driver_disabled(build.driver)]})
    resume = await submitting.check_resume(conn, build, job) if job else None
    made = await submitting.restart(conn, build, user, resume)
    [made] = await builds.with_pending(conn, [made])
    json_body = builds.to_json(made, loaded.owner, loaded.namespace, base)
    await webhooks.emit(conn, made.namespace_id, "build.submitted", json_body)
    return json_body


@routes.patch(B + "/pin")
@requires("build:write")
async def pin_build(request: web.Request, user: User) -> web.Response:
    return await set_pinned(request, user, True)


@routes.patch(B + "/unpin")
@requires("build:write")
async def unpin_build(request: web.Request, user: User) -> web.Response:
    return await set_pinned(request, user, False)


def tag_json(tag: builds.Tag, tagger: User, loaded: Loaded, base: str) -> dict[str, Any]:
    build_url = builds.url(loaded.build, loaded.owner, base)
    return {
        "user_id": tag.user_id,
        "build_id": tag.build_id,
        "name": tag.name,
        "created_at": tag.created_at.isoformat().replace("+00:00", "Z"),
        "url": f"{build_url}/tags/{url_path(tag.name)}",
        "user": users.to_json(tagger),
        "build": loaded.json(base),
    }


async def tags_json(
    conn: asyncpg.Connection, found: list[builds.Tag], loaded: Loaded, base: str
) -> list[dict[str, Any]]:
    taggers = await users.by_ids(conn, {tag.user_id for tag in found})
    return [tag_json(tag, taggers[tag.user_id], loaded, base) for tag in found]


@routes.get(B + "/tags")
@optional
async def list_tags(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
        found = await builds.tags(conn, loaded.build)
        return web.json_response(await tags_json(conn, found, loaded, api_url(request)))


@routes.post(B + "/tags")
@requires("build:write")
async def create_tags(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        loaded = await usable_build(conn, request, user)
        names = await read_json(request)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RequestError("Body must be a JSON array of strings")
        body = await tag(conn, request, user, loaded, names)
    return web.json_response(body, status=201)


async def tag(
    conn: asyncpg.Connection, request: web.Request, user: User, loaded: Loaded, names: list[str]
) -> list[dict[str, Any]]:
    """Add tags to a build the user may use, with the build.tagged webhook; the new Tag
    entities (none for names it already had)."""
    added = await builds.add_tags_by(conn, loaded.build.id, user, builds.normalise_tags(names))
    loaded = await load_build(conn, request, user)  # the embedded build shows its new tags
    body = await tags_json(conn, added, loaded, api_url(request))
    if added:
        await webhooks.emit(
            conn,
            loaded.build.namespace_id,
            "build.tagged",
            {
                "build": loaded.json(api_url(request)),
                "tags": [{**tag, "build": None} for tag in body],
                "url": builds.url(loaded.build, loaded.owner, api_url(request)) + "/tags",
                "user": users.to_json(user),
            },
        )
    return body


@routes.get(B + "/tags/{name:.+}")
@optional
async def show_tag(request: web.Request, caller: Caller) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
        tag = await builds.tag(conn, loaded.build, request.match_info["name"])
        if tag is None:
            raise NotFound()
        [body] = await tags_json(conn, [tag], loaded, api_url(request))
    return web.json_response(body)


@routes.delete(B + "/tags/{name:.+}")
@requires("build:delete")
async def delete_tag(request: web.Request, user: User) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        loaded = await usable_build(conn, request, user)
        if not await builds.delete_tag(conn, loaded.build, request.match_info["name"]):
            raise NotFound()
    return web.Response(status=204)


PARAMS = [path_param("username", "build owner"), path_param("number", "build number")]
FILTERS = [
    query_param("tag", "builds with exactly this tag"),
    query_param("search", "builds with a tag containing this (case-insensitive)"),
    query_param("status", "exact status; passed also matches passed_with_failures"),
    query_param("pinned", "only pinned builds when true"),
    query_param("page", "page number, 25 items a page", {"type": "integer"}),
]
SCHEMAS = {
    "Trigger": obj({"type": STRING, "comment": STRING, "data": {"type": "object"}}),
    "Pending": obj(
        {
            "reason": {
                "type": "string",
                "description": "why the build has not started, for people (docs/api.md §7.1)",
            },
            "position": {
                "type": "integer",
                "minimum": 1,
                "description": "its place in the queue of its driver type; 1 is next",
            },
        }
    ),
    "Build": obj(
        {
            "id": INT,
            "user_id": INT,
            "namespace_id": nullable(INT),
            "number": INT,
            "manifest": STRING,
            "status": {"enum": list(builds.STATUSES)},
            "output": OUTPUT,
            "tags": {"type": "array", "items": STRING},
            "pinned": BOOL,
            "attempts": INT,
            "pending": nullable(ref("Pending")),
            "restarted_from": nullable(URL),
            "created_at": TIME,
            "started_at": nullable(TIME),
            "finished_at": nullable(TIME),
            "url": URL,
            **{f"{link}_url": URL for link in builds.LINKS},
            "user": ref("User"),
            "namespace": nullable(ref("Namespace")),
            "trigger": ref("Trigger"),
        }
    ),
    "BuildRequest": obj(
        {"manifest": STRING, "comment": STRING, "tags": {"type": "array", "items": STRING}},
        optional=("comment", "tags"),
    ),
    "Tag": obj(
        {
            "user_id": INT,
            "build_id": INT,
            "name": STRING,
            "created_at": TIME,
            "url": URL,
            "user": ref("User"),
            "build": ref("Build"),
        }
    ),
}
TAG = [*PARAMS, path_param("name", "tag name (may contain /)")]
OPERATIONS: Operations = {
    ("get", "/builds"): op(
        "The caller's builds (build:read), newest first",
        {"200": json_response("OK", list_of("Build")), **NOT_FOUND},
        security=BEARER,
        parameters=FILTERS,
    ),
    ("post", "/builds"): op(
        "Submit a build (build:write); Idempotency-Key makes retries safe (EXT g)",
        {
            "201": json_response("Queued", ref("Build")),
            **INVALID,
            **NOT_FOUND,
            "409": json_response("Same Idempotency-Key in progress", ref("Message")),
            "422": json_response("Idempotency-Key used with another body", ref("Message")),
        },
        security=BEARER,
        body=ref("BuildRequest"),
        parameters=[
            {"name": "Idempotency-Key", "in": "header", "required": False, "schema": STRING}
        ],
    ),
    ("get", "/n/{username}/{path}/-/builds"): op(
        "Builds of this exact namespace (namespace:read; waived when public)",
        {"200": json_response("OK", list_of("Build")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=NS_PARAMS + FILTERS,
    ),
    ("get", "/objects/{id}/builds"): op(
        "Builds that declared this object (object:read, build:read; waived when public)",
        {"200": json_response("OK", list_of("Build")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=[path_param("id", "object id"), *FILTERS],
    ),
    ("get", "/b/{username}/{number}"): op(
        "A build (build:read; waived when public)",
        {"200": json_response("OK", ref("Build")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=PARAMS,
    ),
    ("delete", "/b/{username}/{number}"): op(
        "Kill a build (build:delete)",
        {"204": {"description": "Killed, or already finished"}, **NOT_FOUND},
        security=BEARER,
        parameters=PARAMS,
    ),
    ("post", "/b/{username}/{number}/restart"): op(
        "Restart a finished build from its stored snapshot (build:write)",
        {"201": json_response("Queued", ref("Build")), **INVALID, **NOT_FOUND},
        security=BEARER,
        parameters=PARAMS,
        body=obj({"from": STRING}, optional=("from",)),
    ),
    ("patch", "/b/{username}/{number}/pin"): op(
        "Pin (build:write)",
        {"200": json_response("OK", ref("Build")), **NOT_FOUND},
        security=BEARER,
        parameters=PARAMS,
    ),
    ("patch", "/b/{username}/{number}/unpin"): op(
        "Unpin (build:write)",
        {"200": json_response("OK", ref("Build")), **NOT_FOUND},
        security=BEARER,
        parameters=PARAMS,
    ),
    ("get", "/b/{username}/{number}/tags"): op(
        "Tags (build:read; waived when public)",
        {"200": json_response("OK", list_of("Tag")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=PARAMS,
    ),
    ("post", "/b/{username}/{number}/tags"): op(
        "Add tags: the body is a JSON array of names (build:write)",
        {
            "201": json_response("The newly added tags", list_of("Tag")),
            "400": json_response("Body must be a JSON array of strings", ref("Message")),
            **NOT_FOUND,
        },
        security=BEARER,
        parameters=PARAMS,
        body={"type": "array", "items": STRING},
    ),
    ("get", "/b/{username}/{number}/tags/{name}"): op(
        "A tag (build:read; waived when public)",
        {"200": json_response("OK", ref("Tag")), **NOT_FOUND},
        security=OPTIONAL,
        parameters=TAG,
    ),
    ("delete", "/b/{username}/{number}/tags/{name}"): op(
        "Remove a tag (build:delete)",
        {"204": {"description": "Removed"}, **NOT_FOUND},
        security=BEARER,
        parameters=TAG,
    ),
}
