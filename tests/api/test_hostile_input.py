"""Hostile input that used to reach a 500 (issue 11 row 15) and the access log's escaping
(row 16): deep JSON, path numbers past int()'s digit limit, malformed multipart and form
bodies, and control characters in logged paths."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from marid.api.errors import printable
from marid.api.http import BAD_FORM, BAD_PART_HEADERS, MAX_DEPTH, NO_BOUNDARY, TOO_DEEP
from marid.users import User
from tests.api.test_tokens import basic
from tests.conftest import MakeToken, bearer

DEEP = {"body": [TOO_DEEP]}
# int() refuses strings of more than 4,300 digits with ValueError (CVE-2020-10735).
LONG_NUMBER = "9" * 5000
UPLOADS = [("/api/objects", "object:write"), ("/api/images", "image:write")]
OAUTH = ["/login/oauth/authorize", "/login/oauth/token"]


def nested(levels: int) -> bytes:
    """A JSON object whose `name` holds arrays nested `levels` deep in all."""
    return b'{"name": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


async def test_json_nested_up_to_the_limit_is_read(api: TestClient, alice: User):
    resp = await api.post("/api/tokens", headers=basic(), data=nested(MAX_DEPTH))
    assert resp.status == 400
    assert await resp.json() == {"name": ["Name must be a string"]}  # read, then validated


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 5000, 500_000])
async def test_json_nested_past_the_limit_is_a_field_keyed_400(
    api: TestClient, alice: User, levels: int
):
    # 5000 and more levels: past the interpreter's recursion limit, where json.loads raises
    # RecursionError, which was a 500.
    resp = await api.post("/api/tokens", headers=basic(), data=nested(levels))
    assert resp.status == 400
    assert await resp.json() == DEEP


PATHS_WITH_NUMBERS = [
    f"/api/b/alice/{LONG_NUMBER}",
    f"/api/b/alice/{LONG_NUMBER}/jobs",
    f"/api/b/alice/{LONG_NUMBER}/artifacts/a.txt",
    f"/api/objects/{LONG_NUMBER}",
    f"/api/images/{LONG_NUMBER}",
    f"/api/variables/{LONG_NUMBER}",
    f"/api/cron/{LONG_NUMBER}",
    f"/api/keys/{LONG_NUMBER}",
    f"/api/b/alice/{'0' * 4400}{'9' * 20}",  # 20 significant digits: past any id
]


async def test_path_numbers_of_any_length_are_404(api: TestClient, alice: User, token: MakeToken):
    scope = "build:read object:read image:read variable:read cron:read key:read"
    headers = bearer(await token(scope))
    for path in PATHS_WITH_NUMBERS:
        resp = await api.get(path, headers=headers)
        assert resp.status == 404, path[:40]
        assert await resp.json() == {"message": "Not Found"}


async def test_path_number_with_long_leading_zeros_still_names_its_id(api: TestClient, alice: User):
    resp = await api.post("/api/tokens", headers=basic(), json={"name": "t", "scope": ""})
    assert resp.status == 201
    padded = f"/api/tokens/{'0' * 5000}{(await resp.json())['id']}"
    resp = await api.delete(padded, headers=basic())
    assert resp.status == 204  # looked up, not refused by int()
    resp = await api.delete(padded, headers=basic())
    assert resp.status == 404


# --- multipart and form bodies -----------------------------------------------------------------

MULTIPART = "multipart/form-data"
BOUNDARY = "xyzzy"
CONTROL_IN_HEADER = (
    b"--xyzzy\r\n"
    b'Content-Disposition: form-data; name="name"\r\n'
    b"X-Note: a\x01b\r\n"
    b"\r\n"
    b"value\r\n"
    b"--xyzzy--\r\n"
)
CONTROL_IN_NAME = (
    b'--xyzzy\r\nContent-Disposition: form-data; name="na\x01me"\r\n\r\nvalue\r\n--xyzzy--\r\n'
)


@pytest.mark.parametrize(("path", "scope"), UPLOADS)
async def test_upload_without_boundary_is_a_field_keyed_400(
    api: TestClient, alice: User, token: MakeToken, path: str, scope: str
):
    headers = {**bearer(await token(scope)), "Content-Type": MULTIPART}
    resp = await api.post(path, headers=headers, data=b"name=x")
    assert resp.status == 400
    assert await resp.json() == {"body": [NO_BOUNDARY]}


@pytest.mark.parametrize(("path", "scope"), UPLOADS)
@pytest.mark.parametrize("body", [CONTROL_IN_HEADER, CONTROL_IN_NAME])
async def test_upload_with_a_control_character_in_a_part_header_is_a_field_keyed_400(
    api: TestClient, alice: User, token: MakeToken, path: str, scope: str, body: bytes
):
    headers = {**bearer(await token(scope)), "Content-Type": f"{MULTIPART}; boundary={BOUNDARY}"}
    resp = await api.post(path, headers=headers, data=body)
    assert resp.status == 400
    assert await resp.json() == {"body": [BAD_PART_HEADERS]}


def form_error(path: str, text: str) -> dict[str, Any]:
    """The 400 of an unreadable OAuth form: field-keyed; the token endpoint adds RFC 6749
    §5.2's fields (docs/api.md §16.3)."""
    if path == "/login/oauth/token":
        return {"error": "invalid_request", "error_description": text, "body": [text]}
    return {"body": [text]}


