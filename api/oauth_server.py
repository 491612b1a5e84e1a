"""authlib's OAuth 2.0 authorization server, adapted to aiohttp and asyncpg (docs/api.md §16).

authlib is synchronous and framework-agnostic: it asks its subclass to build an OAuth2Request
(`create_oauth2_request`), to render (`handle_response`) and to reach storage (`query_client`,
`save_token` and the grant's code hooks). Here a request's form/query values are read first
(`RequestData`), authlib runs in a worker thread, and each storage hook runs its query on the
event loop through the handler's connection, inside the handler's transaction.

Where authlib's defaults differ from the spec, the spec wins, mapped here:
* §16 requests carry no `response_type` / `grant_type`: the adapter supplies `code` and
  `authorization_code`, the only flow marid serves.
* Repeated parameters: the first value counts (§1.2), so authlib sees one value each.
* Client auth (§16.3): `secret` is an alias of `client_secret`; HTTP Basic takes precedence,
  so form credentials are dropped when it is present.
* Responses come back as a `Reply` (status, body, headers, the OAuth2Error if any) and the
  handlers render them as §16 says (303 not 302, RFC 6749 §5.2 errors with a `message`
  beside them, form or JSON).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from authlib.common.urls import add_params_to_uri
from authlib.oauth2 import AuthorizationServer, OAuth2Error, OAuth2Request
from authlib.oauth2.rfc6749 import (
    AccessDeniedError,
    AuthorizationCodeMixin,
    ClientMixin,
    grants,
)
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload

from marid import apps, oauth, scopes, tokens
from marid.users import User

T = TypeVar("T")


class SpecError(OAuth2Error):
    """A §16.1 error whose JSON message the spec fixes. The message may quote client input,
    so it is kept out of authlib's `description` (which allows only a narrow ASCII set)."""

    error = "invalid_request"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(status_code=status)
        self.message = message


@dataclass(frozen=True)
class RequestData:
    """What authlib needs of an aiohttp request, read before authlib runs."""

    method: str
    uri: str
    headers: dict[str, str]
    data: dict[str, str]


@dataclass
class Reply:
    """authlib's answer: `handle_response` / `handle_error_response` return this."""

    status: int
    body: Any
    headers: list[tuple[str, str]]
    error: OAuth2Error | None = None


class Request(OAuth2Request):
    def __init__(self, data: RequestData) -> None:
        super().__init__(data.method, data.uri, headers=data.headers)
        self._data = data.data
        self.payload = BasicOAuth2Payload(data.data)

    @property
    def args(self) -> dict[str, str]:
        return self._data

    @property
    def form(self) -> dict[str, str]:
        return self._data


