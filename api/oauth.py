"""The OAuth authorization-code flow at the server root (docs/api.md §16), on authlib
(`api.oauth_server`): the consent page, the authorize and token endpoints, and revocation."""

from __future__ import annotations

import asyncio
import html
import re
from typing import Any
from urllib.parse import urlencode

import asyncpg
from aiohttp import web
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import InvalidClientError, InvalidGrantError
from multidict import MultiMapping

from marid import apps, tokens
from marid.api.auth import bearer, login
from marid.api.http import read_form
from marid.api.keys import CONFIG, POOL
from marid.api.oauth_server import (
    CodeGrant,
    Reply,
    RequestData,
    Server,
    SpecError,
    denied_location,
    in_thread,
)
from marid.api.openapi import (
    BAD_REQUEST,
    STRING,
    Operations,
    json_response,
    obj,
    query_param,
    ref,
)
from marid.validation import NotFound, RequestError, ValidationError

routes = web.RouteTableDef()

AUTHORIZE_FIELDS = ("client_id", "redirect_uri", "scope", "state")
# The consent page must not be framed (clickjacking) or cached.
PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Cache-Control": "no-store",
}
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1, §5.2


def _first_values(values: MultiMapping[Any]) -> dict[str, str]:
    """One value per name, the first (docs/api.md §1.2); file parts are ignored."""
    found: dict[str, str] = {}
    for name, value in values.items():
        if isinstance(value, str):
            found.setdefault(name, value)
    return found


def _data(request: web.Request, values: dict[str, str], **defaults: str) -> RequestData:
    headers = {}
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    uri = request.config_dict[CONFIG].server.url.rstrip("/") + request.path
    return RequestData(request.method, uri, headers, {**values, **defaults})


def _authorize_data(request: web.Request, values: dict[str, str]) -> RequestData:
    # §16 has only the code flow and no response_type parameter.
    fields = {name: values[name] for name in AUTHORIZE_FIELDS if name in values}
    return _data(request, fields, response_type="code")


def _authorize_error(error: OAuth2Error, data: RequestData) -> Exception:
    """§16.1's JSON errors for authlib's validation failures."""
    if isinstance(error, SpecError):
        return RequestError(error.message, error.status_code)
    if isinstance(error, InvalidClientError):
        if not data.data.get("client_id"):
            return RequestError("No client ID in request")
        return NotFound()
    return RequestError(error.get_error_description() or error.error)


async def _consent(conn: asyncpg.Connection, data: RequestData) -> tuple[Server, CodeGrant]:
    server = Server(conn, asyncio.get_running_loop())
    try:
        grant = await in_thread(server.consent, data)
    except OAuth2Error as error:
        raise _authorize_error(error, data) from None
    return server, grant


@routes.get("/login/oauth/authorize")
async def show_consent(request: web.Request) -> web.Response:
    data = _authorize_data(request, _first_values(request.query))
    async with request.config_dict[POOL].acquire() as conn:
        _, grant = await _consent(conn, data)
    return _page(grant, data)


@routes.post("/login/oauth/authorize")
async def authorize(request: web.Request) -> web.Response:
    values = _first_values(await read_form(request))
    data = _authorize_data(request, values)
    async with request.config_dict[POOL].acquire() as conn:
        server, grant = await _consent(conn, data)
        user = None
        if values.get("authorize") == "true":
            handle, password = values.get("handle", ""), values.get("password", "")
            user = await login(request, handle, password, conn)
            if user is None:
                return _page(grant, data, error="Incorrect username, email or password", status=401)
        async with conn.transaction():
            reply = await in_thread(server.authorize, grant, user)
    location = denied_location(reply) if reply.error else dict(reply.headers).get("Location")
    if location is None:
        raise RequestError(reply.error.get_error_description() if reply.error else "Bad request")
    # 303: the browser follows a POST with a GET (authlib answers 302).
    return web.Response(status=303, headers={"Location": location})


class TokenError(RequestError):
    """An error of the token or revocation endpoint: RFC 6749 §5.2's `error` code and
    `error_description`, with §16.3's `message` beside them."""

    def __init__(
        self,
        error: str,
        message: str,
        status: int = 400,
        headers: dict[str, str] | None = None,
        field: str = "message",
    ) -> None:
        super().__init__(message, status, headers)
        self.error = error
        self.field = field  # "body" for a form that cannot be read: field-keyed, as elsewhere


def _bad_client() -> TokenError:
    return TokenError(
        "invalid_client",
        "Invalid client credentials",
        401,
        {"WWW-Authenticate": 'Basic realm="marid"'},
    )


# RFC 6749 §5.2: error_description holds only %x20-21 / %x23-5B / %x5D-7E.
_DESCRIPTION = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")


def _token_error_response(exc: TokenError) -> web.Response:
    body: dict[str, object] = {
        "error": exc.error,
        "error_description": _DESCRIPTION.sub("?", exc.message),
    }
    body[exc.field] = exc.message if exc.field == "message" else [exc.message]
    headers = {**(exc.headers or {}), **NO_STORE}
    return web.json_response(body, status=exc.status, headers=headers)