@pytest.mark.parametrize("path", OAUTH)
async def test_oauth_form_without_boundary_is_a_field_keyed_400(api: TestClient, path: str):
    resp = await api.post(path, headers={"Content-Type": MULTIPART}, data=b"code=x")
    assert resp.status == 400
    assert await resp.json() == form_error(path, NO_BOUNDARY)


@pytest.mark.parametrize("path", OAUTH)
@pytest.mark.parametrize("body", [CONTROL_IN_HEADER, CONTROL_IN_NAME])
async def test_oauth_form_with_a_control_character_in_a_part_header_is_a_field_keyed_400(
    api: TestClient, path: str, body: bytes
):
    headers = {"Content-Type": f"{MULTIPART}; boundary={BOUNDARY}"}
    resp = await api.post(path, headers=headers, data=body)
    assert resp.status == 400
    assert await resp.json() == form_error(path, BAD_PART_HEADERS)


UNDECODABLE_FORMS = [
    ("application/x-www-form-urlencoded", b"code=\xff\xfe"),  # not UTF-8
    ("application/x-www-form-urlencoded; charset=no-such-charset", b"code=x"),
    (
        f"{MULTIPART}; boundary={BOUNDARY}",
        b'--xyzzy\r\nContent-Disposition: form-data; name="code"\r\n'
        b"Content-Transfer-Encoding: rot13\r\n\r\nx\r\n--xyzzy--\r\n",
    ),
    (
        f"{MULTIPART}; boundary={BOUNDARY}",
        b'--xyzzy\r\nContent-Disposition: form-data; name="code"\r\n'
        b"Content-Type: text/plain; charset=no-such-charset\r\n\r\nx\r\n--xyzzy--\r\n",
    ),
    (f"{MULTIPART}; boundary={BOUNDARY}", b"this is not multipart at all"),
]


async def test_oauth_forms_that_cannot_be_decoded_are_a_field_keyed_400(api: TestClient):
    for path in OAUTH:
        for content_type, body in UNDECODABLE_FORMS:
            resp = await api.post(path, headers={"Content-Type": content_type}, data=body)
            assert resp.status == 400, (path, content_type, body)
            assert await resp.json() == form_error(path, BAD_FORM)


# --- the access log (row 16) -------------------------------------------------------------------


async def test_access_log_escapes_control_characters_in_the_path(
    api: TestClient, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="marid.access")
    forged = "/api/x%0A2026-01-01 00:00:00,000 INFO [-] marid.access: GET /api/user 200 1.0ms"
    resp = await api.get(forged + "%0D%E2%80%A8%C2%85%1B%5B31m%5C")
    assert resp.status == 404
    [record] = [r for r in caplog.records if r.name == "marid.access"]
    line = record.getMessage()
    assert "\n" not in line and "\r" not in line and "\u2028" not in line and "\x1b" not in line
    assert line.startswith("GET /api/x\\n2026-01-01 00:00:00,000 INFO")
    assert "\\r\\u2028\\x85\\x1b[31m\\\\ 404 " in line


def test_printable_leaves_ordinary_text_alone_and_escapes_the_rest():
    assert printable("GET /api/n/alice/a/-/builds é ü") == "GET /api/n/alice/a/-/builds é ü"
    assert printable("a\tb\x00c\u202ed\udc80") == "a\\tb\\x00c\\u202ed\\udc80"
    assert printable("back\\slash") == "back\\\\slash"  # an escape cannot be faked
