"""The OpenAPI 3.1 document (docs/api.md §21): one operation per route that exists.

Each issue that adds endpoints adds their operations to OPERATIONS and their entities to
SCHEMAS; tests/api/test_openapi.py checks the document against the app's router.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from marid import __version__, namespaces

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], optional: tuple[str, ...] = ()) -> Schema:
    required = [name for name in properties if name not in optional]
    return {"type": "object", "properties": properties, "required": required}


STRING: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
BOOL: Schema = {"type": "boolean"}
TIME: Schema = {"type": "string", "format": "date-time"}
# A job's output as entities embed it: bounded, with the rest at the job's output endpoint.
OUTPUT: Schema = {
    "anyOf": [STRING, {"type": "null"}],
    "description": "Masked output: up to 1 MiB per job whole, else a line naming"
    " <job url>/output followed by the job's last 1 MiB (docs/api.md §7.1)",
}
URL: Schema = {"type": "string", "format": "uri"}
# Path parameters as the router and the data take them (marid/users.py, marid/namespaces.py).
ID: Schema = {"type": "integer", "minimum": 0}
USERNAME: Schema = {"type": "string", "pattern": r"^[A-Za-z0-9.-]+$"}
SEGMENT: Schema = {"type": "string", "pattern": r"^[A-Za-z0-9]+$"}
NAMESPACE_PATH: Schema = {
    "type": "string",
    "pattern": r"^[A-Za-z0-9]+(/[A-Za-z0-9]+){0,19}$",
    "description": "1 to 20 segments joined by / (%2F in a URL path works as well)",
}
CLIENT_ID: Schema = {"type": "string", "pattern": r"^[0-9a-f]{32}$"}
PATH_SCHEMAS = {
    "id": ID,
    "number": ID,
    "username": USERNAME,
    "path": NAMESPACE_PATH,
    "client_id": CLIENT_ID,
}

# A namespace's limit of running builds (docs/api.md §8.1); null: none.
MAX_RUNNING = nullable({"type": "integer", "minimum": 1, "maximum": namespaces.MAX_RUNNING})

SCHEMAS: dict[str, Schema] = {
    "Message": obj({"message": STRING, "stack": STRING}, optional=("stack",)),
    "ValidationErrors": {
        "type": "object",
        "additionalProperties": {"type": "array", "items": STRING},
        "description": "Field-keyed validation messages (docs/api.md §1.4)",
    },
    "Root": obj(
        {
            f"{n}_url": URL
            for n in (
                "builds",
                "namespaces",
                "cron",
                "invites",
                "images",
                "objects",
                "variables",
                "keys",
            )
        }
    ),
    "User": obj({"email": STRING, "username": STRING, "created_at": TIME}),
    "Namespace": obj(
        {
            "id": INT,
            "user_id": INT,
            "root_id": INT,
            "parent_id": nullable(INT),
            "name": SEGMENT,
            "path": NAMESPACE_PATH,
            "description": STRING,
            "visibility": {"enum": ["private", "internal", "public"]},
            "max_running": MAX_RUNNING,
            "created_at": TIME,
            "url": URL,
            **{
                f"{link}_url": URL
                for link in (
                    "builds",
                    "namespaces",
                    "images",
                    "objects",
                    "variables",
                    "keys",
                    "invites",
                    "collaborators",
                    "webhooks",
                )
            },
            "user": ref("User"),
            "parent": nullable(ref("Namespace")),
            "build": nullable({"type": "object", "description": "the latest build"}),
        }
    ),
    "NamespaceRequest": obj(
        {
            "name": SEGMENT,
            "parent": NAMESPACE_PATH,
            "description": STRING,
            "visibility": {"enum": ["private", "internal", "public"]},
            "max_running": MAX_RUNNING,
        },
        optional=("parent", "description", "visibility", "max_running"),
    ),
    "NamespaceUpdate": obj(
        {
            "description": STRING,
            "visibility": {"enum": ["private", "internal", "public"]},
            "max_running": MAX_RUNNING,
        },
        optional=("description", "visibility", "max_running"),
    ),
    "Collaborator": obj(
        {"id": INT, "email": STRING, "username": STRING, "created_at": TIME, "url": URL}
    ),
    "Health": obj(
        {
            "status": STRING,
            "database": STRING,
            "version": STRING,
            "reason": {
                "enum": [
                    "not reachable",
                    "not answering",
                    "not accepting connections",
                    "connection lost",
                    "too many connections",
                    "error",
                ],
                "description": "why the database is unavailable (503 only)",
            },
            "message": STRING,
        },
        optional=("reason", "message"),
    ),
}

RETRY_AFTER_HEADER = {
    "Retry-After": {"description": "seconds to wait before trying again", "schema": INT}
}
MESSAGE = {"application/json": {"schema": ref("Message")}}
# Field-keyed validation errors, or a request refused as a whole (docs/api.md §1.4).
BAD_REQUEST: Schema = {"anyOf": [ref("ValidationErrors"), ref("Message")]}
# What every operation can answer (docs/api.md §1.4); `document` adds each to every operation
# that does not describe its own, and those of a request body to every operation with one.
RESPONSES = {
    "BadRequest": {
        "description": "Refused: text PostgreSQL cannot store in the path or query, a body"
        " that cannot be read (docs/api.md §1.4)",
        "content": {"application/json": {"schema": BAD_REQUEST}},
    },
    "NotFound": {
        "description": "Not Found, or not for this caller (docs/api.md §1.6)",
        "content": MESSAGE,
    },
    "RequestTimeout": {
        "description": "The request body stopped coming (docs/api.md §1.2)",
        "content": MESSAGE,
    },
    "TooLarge": {"description": "Request body too large (docs/api.md §1.2)", "content": MESSAGE},
    "RateLimited": {
        "description": "Rate limit exceeded (docs/api.md §20)",
        "headers": RETRY_AFTER_HEADER,
        "content": MESSAGE,
    },
    "Unavailable": {
        "description": "The database is unavailable (docs/api.md §1.4)",
        "headers": RETRY_AFTER_HEADER,
        "content": MESSAGE,
    },
}
UNAVAILABLE = {"$ref": "#/components/responses/Unavailable"}
COMMON = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "404": {"$ref": "#/components/responses/NotFound"},
    "429": {"$ref": "#/components/responses/RateLimited"},
    "503": UNAVAILABLE,
}
WITH_BODY = {
    "408": {"$ref": "#/components/responses/RequestTimeout"},
    "413": {"$ref": "#/components/responses/TooLarge"},
}

NOT_FOUND = {
    "404": {
        "description": "Not Found (docs/api.md §1.6)",
        "content": {"application/json": {"schema": ref("Message")}},
    }
}


def json_response(description: str, schema: Schema) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def op(
    summary: str,
    responses: dict[str, Any],
    *,
    security: list[dict[str, list[str]]] | None = None,
    body: Schema | None = None,
    extension: bool = False,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if security is not None:
        operation["security"] = security
    if body is not None:
        operation["requestBody"] = {"content": {"application/json": {"schema": body}}}
    if parameters:
        operation["parameters"] = parameters
    if extension:
        operation["x-marid-extension"] = True
    return operation


def path_param(name: str, description: str) -> dict[str, Any]:
    """A path parameter; ids, build numbers, usernames, namespace paths and client ids get
    their integer or pattern schema, anything else (tag, job, artifact names) is a string."""
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": PATH_SCHEMAS.get(name, STRING),
        "description": description,
    }


OPTIONAL: list[dict[str, list[str]]] = [{}, {"bearer": []}]
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
BASIC_OR_BEARER: list[dict[str, list[str]]] = [{"basic": []}, {"bearer": []}]
UNAUTHORIZED = {"401": json_response("Missing or bad credentials", ref("Message"))}
INVALID = {"400": json_response("Validation failed, or the request was refused", BAD_REQUEST)}

Operations = dict[tuple[str, str], dict[str, Any]]


def list_of(name: str) -> Schema:
    return {"type": "array", "items": ref(name)}


def query_param(name: str, description: str, schema: Schema = STRING) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def search_params() -> list[dict[str, Any]]:
    """`search` and `page` of paginated listings (docs/api.md §1.7, §1.8)."""
    return [
        query_param("search", "case-insensitive substring filter"),
        query_param("page", "page number, 25 items a page", INT),
    ]


def namespace_params() -> list[dict[str, Any]]:
    return [
        path_param("username", "namespace owner"),
        path_param("path", "namespace path: 1 to 20 segments joined by /"),
    ]


LINK_HEADER = {
    "Link": {
        "description": 'The previous and next pages: `<url>; rel="prev", <url>; rel="next"`'
        " (docs/api.md §1.7)",
        "schema": STRING,
    }
}


def operation_ids(module: Any) -> dict[tuple[str, str], str]:
    """(method, path template) -> operationId: the name of the route's handler (`list_crons`,
    `show_namespace`), unique and as stable as the handlers' names (docs/api.md §21)."""
    found = {}
    for route in getattr(module, "routes", ()):
        handler = getattr(route, "handler", None)
        if handler is not None:
            path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.path)
            found[(route.method.lower(), path)] = handler.__name__
    return found