async def _client_form(request: web.Request) -> dict[str, str]:
    """The form of a token or revocation request, client credentials as authlib takes them;
    a form that cannot be read is RFC 6749's invalid_request."""
    try:
        values = _first_values(await read_form(request))
    except ValidationError as exc:
        raise TokenError("invalid_request", exc.errors["body"][0], field="body") from None
    secret = values.pop("secret", None)
    if secret is not None:
        values.setdefault("client_secret", secret)
    if _has_basic(request):
        # HTTP Basic takes precedence over form credentials (§16.3).
        values.pop("client_id", None)
        values.pop("client_secret", None)
    return values


@routes.post("/login/oauth/token")
async def exchange_code(request: web.Request) -> web.Response:
    try:
        return await _exchange_code(request)
    except TokenError as exc:
        return _token_error_response(exc)


async def _exchange_code(request: web.Request) -> web.Response:
    values = await _client_form(request)
    # §16 requests name no grant type; an RFC 6749 client's other grant types are refused by
    # authlib (unsupported_grant_type).
    values.setdefault("grant_type", "authorization_code")
    data = _data(request, values)
    async with request.config_dict[POOL].acquire() as conn:
        server = Server(conn, asyncio.get_running_loop())
        try:
            async with conn.transaction():
                reply = await in_thread(server.exchange, data)
                if reply.error is not None:  # raised inside: the transaction rolls back
                    raise _token_error(reply.error)
        except TokenError:
            async with conn.transaction():  # so the revocation is not rolled back with it
                await server.revoke_replayed()
            raise
    return _token_response(request, reply)


def _token_error(error: OAuth2Error) -> TokenError:
    if isinstance(error, InvalidClientError):
        return _bad_client()
    if isinstance(error, InvalidGrantError):  # unknown, used, expired or another app's code
        return TokenError("invalid_grant", "Invalid or expired code")
    # invalid_request (no code; server.url plain http, not loopback), unsupported_grant_type
    description = error.get_error_description() or error.error
    return TokenError(error.error or "invalid_request", description, error.status_code or 400)


def _token_response(request: web.Request, reply: Reply) -> web.Response:
    """§16.3: JSON when Accept names it, else a form-encoded body with sorted keys."""
    body = {key: reply.body[key] for key in ("access_token", "token_type", "scope")}
    headers = {k: v for k, v in reply.headers if k.lower() != "content-type"}  # no-store
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response(body, headers=headers)
    return web.Response(
        body=urlencode(sorted(body.items())).encode(),
        content_type="application/x-www-form-urlencoded",
        headers=headers,
    )


@routes.post("/logout/oauth/revoke")
async def revoke_token(request: web.Request) -> web.Response:
    """§16.4 in two forms: RFC 7009's (a `token` form field, 200) and Djinn's (the request's
    own bearer token, 204)."""
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            values = await _client_form(request)
            if "token" in values:
                return await _revoke_named(request, values)
        except TokenError as exc:
            return _token_error_response(exc)
    caller = await bearer(request)
    if caller.user is not None and caller.token_id is not None:
        async with request.config_dict[POOL].acquire() as conn:
            await tokens.delete(conn, caller.user, caller.token_id)
    return web.Response(status=204)


async def _revoke_named(request: web.Request, values: dict[str, str]) -> web.Response:
    """RFC 7009: client credentials, when given, must be right (401 invalid_client); the named
    token is deleted, whoever it was issued to, since whoever holds it could delete it with
    Djinn's form anyway; an unknown token is answered 200 as well (§2.2). `token_type_hint` is
    ignored: every marid token is an access token."""
    async with request.config_dict[POOL].acquire() as conn:
        if "client_id" in values or _has_basic(request):
            server = Server(conn, asyncio.get_running_loop())
            try:
                await in_thread(server.authenticate, _data(request, values))
            except OAuth2Error:
                raise _bad_client() from None
        async with conn.transaction():
            found = await tokens.authenticate(conn, values["token"])
            if found is not None:
                await tokens.delete(conn, found.user, found.token_id)
    return web.Response(status=200, headers=NO_STORE)


def _has_basic(request: web.Request) -> bool:
    return request.headers.get("Authorization", "").lower().startswith("basic ")


def _page(grant: CodeGrant, data: RequestData, error: str = "", status: int = 200) -> web.Response:
    """The consent page: the app, the requested scope and a login form (everything escaped)."""
    app: apps.App = grant.request.client.app
    esc = html.escape
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{esc(data.data[name])}">'
        for name in AUTHORIZE_FIELDS
        if name in data.data
    )
    items = "".join(f"<li><code>{esc(item)}</code></li>" for item in grant.request.scope.split())
    alert = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    page = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Authorize {esc(app.name)} - marid</title></head>
