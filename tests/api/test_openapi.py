"""The OpenAPI document describes exactly the routes that exist (docs/api.md §21)."""

import re

from aiohttp import web
from aiohttp.test_utils import TestClient

from marid.api.app import create_app
from marid.config import Config


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
    assert documented == served
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "basic"}


async def test_every_extension_operation_is_marked(api: TestClient):
    doc = await (await api.get("/api/openapi.json")).json()
    for path in ("/tokens", "/health", "/openapi.json"):
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
