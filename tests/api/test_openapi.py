"""The OpenAPI document describes exactly the routes that exist (docs/api.md §21)."""

import re

from aiohttp import web
from aiohttp.test_utils import TestClient

from marid.api.app import create_app
from marid.api.web import pages as web_pages
from marid.config import Config
from tests.conftest import MakeToken, bearer


def routes_of(app: web.Application, prefix: str = "") -> set[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        if "app" in info:  # a mounted sub-application
            found |= routes_of(info["app"], prefix + info["prefix"])
            continue
        path = info.get("path") or info.get("formatter")
        if route.method in ("HEAD", "*") or path is None:
            continue
        found.add((route.method.lower(), re.sub(r"\{(\w+):[^}]*\}", r"{\1}", prefix + path)))
    return found


async def test_openapi_document_matches_the_router(api: TestClient, config: Config):
    resp = await api.get("/api/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"] == "3.1.0"
    assert doc["info"] == {"title": "marid", "version": "0.1.0"}
    assert doc["servers"] == [{"url": "https://ci.example.com/api"}]
    documented = {
        # Root operations (the OAuth pages, docs/api.md §16) name the server root in `servers`.
        (method, path if "servers" in op else "/api" + path)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    }
    served = routes_of(create_app(config)) - {("get", "/api")}  # "/api" is "/api/" unslashed
    pages = web.Application()  # the web interface's pages are no API operations
    pages.add_routes(web_pages.routes)
    assert documented == served - routes_of(pages)
    # The runner protocol's three bearer tokens (docs/runners.md §2) are schemes of their own.
    runner_tokens = {"enrolmentToken", "runnerToken", "jobToken"}
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "basic", *runner_tokens}


async def test_every_extension_operation_is_marked(api: TestClient):
    doc = await (await api.get("/api/openapi.json")).json()
    for path in ("/tokens", "/health", "/openapi.json", "/runners", "/runner-tokens"):
        for operation in doc["paths"][path].values():
            assert operation["x-marid-extension"] is True
    assert "x-marid-extension" not in doc["paths"]["/user"]["get"]


async def test_schema_references_resolve(api: TestClient):
    doc = await (await api.get("/api/openapi.json")).json()
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', str(doc).replace("'", '"')))
    assert refs <= set(doc["components"]["schemas"])


async def test_oauth_operations_are_served_from_the_root(api: TestClient):
    doc = await (await api.get("/api/openapi.json")).json()
    for path in ("/login/oauth/authorize", "/login/oauth/token", "/logout/oauth/revoke"):
        for operation in doc["paths"][path].values():
            assert operation["servers"] == [{"url": "https://ci.example.com"}]
    for operation in doc["paths"]["/apps"].values():
        assert operation["x-marid-extension"] is True


async def test_every_operation_has_a_unique_snake_case_operation_id(api: TestClient):
    doc = await (await api.get("/api/openapi.json")).json()
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    # 8 of them caches (docs/api.md §26), 1 the restart (§27), 5 runner administration (§28),
    # 14 the runner protocol (docs/runners.md)
    assert len(ids) == len(set(ids)) == 110
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", i) for i in ids), ids
    # Stable: the handlers' names (docs/api.md §21).
    assert doc["paths"]["/n/{username}/{path}"]["get"]["operationId"] == "show_namespace"
    assert doc["paths"]["/cron/{id}"]["patch"]["operationId"] == "update_cron"
    assert doc["paths"]["/login/oauth/token"]["post"]["operationId"] == "exchange_code"


async def test_bodies_are_required_where_the_server_requires_them(api: TestClient):
    doc = await (await api.get("/api/openapi.json")).json()
    optional = {
        (method, path)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if "requestBody" in op and not op["requestBody"]["required"]
    }
    # Every field optional (an empty body reads as {}), or no body at all (Djinn's revoke).
    assert optional == {
        ("patch", "/n/{username}/{path}"),
        ("patch", "/keys/{id}"),
        ("patch", "/cron/{id}"),
        ("post", "/logout/oauth/revoke"),
        ("post", "/b/{username}/{number}/restart"),
        ("post", "/runner/claim"),
        ("post", "/runner/builds/{id}/renew"),
    }
    assert doc["paths"]["/cron"]["post"]["requestBody"]["required"] is True
    assert doc["paths"]["/b/{username}/{number}/tags"]["post"]["requestBody"]["required"] is True


async def test_ids_numbers_and_namespace_paths_are_typed(api: TestClient):
    doc = await (await api.get("/api/openapi.json")).json()
    params = {
        p["name"]: p["schema"]
        for ops in doc["paths"].values()
        for op in ops.values()
        for p in op.get("parameters", ())
        if p["in"] == "path"
    }
    assert params["id"]["type"] == params["number"]["type"] == "integer"
    path = re.compile(params["path"]["pattern"])
    assert path.fullmatch("acme") and path.fullmatch("acme/web/api")
    assert not path.fullmatch("acme/") and not path.fullmatch("/".join(["a"] * 21))
    assert not re.fullmatch(params["username"]["pattern"], "a/b")
    namespace = doc["components"]["schemas"]["Namespace"]["properties"]
    assert namespace["path"]["pattern"] == params["path"]["pattern"]


async def test_responses_document_the_link_header_and_the_message_400(
    api: TestClient, token: MakeToken
):
    doc = await (await api.get("/api/openapi.json")).json()
    responses = doc["components"]["responses"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            paged = any(p["name"] == "page" for p in op.get("parameters", ()))
            headers = op["responses"]["200"].get("headers", {}) if paged else {}
            assert ("Link" in headers) == paged, (method, path)
            bad = op["responses"]["400"]
            bad = responses[bad["$ref"].rsplit("/", 1)[1]] if "$ref" in bad else bad
            schema = str(bad["content"]["application/json"]["schema"])
            assert "Message" in schema or "OAuthError" in schema, (method, path)
    resp = await api.get("/api/namespaces", headers=bearer(await token("namespace:read")))
    assert "Link" in resp.headers
