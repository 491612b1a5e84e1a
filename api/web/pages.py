"""The pages of the web interface (docs/web.md): sign-in, builds, a build.

Every handler is a `@page`: it gets the visitor's session (None when signed out), sends a
signed-out visitor of a page that needs one to the sign-in page, and renders what the domain
raises (NotFound, ValidationError, RequestError) as an HTML page with the API's status. What a
page shows is read with the API's own functions and access checks (api/builds.py
`readable_build`, marid/builds.py listings with their Viewer), as the user's own full access,
as with HTTP Basic credentials.

Forms: every POST carries a CSRF secret (the session's; for the sign-in form, a cookie of its
own that the form repeats) and is refused with 403 without it. Cookies are HttpOnly,
SameSite=Lax (Strict for the sign-in form's) and Secure when server.url is https.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import asyncpg
import jinja2
from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from marid import (
    apps,
    builds,
    crons,
    images,
    invites,
    jobs,
    keys,
    namespaces,
    objects,
    outbound,
    output,
    scopes,
    sessions,
    tokens,
    users,
    variables,
    webhooks,
)
from marid import submit as submitting
from marid.api import images as images_api
from marid.api import invites as invites_api
from marid.api import objects as objects_api
from marid.api import uploads
from marid.api.artifacts import (
    artifact_named,
    artifact_rows,
    download,
    object_rows,
    variable_rows,
)
from marid.api.auth import ANONYMOUS, Caller, login, session_of
from marid.api.builds import (
    Loaded,
    check_submission,
    kill,
    pin,
    readable_build,
    restart,
    submit_checked,
    tag,
    usable_build,
)
from marid.api.http import api_url, path_id, url_path
from marid.api.jobs import output_from, plain, start_offset, stream
from marid.api.keys import BLOBS, CIPHER, CONFIG, POOL, SESSION_COOKIE
from marid.api.namespaces import load_namespace
from marid.api.resources import announce, readable, usable
from marid.api.uploads import Upload
from marid.api.web import ansi
from marid.api.webhooks import usable_namespace, usable_webhook
from marid.builds import Build, Filters, Listing, Viewer
from marid.crons import CronForm
from marid.jobs import Job
from marid.keys import KeyForm
from marid.listing import Listing as ResourceListing
from marid.manifest import ManifestLimits
from marid.namespaces import Namespace
from marid.sessions import Session
from marid.users import User
from marid.validation import Body, Errors, NotFound, RequestError, ValidationError
from marid.variables import VariableForm
from marid.webhooks import WebhookForm

TEMPLATES = web.AppKey("web_templates", jinja2.Environment)
SIGNIN_COOKIE = "marid_signin"  # the sign-in form's CSRF secret (double submit)
PAGE_SIZE = 25
MAX_FORM = 64 * 1024  # bytes of a urlencoded form
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
        "object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# Status shapes beside the colours (docs/web.md §3): readable without telling colours apart.
STATUS_SYMBOLS = {
    "queued": "○",
    "running": "◔",
    "passed": "✔",
    "passed_with_failures": "✔",
    "failed": "✘",
    "killed": "■",
    "timed_out": "⌛",
}
STATUS_LABELS = {"passed_with_failures": "passed with failures", "timed_out": "timed out"}

routes = web.RouteTableDef()


class ResourceKind(Protocol):
    """A resource module of marid/ (variables, keys): listed, rendered, fetched, deleted."""

    count: Any
    page: Any
    to_json: Any
    get: Any
    delete: Any


Handler = Callable[[web.Request, Session | None], Awaitable[web.StreamResponse]]


def add_filters(env: jinja2.Environment) -> None:
    env.filters["duration"] = duration
    env.filters["ago"] = ago
    env.filters["until"] = until
    env.filters["segment"] = jobs.url_segment
    env.filters["filesize"] = filesize
    env.filters["artifact_path"] = url_path
    env.globals["STATUS_SYMBOLS"] = STATUS_SYMBOLS
    env.globals["STATUS_LABELS"] = STATUS_LABELS


def duration(start: datetime | None, end: datetime | None = None) -> str:
    """`1h 2m`, `3m 4s`, `5s` from start to end (or now); empty without a start."""
    if start is None:
        return ""
    seconds = int(((end or datetime.now(UTC)) - start).total_seconds())
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, seconds = divmod(rest, 60)
    if hours >= 48:
        return f"{hours // 24}d {hours % 24}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"


def filesize(size: int | None) -> str:
    """`512 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB`."""
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def until(moment: datetime) -> str:
    """`in 3m 4s` (or `due` once it has passed)."""
    if moment <= datetime.now(UTC):
        return "due"
    return f"in {duration(datetime.now(UTC), moment)}"


def ago(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return f"{duration(moment)} ago"


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    session: Session | None = context.pop("session", None)
    html = (
        request.config_dict[TEMPLATES]
        .get_template(template)
        .render(
            user=session.user if session else None,
            csrf=session.csrf if session else "",
            path=request.path,
            static=lambda name: str(request.app.router["static"].url_for(filename=name)),
            **context,
        )
    )
    response = web.Response(text=html, content_type="text/html", status=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def redirect(location: str) -> web.Response:
    response = web.Response(status=303, headers={"Location": location})
    response.headers.update(SECURITY_HEADERS)
    return response


def error_page(
    request: web.Request, session: Session | None, status: int, title: str, message: str
) -> web.Response:
    return render(request, "error.html", status, session=session, title=title, message=message)


def not_found(request: web.Request, session: Session | None) -> web.Response:
    return error_page(
        request, session, 404, "Not found", "There is nothing here, or nothing you may see."
    )


def page(signed_in: bool = True) -> Callable[[Handler], Callable[[web.Request], Any]]:
    """A page handler: `signed_in` pages send signed-out visitors to the sign-in page; what
    the domain raises becomes an HTML page."""

    def decorate(handler: Handler) -> Callable[[web.Request], Any]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            session = await session_of(request)
            if signed_in and session is None:
                return redirect(f"/signin?{urlencode({'next': request.path_qs})}")
            try:
                return await handler(request, session)
            except NotFound:
                return not_found(request, session)
            except ValidationError as exc:
                lines = [f"{field}: {m}" for field, ms in exc.errors.items() for m in ms]
                return error_page(request, session, 400, "Bad request", "; ".join(lines))
            except RequestError as exc:
                return error_page(request, session, exc.status, "Request refused", exc.message)

        wrapped.__name__ = handler.__name__
        wrapped.__doc__ = handler.__doc__
        return wrapped

    return decorate


Form = MultiDictProxy[str]
FormHandler = Callable[[web.Request, Session, Form], Awaitable[web.StreamResponse]]


def form_action(handler: FormHandler) -> Callable[[web.Request], Any]:
    """A signed-in form's POST: the urlencoded form is read and its CSRF token checked (403
    without the session's) before `handler` runs; the rest as `page`."""

    async def checked(request: web.Request, session: Session | None) -> web.StreamResponse:
        assert session is not None
        form = await read_form(request)
        if not sessions.csrf_matches(session, form.get("csrf")):
            return csrf_refused(request, session)
        return await handler(request, session, form)

    checked.__name__ = handler.__name__
    checked.__doc__ = handler.__doc__
    return page()(checked)