def _body_required(body: dict[str, Any], schemas: dict[str, Schema]) -> bool:
    """Whether a request body must be sent: its schema requires a field (an empty JSON body
    reads as {}, so a body of optional fields may be left out)."""
    for media in body.get("content", {}).values():
        schema = media.get("schema", {})
        if "$ref" in schema:
            schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
        if schema.get("type") != "object" or schema.get("required"):
            return True  # an array (tags), or an object with a required field
    return False


def _complete(
    operation: dict[str, Any], operation_id: str | None, schemas: dict[str, Schema]
) -> dict[str, Any]:
    """The operation with its operationId, whether its body is required, the Link header of
    a paginated listing's 200 and the answers every operation can give."""
    operation = dict(operation)
    if operation_id is not None:
        operation.setdefault("operationId", operation_id)
    if "requestBody" in operation and "required" not in operation["requestBody"]:
        body = operation["requestBody"]
        operation["requestBody"] = {**body, "required": _body_required(body, schemas)}
    paged = any(p["name"] == "page" and p["in"] == "query" for p in operation.get("parameters", ()))
    if paged and "200" in operation["responses"]:
        ok = operation["responses"]["200"]
        operation["responses"] = {
            **operation["responses"],
            "200": {**ok, "headers": {**ok.get("headers", {}), **LINK_HEADER}},
        }
    return with_common_responses(operation)