class Client(ClientMixin):
    """authlib's view of an app: confidential, code flow only, one registered redirect URI."""

    def __init__(self, app: apps.App) -> None:
        self.app = app

    def __repr__(self) -> str:
        return f"<Client {self.app.client_id}>"

    def get_client_id(self) -> str:
        return self.app.client_id

    def get_default_redirect_uri(self) -> str:
        return self.app.redirect_uri

    def get_allowed_scope(self, scope: str) -> str:
        # Any scope may be requested (the user decides); it is stored canonically (§2.2).
        return str(scopes.parse(scope))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri == self.app.redirect_uri

    def check_client_secret(self, client_secret: str) -> bool:
        return self.app.check_secret(client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"  # no refresh tokens in §16


class AuthorizationCode(AuthorizationCodeMixin):
    def __init__(self, code: oauth.Code) -> None:
        self.code = code

    def get_redirect_uri(self) -> None:
        # The §16.3 token request has no redirect_uri, and an app has exactly one registered
        # URI the code was already checked against, so there is nothing to compare it with.
        return None

    def get_scope(self) -> str:
        return self.code.scope


class IssuedToken(dict[str, str]):
    """A token response whose repr hides the value: authlib logs it with %r."""

    def __repr__(self) -> str:
        return f"<token scope={self.get('scope')!r}>"


def generate_token(client: Client, scope: str, **_: Any) -> IssuedToken:
    """authlib's token generator: `mrd_` values (EXT b.1), no expiry, no refresh token."""
    return IssuedToken(access_token=tokens.new_value(), token_type="bearer", scope=scope)


class CodeGrant(grants.AuthorizationCodeGrant):
    server: Server

    def generate_authorization_code(self) -> str:
        return oauth.new_code()  # 32 hex characters (§16.2)

    @staticmethod
    def validate_authorization_redirect_uri(request: Request, client: Client) -> str:
        given = request.payload.redirect_uri
        if given is not None and not client.check_redirect_uri(given):
            raise SpecError("redirect_uri does not match")
        if not apps.is_redirect_uri(client.app.redirect_uri):
            # Registered before http(s)-only redirect URIs (issue 11 row 11): no code goes there.
            raise SpecError("Registered redirect_uri is not allowed")
        return str(given or client.get_default_redirect_uri())

    def save_authorization_code(self, code: str, request: Request) -> None:
        client: Client = request.client
        redirect_uri = request.payload.redirect_uri or client.app.redirect_uri
        self.server.run(
            oauth.save(
                self.server.conn, code, client.app.id, request.user, request.scope, redirect_uri
            )
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        found = self.server.run(oauth.find_usable(self.server.conn, code, client.app.id))
        if found is None:
            # Maybe a replay: the handler revokes its token once this transaction has rolled
            # back (RFC 6749 §4.1.2).
            self.server.refused_code = (code, client.app.id)
        return AuthorizationCode(found) if found else None

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        # Kept, marked used, so a replay is refused like any unknown code (single use).
        self.server.run(oauth.mark_used(self.server.conn, authorization_code.code.id))

    def authenticate_user(self, authorization_code: AuthorizationCode) -> User | None:
        return self.server.run(oauth.user_of(self.server.conn, authorization_code.code))


class Server(AuthorizationServer):
    """One request's authorization server, bound to its connection and event loop. Call its
    methods from a worker thread (`asyncio.to_thread`): the hooks block on the loop."""

    def __init__(self, conn: asyncpg.Connection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.conn = conn
        self.loop = loop
        # The code and app of a refused token request (unknown, expired or used code).
        self.refused_code: tuple[str, int] | None = None
        self.register_grant(CodeGrant)
        self.register_token_generator("default", generate_token)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def revoke_replayed(self) -> None:
        """After a refused token request: if its code had been used, revoke the token issued
        for it (RFC 6749 §4.1.2). Call on the event loop, in a transaction of its own."""
        if self.refused_code is not None:
            await oauth.revoke_replayed(self.conn, *self.refused_code)

    def query_client(self, client_id: str) -> Client | None:
        app = self.run(apps.get(self.conn, client_id))
        return Client(app) if app else None

    def save_token(self, token: IssuedToken, request: Request) -> None:
        client: Client = request.client
        self.run(
            tokens.replace_for_app(
                self.conn,
                request.user,
                client.app.id,
                client.app.name,
                token["scope"],
                token["access_token"],
            )
        )
        code: AuthorizationCode = request.authorization_code
        self.run(oauth.record_token(self.conn, code.code.id, tokens.digest(token["access_token"])))

    def validate_requested_scope(self, scope: str | None) -> None:
        try:
            parsed = scopes.parse(scope or "")
        except scopes.ScopeError as exc:
            raise SpecError(f"Invalid scope: {exc}") from None
        if not parsed.grants:
            raise SpecError("No scope requested")

    def create_oauth2_request(self, request: RequestData | Request) -> Request:
        return request if isinstance(request, Request) else Request(request)

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> Reply:
        return Reply(status, body, list(headers))

    def handle_error_response(self, request: Request | None, error: OAuth2Error) -> Reply:
        status, body, headers = error(None)
        return Reply(status, body, list(headers), error)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """authlib's signal hook (e.g. after_authenticate_client): nothing listens."""

    def consent(self, data: RequestData) -> CodeGrant:
        """Validate an authorization request (§16.1); raises OAuth2Error."""
        return self.get_consent_grant(data)

    def authorize(self, grant: CodeGrant, user: User | None) -> Reply:
        """Grant (`user`) or deny (None) a request `consent` validated (§16.2)."""
        return self.create_authorization_response(grant.request, grant_user=user, grant=grant)

    def authenticate(self, data: RequestData) -> Client:
        """The client of a revocation request (RFC 7009 §2.1); raises OAuth2Error."""
        request = self.create_oauth2_request(data)
        methods = ["client_secret_basic", "client_secret_post"]
        client: Client = self.authenticate_client(request, methods, "revoke")
        return client

    def exchange(self, data: RequestData) -> Reply:
        """The token endpoint (§16.3)."""
        try:
            return self.create_token_response(data)
        except OAuth2Error as error:  # authlib builds the request outside its own try
            return self.handle_error_response(None, error)


async def in_thread(func: Callable[..., T], *args: Any) -> T:
    """Run an authlib call in a worker thread. If the request is cancelled meanwhile, the
    thread is still awaited: its hooks use the handler's connection, which must not go back to
    the pool while they run."""
    task = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def denied_location(reply: Reply) -> str | None:
    """The §16.2 deny redirect: `error=access_denied[&state=…]` and nothing more (authlib
    would add an error_description)."""
    error = reply.error
    if not isinstance(error, AccessDeniedError) or not error.redirect_uri:
        return None
    params = [("error", "access_denied")]
    if error.state:
        params.append(("state", error.state))
    return str(add_params_to_uri(error.redirect_uri, params))