async def read_form(request: web.Request) -> MultiDictProxy[str]:
    """A urlencoded form body of at most MAX_FORM bytes (RequestError otherwise)."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise RequestError("Forms must be sent as application/x-www-form-urlencoded", 415)
    if request.content_length is not None and request.content_length > MAX_FORM:
        raise RequestError("The form is too large", 413)
    body = await request.content.read(MAX_FORM + 1)
    if len(body) > MAX_FORM:
        raise RequestError("The form is too large", 413)
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise RequestError("The form is not UTF-8 text", 400) from None
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, max_num_fields=100)
    except ValueError:
        raise RequestError("The form has too many fields", 400) from None
    if any("\x00" in key or "\x00" in value for key, value in pairs):
        raise RequestError("Form fields must not contain NUL characters", 400)
    return MultiDictProxy(MultiDict(pairs))


def csrf_refused(request: web.Request, session: Session | None) -> web.Response:
    return error_page(
        request,
        session,
        403,
        "Form refused",
        "The form's security token is missing or stale. Reload the page and send it again.",
    )


def _secure(request: web.Request) -> bool:
    return urlsplit(request.config_dict[CONFIG].server.url).scheme == "https"


def _local(target: str | None) -> str:
    """`target` when it is a path of this site (no scheme, host or `//`), else /builds."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/builds"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/builds"
    return target


# --- signing in and out ---------------------------------------------------------------------


@routes.get("/")
@page(signed_in=False)
async def home(request: web.Request, session: Session | None) -> web.StreamResponse:
    return redirect("/builds" if session else "/signin")


def _signin_page(
    request: web.Request, status: int = 200, error: str = "", username: str = ""
) -> web.Response:
    secret = request.cookies.get(SIGNIN_COOKIE) or secrets.token_urlsafe(32)
    response = render(
        request,
        "signin.html",
        status,
        signin_csrf=secret,
        error=error,
        username=username,
        next=_local(request.query.get("next")),
    )
    response.set_cookie(
        SIGNIN_COOKIE,
        secret,
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
        path="/signin",
        max_age=3600,
    )
    return response


@routes.get("/signin")
@page(signed_in=False)
async def signin_form(request: web.Request, session: Session | None) -> web.StreamResponse:
    if session is not None:
        return redirect(_local(request.query.get("next")))
    return _signin_page(request)


@routes.post("/signin")
@page(signed_in=False)
async def signin(request: web.Request, session: Session | None) -> web.StreamResponse:
    form = await read_form(request)
    expected = request.cookies.get(SIGNIN_COOKIE)
    sent = form.get("csrf")
    if not expected or not sent or not secrets.compare_digest(expected, sent):
        return csrf_refused(request, session)
    username, password = form.get("username", ""), form.get("password", "")
    try:
        user = await login(request, username, password) if username and password else None
    except RequestError as exc:  # too many failed sign-ins
        return _signin_page(request, exc.status, exc.message, username)
    if user is None:
        return _signin_page(request, 400, "Wrong username or password", username)
    async with request.config_dict[POOL].acquire() as conn:
        value, _ = await sessions.create(conn, user, request.headers.get("User-Agent", ""))
        await sessions.forget_expired(conn)
    response = redirect(_local(form.get("next")))
    response.set_cookie(
        SESSION_COOKIE,
        value,
        httponly=True,
        samesite="Lax",
        secure=_secure(request),
        path="/",
        max_age=int(sessions.LIFETIME.total_seconds()),
    )
    response.del_cookie(SIGNIN_COOKIE, path="/signin")
    return response


@routes.post("/signout")
@page(signed_in=False)
async def signout(request: web.Request, session: Session | None) -> web.StreamResponse:
    form = await read_form(request)
    if session is None:
        return redirect("/signin")
    if not sessions.csrf_matches(session, form.get("csrf")):
        return csrf_refused(request, session)
    async with request.config_dict[POOL].acquire() as conn:
        await sessions.end(conn, session.id)
    response = redirect("/signin")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


# --- builds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildRow:
    """A build as a listing shows it."""

    build: Build
    owner: User
    namespace: Namespace | None

    @property
    def path(self) -> str:
        return f"/b/{quote(self.owner.username)}/{self.build.number}"

    @property
    def title(self) -> str:
        comment = self.build.trigger_comment.strip().splitlines()
        return comment[0] if comment else f"Build #{self.build.number}"


def _filters(request: web.Request) -> tuple[Filters, dict[str, str]]:
    """The listing's filters from the query, and what the filter form shows."""
    names = ("status", "tag", "search", "namespace")
    shown = {name: request.query.get(name, "").strip() for name in names}
    status = shown["status"] if shown["status"] in builds.STATUSES else ""
    shown["status"] = status
    filters = Filters(tag=shown["tag"] or None, search=shown["search"] or None,
                      status=status or None)  # fmt: skip
    return filters, shown