<body>
<h1>Authorize <a href="{esc(app.homepage_uri)}">{esc(app.name)}</a></h1>
<p>{esc(app.description)}</p>
<p>{esc(app.name)} asks for access to your marid account with this scope:</p>
<ul class="scope">{items}</ul>
{alert}
<form method="post" action="/login/oauth/authorize">
{hidden}
<p><label>Username or email <input name="handle" autocomplete="username" required></label></p>
<p><label>Password
<input name="password" type="password" autocomplete="current-password"></label></p>
<p><button name="authorize" value="true">Authorize</button>
<button name="authorize" value="false" formnovalidate>Deny</button></p>
</form>
</body>
</html>
"""
    return web.Response(text=page, content_type="text/html", status=status, headers=PAGE_HEADERS)


def _form_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/x-www-form-urlencoded": {"schema": schema}}}


HTML = {"text/html": {"schema": STRING}}
MESSAGE = {"application/json": {"schema": ref("Message")}}
AUTHORIZE_ERRORS = {
    "400": {
        "description": "Bad client_id, redirect_uri or scope (§16.1), or a form body that"
        " cannot be read (docs/api.md §1.4)",
        "content": {"application/json": {"schema": BAD_REQUEST}},
    },
    "404": {"description": "Unknown client_id", "content": MESSAGE},
}

SCHEMAS = {
    "OAuthToken": obj({"access_token": STRING, "token_type": STRING, "scope": STRING}),
    "OAuthError": {
        **obj(
            {
                "error": {
                    "enum": [
                        "invalid_request",
                        "invalid_client",
                        "invalid_grant",
                        "unauthorized_client",
                        "unsupported_grant_type",
                        "invalid_scope",
                    ]
                },
                "error_description": STRING,
                "message": STRING,
                "body": {"type": "array", "items": STRING},
            },
            optional=("message", "body"),
        ),
        "description": "RFC 6749 §5.2, with `message` (or, for a form that cannot be read,"
        " the field-keyed `body`) beside it (docs/api.md §16.3)",
    },
}
OAUTH_ERROR = ref("OAuthError")

OPERATIONS: Operations = {
    ("get", "/login/oauth/authorize"): {
        "summary": "The consent page: the app, the scope and a login form (docs/api.md §16.1)",
        "parameters": [
            query_param("client_id", "the application's client id"),
            query_param("redirect_uri", "must equal the registered one; defaults to it"),
            query_param("scope", "the requested scope (docs/api.md §2.2)"),
            query_param("state", "echoed back"),
        ],
        "responses": {"200": {"description": "HTML page", "content": HTML}, **AUTHORIZE_ERRORS},
    },
    ("post", "/login/oauth/authorize"): {
        "summary": "Grant or deny: redirects with code or error=access_denied (docs/api.md §16.2)",
        "requestBody": _form_body(
            obj(
                {f: STRING for f in (*AUTHORIZE_FIELDS, "handle", "password", "authorize")},
                optional=("redirect_uri", "state", "handle", "password"),
            )
        ),
        "responses": {
            "303": {"description": "Back to the redirect URI"},
            "401": {"description": "Bad user credentials: the form again", "content": HTML},
            **AUTHORIZE_ERRORS,
        },
    },
    ("post", "/login/oauth/token"): {
        "summary": "Exchange a code for a token (docs/api.md §16.3)",
        "security": [{"basic": []}, {}],
        "requestBody": _form_body(
            obj(
                {"code": STRING, "client_id": STRING, "client_secret": STRING, "secret": STRING},
                optional=("client_id", "client_secret", "secret"),
            )
        ),
        "responses": {
            "200": {
                "description": "The token; form-encoded unless Accept names application/json",
                "content": {
                    "application/json": {"schema": ref("OAuthToken")},
                    "application/x-www-form-urlencoded": {"schema": ref("OAuthToken")},
                },
            },
            "400": json_response(
                "invalid_grant (invalid or expired code), invalid_request,"
                " unsupported_grant_type (RFC 6749 §5.2)",
                OAUTH_ERROR,
            ),
            "401": json_response("invalid_client: invalid client credentials", OAUTH_ERROR),
        },
    },
    ("post", "/logout/oauth/revoke"): {
        "summary": "Revoke a token: RFC 7009's `token` form field (200), or the request's own"
        " bearer token (204) (docs/api.md §16.4)",
        "security": [{}, {"bearer": []}, {"basic": []}],
        "requestBody": {
            "required": False,
            **_form_body(
                obj(
                    {
                        "token": STRING,
                        "token_type_hint": STRING,
                        "client_id": STRING,
                        "client_secret": STRING,
                    },
                    optional=("token_type_hint", "client_id", "client_secret"),
                )
            ),
        },
        "responses": {
            "200": {"description": "RFC 7009: revoked (or already unknown)"},
            "204": {"description": "The bearer token: revoked (or already unknown)"},
            "400": json_response("A form that cannot be read (invalid_request)", OAUTH_ERROR),
            "401": json_response("invalid_client: invalid client credentials", OAUTH_ERROR),
        },
    },
}