def with_common_responses(operation: dict[str, Any]) -> dict[str, Any]:
    """The operation with the answers any operation can give (400, 404, 429, 503; 408 and 413
    when it takes a body), except those it documents itself (GET /health's 503)."""
    responses = dict(operation["responses"])
    for status, response in {**COMMON, **(WITH_BODY if "requestBody" in operation else {})}.items():
        responses.setdefault(status, response)
    return {**operation, "responses": responses}


def document(
    api_url: str,
    modules: Iterable[Any],
    root_url: str = "",
    root_modules: Iterable[Any] = (),
) -> dict[str, Any]:
    """The OpenAPI document for a server at `api_url`, from each API module's OPERATIONS
    ((method, path template relative to the API base) -> operation) and SCHEMAS. Operations
    of `root_modules` are relative to the server root and say so with a `servers` override."""
    paths: dict[str, dict[str, Any]] = {}
    schemas = dict(SCHEMAS)
    for module in (*modules, *root_modules):
        schemas.update(getattr(module, "SCHEMAS", {}))
    for module in modules:
        ids = operation_ids(module)
        for (method, path), operation in module.OPERATIONS.items():
            complete = _complete(operation, ids.get((method, path)), schemas)
            paths.setdefault(path, {})[method] = complete
    for module in root_modules:
        ids = operation_ids(module)
        for (method, path), operation in module.OPERATIONS.items():
            paths.setdefault(path, {})[method] = {
                **_complete(operation, ids.get((method, path)), schemas),
                "servers": [{"url": root_url}],
            }
    return {
        "openapi": "3.1.0",
        "info": {"title": "marid", "version": __version__},
        "servers": [{"url": api_url}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": RESPONSES,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
                # The runner protocol's tokens (docs/runners.md §2), each a bearer token.
                "enrolmentToken": {"type": "http", "scheme": "bearer", "bearerFormat": "mre_"},
                "runnerToken": {"type": "http", "scheme": "bearer", "bearerFormat": "mrr_"},
                "jobToken": {"type": "http", "scheme": "bearer", "bearerFormat": "mrj_"},
            },
        },
    }