def _page_number(request: web.Request, total: int) -> tuple[int, int]:
    last = max(1, -(-total // PAGE_SIZE))
    try:
        number = int(request.query.get("page", "1"))
    except ValueError:
        number = 1
    return min(max(number, 1), last), last


def _pager(request: web.Request, total: int) -> tuple[int, dict[str, Any]]:
    """The page number `?page=` asks for among `total` items, and the template's pager
    context (`page`, `last`, `previous_url`, `next_url`)."""
    number, last = _page_number(request, total)
    return number, {
        "page": number,
        "last": last,
        "previous_url": _page_link(request, number - 1) if number > 1 else "",
        "next_url": _page_link(request, number + 1) if number < last else "",
    }


def _page_link(request: web.Request, number: int) -> str:
    query = {k: v for k, v in request.query.items() if k != "page" and v}
    return f"{request.path}?{urlencode({**query, 'page': str(number)})}"


async def _listing(conn: asyncpg.Connection, user: User, namespace: str) -> Listing | None:
    """The user's builds, those of `namespace` (`owner/path`) alone when it is given; None
    when it names no namespace (the listing is then empty, whether the namespace is missing
    or hidden: the user's own listing holds only what they may see either way)."""
    if not namespace:
        return Listing(visible_to=user.id)
    owner, _, path = namespace.strip("/").partition("/")
    if not path or path.count("/") >= namespaces.MAX_DEPTH:
        return None
    found = await namespaces.get_by_path(conn, owner, path)
    return Listing(visible_to=user.id, namespace_id=found.id) if found else None


@routes.get("/builds")
@page()
async def builds_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """The builds the user may see: their own, and those of namespaces they belong to."""
    assert session is not None
    user = session.user
    filters, shown = _filters(request)
    viewer = Viewer(user.id, may_read=True)
    async with request.config_dict[POOL].acquire() as conn:
        listing = await _listing(conn, user, shown["namespace"])
        total = await builds.count(conn, listing, filters, viewer) if listing else 0
        number, pager = _pager(request, total)
        found = (
            await builds.page(conn, listing, filters, viewer, (number - 1) * PAGE_SIZE, PAGE_SIZE)
            if listing
            else []
        )
        found = await builds.with_pending(conn, found)
        owners = await users.by_ids(conn, {b.user_id for b in found})
        spaces = await namespaces.by_ids(conn, {b.namespace_id for b in found if b.namespace_id})
    rows = [BuildRow(b, owners[b.user_id], spaces.get(b.namespace_id or 0)) for b in found]
    return render(
        request,
        "builds.html",
        session=session,
        rows=rows,
        total=total,
        filters=shown,
        statuses=builds.STATUSES,
        **pager,
    )


BUILD_PATH = r"/b/{username}/{number:\d+}"
SHOWN_PARTS = 100  # artifacts and objects a build's page lists; the API has them all


@routes.get(BUILD_PATH)
@page(signed_in=False)
async def build_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """A build: status, stages and jobs; signed out, only builds of public namespaces."""
    caller = Caller(session.user) if session else ANONYMOUS
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
        build = (await builds.with_pending(conn, [loaded.build]))[0]
        found = await jobs.list_for(conn, build.id)
        artifacts = await artifact_rows(conn, build.id, "", 0, SHOWN_PARTS)
        declared = await object_rows(conn, build.id, "", 0, SHOWN_PARTS)
        exported = await variable_rows(conn, build.id)
        may_use = session is not None and loaded.rights.use
        resumable = may_use and await submitting.workspace_kept(conn, build.id)
    row = BuildRow(build, loaded.owner, loaded.namespace)
    return render(
        request,
        "build.html",
        session=session,
        row=row,
        build=build,
        jobs=found,
        job_names={job.id: job.name for job in found},
        artifacts=artifacts,
        objects=declared,
        variables=exported,
        shown_parts=SHOWN_PARTS,
        may_use=may_use,
        resumable=resumable,
    )


@routes.get(BUILD_PATH + "/artifacts/{name:.+}")
@page(signed_in=False)
async def artifact(request: web.Request, session: Session | None) -> web.StreamResponse:
    """An artifact's content, as a download (never shown as a page of this site)."""
    caller = Caller(session.user) if session else ANONYMOUS
    async with request.config_dict[POOL].acquire() as conn:
        loaded = await readable_build(conn, request, caller)
        found = await artifact_named(conn, loaded.build.id, request.match_info["name"])
    if found["blob_key"] is None or found["deleted_at"] is not None:
        raise NotFound()
    filename = quote(found["name"].rsplit("/", 1)[-1], safe="")
    disposition = {"Content-Disposition": f"attachment; filename*=UTF-8''{filename}"}
    return await download(request, found["blob_key"], found["size"], disposition)


# --- OAuth apps ----------------------------------------------------------------------------

APP_FORM = {"name": "", "description": "", "homepage_uri": "", "redirect_uri": ""}


async def _apps_page(
    request: web.Request,
    session: Session,
    status: int = 200,
    created: tuple[str, str] | None = None,
    form: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        found = await apps.list_for(conn, session.user)
    return render(
        request,
        "apps.html",
        status,
        session=session,
        apps=found,
        created=created,
        form=form or APP_FORM,
        errors=errors or {},
    )


@routes.get("/apps")
@page()
async def apps_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """Your OAuth apps (docs/api.md §23) and a form to register one."""
    assert session is not None
    return await _apps_page(request, session)


@routes.post("/apps")
@form_action
async def register_app(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Register an app with the API's AppForm; its client secret is in this answer only."""
    shown = {name: form.get(name, "").strip() for name in APP_FORM}
    try:
        parsed = apps.AppForm.parse(Body(dict(shown)))
        async with request.config_dict[POOL].acquire() as conn:
            app, secret = await apps.create(conn, session.user, parsed)
    except ValidationError as exc:
        return await _apps_page(request, session, 400, form=shown, errors=exc.errors)
    return await _apps_page(request, session, 201, created=(app.client_id, secret))


@routes.post("/apps/{client_id}/delete")
@form_action
async def delete_app(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Delete an app: the tokens issued through it are revoked with it."""
    async with request.config_dict[POOL].acquire() as conn:
        if not await apps.delete(conn, session.user, request.match_info["client_id"]):
            raise NotFound()
    return redirect("/apps")


# --- cron jobs ----------------------------------------------------------------------------

CRON_FIELDS = ("name", "schedule", "timezone", "manifest")


async def _crons_page(
    request: web.Request,
    session: Session,
    status: int = 200,
    form: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
) -> web.Response:
    search = request.query.get("search", "").strip()
    listing = ResourceListing(visible_to=session.user.id)
    async with request.config_dict[POOL].acquire() as conn:
        total = await crons.count(conn, listing, search)
        number, pager = _pager(request, total)
        found = await crons.page(conn, listing, search, (number - 1) * PAGE_SIZE, PAGE_SIZE)
        spaces = await namespaces.by_ids(conn, {c.namespace_id for c in found if c.namespace_id})
    return render(
        request,
        "crons.html",
        status,
        session=session,
        rows=[(c, spaces.get(c.namespace_id or 0)) for c in found],
        total=total,
        search=search,
        **pager,
        form=form or {"name": "", "schedule": "daily", "timezone": "UTC", "manifest": ""},
        errors=errors or {},
    )


@routes.get("/cron")
@page()
async def crons_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """Your cron jobs and your namespaces', with their next run; a form for a new one."""
    assert session is not None
    return await _crons_page(request, session)


@routes.post("/cron")
@form_action
async def create_cron(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Create a cron job with the API's CronForm and rules."""
    shown = {name: form.get(name, "") for name in CRON_FIELDS}
    body = Body({**shown, "manifest": shown["manifest"].replace("\r\n", "\n")})
    limits = ManifestLimits.from_config(request.config_dict[CONFIG])
    try:
        async with request.config_dict[POOL].acquire() as conn, conn.transaction():
            cron = await crons.create(
                conn, session.user, CronForm.parse(body, creating=True), limits, crons.now()
            )
            await announce(conn, request, "cron", "created", cron, crons.to_json)
    except ValidationError as exc:
        return await _crons_page(request, session, 400, shown, exc.errors)
    return redirect(f"/cron/{cron.id}")


@routes.get(r"/cron/{id:\d+}")
@page()
async def cron_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """A cron job: schedule, next and last run, manifest, the builds it made (each as
    readable)."""
    assert session is not None
    caller = Caller(session.user)
    async with request.config_dict[POOL].acquire() as conn:
        cron = await readable(conn, request, caller, crons.get, "cron:read")
        listing, viewer = Listing(cron_id=cron.id), Viewer(session.user.id, may_read=True)
        made = await builds.with_pending(
            conn, await builds.page(conn, listing, Filters(), viewer, 0, PAGE_SIZE)
        )
        people = await users.by_ids(conn, {cron.author_id} | {b.user_id for b in made})
        ns = await namespaces.get(conn, cron.namespace_id) if cron.namespace_id else None
    return render(
        request,
        "cron.html",
        session=session,
        cron=cron,
        author=people[cron.author_id],
        namespace=ns,
        rows=[BuildRow(b, people[b.user_id], ns) for b in made],
        may_delete=crons.may_delete(cron, session.user),
    )


@routes.post(r"/cron/{id:\d+}/delete")
@form_action
async def delete_cron(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        cron = await usable(conn, request, session.user, crons.get)
        if not crons.may_delete(cron, session.user):
            raise NotFound()
        await announce(conn, request, "cron", "deleted", cron, crons.to_json)
        await crons.delete(conn, cron)
    return redirect("/cron")


# --- personal access tokens ----------------------------------------------------------------


async def _tokens_page(
    request: web.Request,
    session: Session,
    status: int = 200,
    created: str = "",
    form: dict[str, Any] | None = None,
    errors: dict[str, list[str]] | None = None,
) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        found = await tokens.list_for(conn, session.user)
    return render(
        request,
        "tokens.html",
        status,
        session=session,
        tokens=found,
        created=created,
        # `runner` is of use to administrators alone (docs/api.md §28)
        resources=[
            resource
            for resource in scopes.RESOURCES
            if resource != "runner" or request.config_dict[CONFIG].is_admin(session.user.username)
        ],
        permissions=scopes.PERMISSIONS,
        form=form or {"name": "", "scope": set()},
        errors=errors or {},
    )


@routes.get("/tokens")
@page()
async def tokens_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """Your personal access tokens (never their values) and a form for a new one."""
    assert session is not None
    return await _tokens_page(request, session)


@routes.post("/tokens")
@form_action
async def create_token(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Create a token; its value is in this answer only (not stored, never shown again)."""
    name = form.get("name", "").strip()
    chosen = {item for item in form.getall("scope", []) if ":" in item}
    by_resource: dict[str, list[str]] = {}
    for item in sorted(chosen):
        resource, _, permission = item.partition(":")
        by_resource.setdefault(resource, []).append(permission)
    text = " ".join(f"{r}:{','.join(ps)}" for r, ps in by_resource.items())
    errors = Errors()
    scope = tokens.check_new_token(name, text, errors)
    if not chosen and not errors.has("scope"):
        errors.add("scope", "Choose at least one permission")
    try:
        errors.raise_if_any()
        assert scope is not None
        async with request.config_dict[POOL].acquire() as conn:
            _, value = await tokens.create(conn, session.user, name, scope)
    except ValidationError as exc:
        kept = {"name": name, "scope": chosen}
        return await _tokens_page(request, session, 400, form=kept, errors=exc.errors)
    return await _tokens_page(request, session, 201, created=value)


@routes.post(r"/tokens/{id:\d+}/delete")
@form_action
async def delete_token(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    async with request.config_dict[POOL].acquire() as conn:
        if not await tokens.delete(conn, session.user, path_id(request)):
            raise NotFound()
    return redirect("/tokens")


# --- namespaces -------------------------------------------------------------------------

NAMESPACE_PATH = r"/n/{username}/{path:[A-Za-z0-9]+(?:/[A-Za-z0-9]+)*}"


@routes.get("/namespaces")
@page()
async def namespaces_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """The namespaces you own or collaborate in, as GET /api/namespaces lists them."""
    assert session is not None
    search = request.query.get("search", "").strip()
    async with request.config_dict[POOL].acquire() as conn:
        total = await namespaces.count_mine(conn, session.user, search)
        number, pager = _pager(request, total)
        found = await namespaces.list_mine(
            conn, session.user, search, (number - 1) * PAGE_SIZE, PAGE_SIZE
        )
        latest = await builds.latest_by_namespace(conn, [ns.id for ns in found])
    return render(
        request,
        "namespaces.html",
        session=session,
        rows=[(ns, latest.get(ns.id)) for ns in found],
        total=total,
        search=search,
        **pager,
    )


@routes.get(NAMESPACE_PATH)
@page(signed_in=False)
async def namespace_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """A namespace: what it is, its sub-namespaces, latest builds and, for its owner, its
    collaborators and pending invites; readable as GET /api/n/... is (public ones signed out
    too)."""
    return await _namespace_page(request, session)


async def _namespace_page(
    request: web.Request,
    session: Session | None,
    status: int = 200,
    handle: str = "",
    errors: dict[str, list[str]] | None = None,
) -> web.Response:
    user = session.user if session else None
    async with request.config_dict[POOL].acquire() as conn:
        ns = await load_namespace(conn, request)
        rights = await namespaces.rights(conn, user, ns)
        (Caller(user) if user else ANONYMOUS).check_read(rights, "namespace:read")
        children = await namespaces.list_children(conn, ns, "", 0, SHOWN_PARTS)
        listing, viewer = Listing(namespace_id=ns.id), Viewer(user.id if user else None, True)
        recent = await builds.with_pending(
            conn, await builds.page(conn, listing, Filters(), viewer, 0, PAGE_SIZE)
        )
        people = await invites.collaborators(conn, ns) if rights.admin else []
        pending = await invites.list_for_root(conn, ns) if rights.admin else []
        shown_invites = await invites.to_json(conn, pending, api_url(request))
        owners = await users.by_ids(conn, {b.user_id for b in recent})
    rows = [BuildRow(b, owners[b.user_id], ns) for b in recent]
    return render(
        request,
        "namespace.html",
        status,
        session=session,
        ns=ns,
        rights=rights,
        children=children,
        rows=rows,
        collaborators=people,
        invites=shown_invites,
        handle=handle,
        errors=errors or {},
    )


async def _admin_action(
    request: web.Request,
    session: Session,
    form: Form,
    act: Callable[[asyncpg.Connection, Namespace, MultiDictProxy[str]], Awaitable[object]],
) -> web.StreamResponse:
    """A form's action on a namespace the user administers (its owner), then its page; a
    ValidationError shows the page again with the messages beside the invite field."""
    try:
        async with request.config_dict[POOL].acquire() as conn, conn.transaction():
            ns = await load_namespace(conn, request)
            if not (await namespaces.rights(conn, session.user, ns)).admin:
                raise NotFound()
            await act(conn, ns, form)
    except ValidationError as exc:
        return await _namespace_page(request, session, 400, form.get("handle", ""), exc.errors)
    except RequestError as exc:  # an invite the domain refuses (no such user, …)
        errors = {"handle": [exc.message]}
        return await _namespace_page(request, session, exc.status, form.get("handle", ""), errors)
    return redirect(f"/n/{quote(ns.owner.username)}/{ns.path}")


@routes.post(NAMESPACE_PATH + "/-/invites")
@form_action
async def invite(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Invite somebody (username or email) to the namespace's tree."""
    user = session.user

    async def send(conn: asyncpg.Connection, ns: Namespace, form: MultiDictProxy[str]) -> None:
        handle = form.get("handle", "").strip()
        if not handle:
            raise ValidationError({"handle": ["Username or email field required"]})
        await invites_api.send(conn, request, ns, user, handle)

    return await _admin_action(request, session, form, send)


@routes.post(NAMESPACE_PATH + "/-/collaborators/{handle}/delete")
@form_action
async def remove_collaborator(
    request: web.Request, session: Session, form: Form
) -> web.StreamResponse:
    """Remove a collaborator from the namespace's tree (their own secrets stay theirs)."""

    async def remove(conn: asyncpg.Connection, ns: Namespace, form: MultiDictProxy[str]) -> None:
        await invites.remove_collaborator(conn, ns, request.match_info["handle"])

    return await _admin_action(request, session, form, remove)


@routes.get("/invites")
@page()
async def invites_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """The invites sent to you, to accept or decline."""
    assert session is not None
    async with request.config_dict[POOL].acquire() as conn:
        found = await invites.list_for_invitee(conn, session.user)
        shown = await invites.to_json(conn, found, api_url(request))
    return render(request, "invites.html", session=session, invites=shown)


async def _invite_action(
    request: web.Request,
    session: Session,
    form: Form,
    act: Callable[[asyncpg.Connection, web.Request, User], Awaitable[object]],
    back: str,
) -> web.StreamResponse:
    """An invite's action, then `back` (or the form's own local `back`, when it has one)."""
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        await act(conn, request, session.user)
    return redirect(_local(form.get("back")) if form.get("back") else back)


@routes.post(r"/invites/{id:\d+}/accept")
@form_action
async def accept_invite(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    return await _invite_action(request, session, form, invites_api.accept, "/namespaces")


@routes.post(r"/invites/{id:\d+}/delete")
@form_action
async def delete_invite(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Decline an invite sent to you, or withdraw one you sent."""
    return await _invite_action(request, session, form, invites_api.withdraw_or_reject, "/invites")


# --- webhooks ---------------------------------------------------------------------------

HOOKS_PATH = NAMESPACE_PATH + "/-/webhooks"
HOOK_FORM = {"payload_url": "", "secret": "", "ssl": "on", "active": "on"}


async def _webhooks_page(
    request: web.Request,
    session: Session,
    status: int = 200,
    form: dict[str, str] | None = None,
    events: set[str] | None = None,
    errors: dict[str, list[str]] | None = None,
) -> web.Response:
    async with request.config_dict[POOL].acquire() as conn:
        ns = await usable_namespace(conn, request, session.user)
        found = await webhooks.in_namespace(conn, ns.id)
        last = await webhooks.last_responses(conn, [hook.id for hook in found])
    return render(
        request,
        "webhooks.html",
        status,
        session=session,
        ns=ns,
        hooks=[(hook, last.get(hook.id)) for hook in found],
        all_events=webhooks.EVENTS,
        form=form or HOOK_FORM,
        chosen=events if events is not None else set(),
        errors=errors or {},
    )


@routes.get(HOOKS_PATH)
@page()
async def webhooks_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """A namespace's webhooks with their last response, for its owner and collaborators."""
    assert session is not None
    return await _webhooks_page(request, session)


@routes.post(HOOKS_PATH)
@form_action
async def create_webhook(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Create a webhook with the API's WebhookForm and outbound policy."""
    shown = {name: form.get(name, "") for name in HOOK_FORM}
    chosen = {e for e in form.getall("events", []) if e in webhooks.EVENTS}
    body = Body(
        {
            "payload_url": shown["payload_url"].strip(),
            "secret": shown["secret"] or None,
            "ssl": shown["ssl"] == "on",
            "active": shown["active"] == "on",
            "events": sorted(chosen) or None,
        }
    )
    policy = outbound.Policy.from_config(request.config_dict[CONFIG])
    try:
        async with request.config_dict[POOL].acquire() as conn, conn.transaction():
            ns = await usable_namespace(conn, request, session.user)
            parsed = WebhookForm.parse(body, policy, None)
            await webhooks.create(conn, request.config_dict[CIPHER], session.user, ns, parsed)
    except ValidationError as exc:
        kept = {**shown, "secret": ""}  # a secret is never sent back
        return await _webhooks_page(request, session, 400, kept, chosen, exc.errors)
    return redirect(request.path)


@routes.get(HOOKS_PATH + r"/{id:\d+}")
@page()
async def webhook_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """A webhook and its delivery log (every attempt, newest first)."""
    assert session is not None
    async with request.config_dict[POOL].acquire() as conn:
        hook, ns = await usable_webhook(conn, request, session.user)
        total = await webhooks.count_attempts(conn, hook)
        number, pager = _pager(request, total)
        found = await webhooks.attempts(conn, hook, (number - 1) * PAGE_SIZE, PAGE_SIZE)
    return render(
        request,
        "webhook.html",
        session=session,
        ns=ns,
        hook=hook,
        attempts=found,
        total=total,
        **pager,
    )


@routes.post(HOOKS_PATH + r"/{id:\d+}/delete")
@form_action
async def delete_webhook(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        hook, _ = await usable_webhook(conn, request, session.user)
        await webhooks.delete(conn, hook)
    return redirect(request.path.rsplit("/", 2)[0])


# --- submitting, killing, pinning ----------------------------------------------------------

_TAG_SPLIT = re.compile(r"[\s,]+")


def _new_build_page(
    request: web.Request,
    session: Session,
    status: int = 200,
    form: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
) -> web.Response:
    return render(
        request,
        "new_build.html",
        status,
        session=session,
        form=form or {"manifest": "", "comment": "", "tags": ""},
        errors=errors or {},
    )


@routes.get("/builds/new")
@page()
async def new_build_form(request: web.Request, session: Session | None) -> web.StreamResponse:
    assert session is not None
    return _new_build_page(request, session)


@routes.post("/builds/new")
@form_action
async def new_build(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Submit a build from the form; its errors are shown beside the fields they are about."""
    shown = {name: form.get(name, "") for name in ("manifest", "comment", "tags")}
    tags = [tag for tag in _TAG_SPLIT.split(shown["tags"].strip()) if tag]
    config = request.config_dict[CONFIG]
    try:
        async with request.config_dict[POOL].acquire() as conn, conn.transaction():
            sub = await check_submission(
                conn, config, session.user, shown["manifest"].replace("\r\n", "\n"),
                shown["comment"], tags, Errors(),
            )  # fmt: skip
            body = await submit_checked(conn, sub, api_url(request))
    except ValidationError as exc:
        return _new_build_page(request, session, 400, shown, exc.errors)
    return redirect(f"/b/{quote(sub.owner.username)}/{body['number']}")


async def _build_action(
    request: web.Request,
    session: Session,
    act: Callable[[asyncpg.Connection, Loaded], Awaitable[object]],
) -> web.StreamResponse:
    """A form's action on a build the user may use (owner or collaborator), then its page."""
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        loaded = await usable_build(conn, request, session.user)
        await act(conn, loaded)
    return redirect(loaded.url_path)


@routes.post(BUILD_PATH + "/kill")
@form_action
async def kill_build(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    return await _build_action(
        request, session, lambda conn, loaded: kill(conn, loaded, api_url(request))
    )


@routes.post(BUILD_PATH + "/restart")
@form_action
async def restart_build(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Restart a build the user may use, whole or, with the form's `from`, resumed from that
    job (docs/api.md §27); then the new build's page."""
    body = Body({"from": form["from"]} if form.get("from") else {})
    config = request.config_dict[CONFIG]
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        loaded = await usable_build(conn, request, session.user)
        made = await restart(conn, config, loaded, session.user, body, api_url(request))
    return redirect(f"{loaded.url_path.rsplit('/', 1)[0]}/{made['number']}")


@routes.post(BUILD_PATH + "/tags")
@form_action
async def tag_build(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Add the form's tags (separated by spaces or commas) to a build the user may use."""
    user = session.user
    names = [t for t in _TAG_SPLIT.split(form.get("tags", "").strip()) if t]
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        loaded = await usable_build(conn, request, user)
        if names:
            await tag(conn, request, user, loaded, names)
    return redirect(loaded.url_path)


@routes.post(BUILD_PATH + "/tags/{name:.+}/delete")
@form_action
async def untag_build(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    async def untag(conn: asyncpg.Connection, loaded: Loaded) -> None:
        if not await builds.delete_tag(conn, loaded.build, request.match_info["name"]):
            raise NotFound()

    return await _build_action(request, session, untag)


@routes.post(BUILD_PATH + "/pin")
@form_action
async def pin_build(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    blobs = request.config_dict[BLOBS]
    return await _build_action(
        request, session, lambda conn, loaded: pin(conn, loaded, True, blobs, api_url(request))
    )


@routes.post(BUILD_PATH + "/unpin")
@form_action
async def unpin_build(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    blobs = request.config_dict[BLOBS]
    return await _build_action(
        request, session, lambda conn, loaded: pin(conn, loaded, False, blobs, api_url(request))
    )


# --- variables --------------------------------------------------------------------------


async def _resources_page(
    request: web.Request,
    session: Session,
    template: str,
    kind: ResourceKind,
    form: dict[str, str],
    errors: dict[str, list[str]] | None = None,
    status: int = 200,
) -> web.Response:
    """A page listing the user's resources of `kind` (theirs and their namespaces', as the
    API's GET /<resources>), searchable, with a form for a new one."""
    search = request.query.get("search", "").strip()
    listing = ResourceListing(visible_to=session.user.id)
    async with request.config_dict[POOL].acquire() as conn:
        total = await kind.count(conn, listing, search)
        number, pager = _pager(request, total)
        found = await kind.page(conn, listing, search, (number - 1) * PAGE_SIZE, PAGE_SIZE)
        shown = await kind.to_json(conn, found, api_url(request))
    return render(
        request,
        template,
        status,
        session=session,
        rows=shown,
        total=total,
        search=search,
        **pager,
        form=form,
        errors=errors or {},
    )


async def _delete_resource(
    request: web.Request, session: Session, kind: ResourceKind, event: str, back: str
) -> web.StreamResponse:
    """Delete the resource of the URL if the user may change it (the API's `usable`), with
    the API's webhook event; then `back`."""
    async with request.config_dict[POOL].acquire() as conn, conn.transaction():
        found = await usable(conn, request, session.user, kind.get)
        await announce(conn, request, event, "deleted", found, kind.to_json)
        await kind.delete(conn, found)
    return redirect(back)


VARIABLE_FORM = {"key": "", "value": "", "namespace": "", "mask": ""}


@routes.get("/variables")
@page()
async def variables_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """Your variables and those of your namespaces, masked values shown as xxxxxx."""
    assert session is not None
    return await _resources_page(request, session, "variables.html", variables, VARIABLE_FORM)


@routes.post("/variables")
@form_action
async def create_variable(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Create a variable with the API's rules (VariableForm, variables.create)."""
    shown = {name: form.get(name, "") for name in ("key", "value", "namespace")}
    masked = form.get("mask") == "on"
    body = Body({**shown, "namespace": shown["namespace"].strip() or None, "mask": masked})
    try:
        async with request.config_dict[POOL].acquire() as conn, conn.transaction():
            created = await variables.create(
                conn, request.config_dict[CIPHER], session.user, VariableForm.parse(body)
            )
            await announce(conn, request, "variables", "created", created, variables.to_json)
    except ValidationError as exc:
        kept = {**shown, "value": "" if masked else shown["value"], "mask": "on" if masked else ""}
        return await _resources_page(
            request, session, "variables.html", variables, kept, exc.errors, 400
        )
    return redirect("/variables")


@routes.post(r"/variables/{id:\d+}/delete")
@form_action
async def delete_variable(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    return await _delete_resource(request, session, variables, "variables", "/variables")


# --- objects ------------------------------------------------------------------------------

OBJECT_FORM = {"name": "", "namespace": ""}


@routes.get("/objects")
@page()
async def objects_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """Your objects and your namespaces', with an upload form."""
    assert session is not None
    return await _resources_page(request, session, "objects.html", objects, OBJECT_FORM)


@routes.post("/objects")
@page()
async def upload_object(request: web.Request, session: Session | None) -> web.StreamResponse:
    """Upload an object from the form (multipart: csrf, name, namespace, file) through the
    API's own checks and storage."""
    max_size = request.config_dict[CONFIG].objects.max_size
    create = objects_api.create_from_upload
    return await _upload(request, session, OBJECT_FORM, max_size, create, "objects.html", objects)


async def _upload(
    request: web.Request,
    session: Session | None,
    fields: dict[str, str],
    max_size: int,
    create: Callable[[web.Request, User, Upload, None], Awaitable[object]],
    template: str,
    kind: ResourceKind,
) -> web.StreamResponse:
    """A multipart upload form (its CSRF token among the fields) handed to the API's own
    `create`; the listing page again with the messages, or the listing."""
    assert session is not None
    async with uploads.receive(request, (*fields, "csrf"), max_size) as upload:
        if not sessions.csrf_matches(session, upload.fields.get("csrf")):
            return csrf_refused(request, session)
        try:
            await create(request, session.user, upload, None)
        except ValidationError as exc:
            kept = {name: upload.fields.get(name, "") for name in fields}
            return await _resources_page(request, session, template, kind, kept, exc.errors, 400)
    return redirect(request.path)


@routes.get(r"/objects/{id:\d+}/download")
@page()
async def download_object(request: web.Request, session: Session | None) -> web.StreamResponse:
    """An object's content, as a download."""
    assert session is not None
    async with request.config_dict[POOL].acquire() as conn:
        found = await readable(conn, request, Caller(session.user), objects.get, "object:read")
    headers = {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(found.name)}"}
    store = request.config_dict[BLOBS]
    return await uploads.send_blob(request, store, found.blob_key, found.type, found.size, headers)


@routes.post(r"/objects/{id:\d+}/delete")
@form_action
async def delete_object(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    await objects_api.remove(request, session.user)
    return redirect("/objects")


# --- images -------------------------------------------------------------------------------

IMAGE_FORM = {"name": "", "namespace": "", "driver": "qemu"}


@routes.get("/images")
@page()
async def images_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """Your images and your namespaces' (qemu disks, docker archives), with an upload form."""
    assert session is not None
    return await _resources_page(request, session, "images.html", images, IMAGE_FORM)


@routes.post("/images")
@page()
async def upload_image(request: web.Request, session: Session | None) -> web.StreamResponse:
    """Upload an image from the form (multipart: csrf, name, namespace, driver, file) through
    the API's own checks and storage."""
    max_size = request.config_dict[CONFIG].images.max_size
    create = images_api.create_from_upload
    return await _upload(request, session, IMAGE_FORM, max_size, create, "images.html", images)


@routes.post(r"/images/{id:\d+}/delete")
@form_action
async def delete_image(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    await images_api.remove(request, session.user)
    return redirect("/images")


# --- SSH keys ------------------------------------------------------------------------------

KEY_FORM = {"name": "", "key": "", "config": "", "namespace": ""}


@routes.get("/keys")
@page()
async def keys_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """Your SSH keys and your namespaces' (never a private key), with a form for a new one."""
    assert session is not None
    return await _resources_page(request, session, "keys.html", keys, KEY_FORM)


@routes.post("/keys")
@form_action
async def create_key(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """Store a key with the API's KeyForm (the private key encrypted at rest)."""
    shown = {name: form.get(name, "") for name in KEY_FORM}
    data = {**shown, "namespace": shown["namespace"].strip() or None}
    try:
        parsed = await asyncio.to_thread(KeyForm.parse, Body(data))  # slow for RSA keys
        async with request.config_dict[POOL].acquire() as conn, conn.transaction():
            created = await keys.create(conn, request.config_dict[CIPHER], session.user, parsed)
            await announce(conn, request, "ssh_keys", "created", created, keys.to_json)
    except ValidationError as exc:
        kept = {**shown, "key": ""}  # a private key is never sent back
        return await _resources_page(request, session, "keys.html", keys, kept, exc.errors, 400)
    return redirect("/keys")


@routes.post(r"/keys/{id:\d+}/delete")
@form_action
async def delete_key(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    return await _delete_resource(request, session, keys, "ssh_keys", "/keys")


JOB = r"/b/{username}/{number:\d+}/jobs/{name}"
LOG_TAIL = 256 * 1024  # bytes of a job's log a page shows; the raw log has all of it
LOG_LINES = 5000  # and lines, at most


async def _readable_job(
    conn: asyncpg.Connection, request: web.Request, session: Session | None
) -> tuple[BuildRow, Job]:
    """The job of the URL, if its build is readable as the API's GET .../jobs/:name is."""
    caller = Caller(session.user) if session else ANONYMOUS
    loaded = await readable_build(conn, request, caller)
    job = await jobs.get_by_name(conn, loaded.build.id, request.match_info["name"], excerpt=False)
    if job is None:
        raise NotFound()
    return BuildRow(loaded.build, loaded.owner, loaded.namespace), job


@routes.get(JOB)
@page(signed_in=False)
async def job_page(request: web.Request, session: Session | None) -> web.StreamResponse:
    """A job and its log: the last LOG_TAIL bytes rendered (ANSI colours, numbered lines),
    then what it prints live (api/web/static/log.js, over `/live`)."""
    blobs = request.config_dict[BLOBS]
    async with request.config_dict[POOL].acquire() as conn:
        row, job = await _readable_job(conn, request, session)
        chunked = job.stored.text is None and job.stored.blob_key is None
        total = jobs.length(job, await jobs.live_total(conn, job) if chunked else 0)
        start = max(0, total - LOG_TAIL)
        pieces, _ = await output_from(conn if chunked else None, blobs, job, start)
    text = "".join(piece for _, piece in pieces)
    offset = pieces[-1][0] + output.byte_length(pieces[-1][1]) if pieces else start
    skipped = start > 0
    if skipped and "\n" in text:  # the first line shown whole
        cut = text.index("\n") + 1
        text, start = text[cut:], start + output.byte_length(text[:cut])
    if text.count("\n") > LOG_LINES:  # many short lines: their markup would outweigh them
        cut = len(text)
        for _ in range(LOG_LINES + 1):
            cut = text.rindex("\n", 0, cut)
        text, start, skipped = text[cut + 1 :], start + output.byte_length(text[: cut + 1]), True
    ended = job.status in builds.FINAL
    if not ended and text and not text.endswith("\n"):
        # The unfinished last line comes again over the stream, whole with what follows.
        cut = text.rfind("\n") + 1
        offset -= output.byte_length(text[cut:])
        text = text[:cut]
    lines = ansi.render(text)
    return render(
        request,
        "job.html",
        session=session,
        row=row,
        build=row.build,
        job=job,
        lines=lines,
        skipped=start if skipped else 0,
        offset=offset,
        ended=ended,
        job_path=f"{row.path}/jobs/{jobs.url_segment(job.name)}",
    )


@routes.get(JOB + "/raw")
@page(signed_in=False)
async def job_raw(request: web.Request, session: Session | None) -> web.StreamResponse:
    """The whole log as text, as the API's GET .../output gives it."""
    async with request.config_dict[POOL].acquire() as conn:
        _, job = await _readable_job(conn, request, session)
        chunked = job.stored.text is None and job.stored.blob_key is None
        written = await jobs.live_total(conn, job) if chunked else 0
    return await plain(request, job, 0, jobs.length(job, written), written)


@routes.get(JOB + "/live")
@page(signed_in=False)
async def job_live(request: web.Request, session: Session | None) -> web.StreamResponse:
    """Server-Sent Events of the job's output from `offset` (or Last-Event-ID), as the API's
    stream; the reader's session is checked again whenever access may have changed."""
    async with request.config_dict[POOL].acquire() as conn:
        _, job = await _readable_job(conn, request, session)

    async def still_readable(request: web.Request) -> bool:
        current = await session_of(request, fresh=True)
        if session is not None and current is None:  # signed out meanwhile
            return False
        try:
            async with request.config_dict[POOL].acquire() as conn:
                await _readable_job(conn, request, current)
        except NotFound:
            return False
        return True

    return await stream(request, job, start_offset(request), still_readable)


async def not_found_page(request: web.Request) -> web.StreamResponse:
    """The HTML 404 of a path no page or API route has (api/web `html_errors`)."""
    return not_found(request, await session_of(request))


@web.middleware
async def html_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An unknown path outside the API (and its static files) gets the HTML 404 page."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        prefix = request.config_dict[CONFIG].server.api_url
        api_path = urlsplit(prefix).path.rstrip("/")
        if request.path == api_path or request.path.startswith(api_path + "/"):
            raise
        if request.path.startswith("/static/"):
            raise
        return await not_found_page(request)
