"""A client generated from /api/openapi.json by openapi-python-client, used against a live
server (issue 12 part 5): it lists, creates and reads a nested namespace.

Generation runs offline into tmp_path (about a second: no formatter hooks), and the generated
package is imported under a name of its own.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MakeToken

PACKAGE = "marid_generated_client"
CONFIG = f"post_hooks: []\nproject_name_override: marid-generated-client\npackage_name_override: {PACKAGE}\n"  # noqa: E501


async def generate(api: TestClient, where: Path) -> None:
    doc = await (await api.get("/api/openapi.json")).json()
    (where / "openapi.json").write_text(json.dumps(doc))
    (where / "config.yaml").write_text(CONFIG)
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("openapi-python-client")),
        "generate",
        "--path", str(where / "openapi.json"),
        "--config", str(where / "config.yaml"),
        "--output-path", str(where / PACKAGE),
        "--meta", "none",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()


@pytest.fixture
def importable(tmp_path: Path) -> Iterator[Path]:
    """tmp_path on sys.path for the test, and the generated package forgotten after it."""
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def module(name: str) -> ModuleType:
    return importlib.import_module(f"{PACKAGE}.{name}")


async def test_a_generated_client_lists_creates_and_reads_a_nested_namespace(
    api: TestClient, token: MakeToken, importable: Path
):
    await generate(api, importable)
    client_module = module("client")
    create = module("api.default.create_namespace")
    show = module("api.default.show_namespace")
    list_all = module("api.default.list_namespaces")
    list_children = module("api.default.list_children")
    request = module("models.namespace_request").NamespaceRequest
    client: Any = client_module.AuthenticatedClient(
        base_url=str(api.make_url("/api")),
        token=await token("namespace:read,write"),
        raise_on_unexpected_status=True,
    )
    async with client:
        root = await create.asyncio_detailed(client=client, body=request(name="acme"))
        assert root.status_code == 201, root.content
        child = await create.asyncio_detailed(
            client=client, body=request(name="web", parent="acme")
        )
        assert child.status_code == 201, child.content
        assert child.parsed.path == "acme/web"
        shown = await show.asyncio(client=client, username="alice", path="acme/web")
        assert (shown.name, shown.path, shown.parent.path) == ("web", "acme/web", "acme")
        assert shown.id == child.parsed.id and isinstance(shown.id, int)
        listed = await list_all.asyncio_detailed(client=client, page=1)
        assert [n.path for n in listed.parsed] == ["acme", "acme/web"]
        assert 'rel="next"' in listed.headers["Link"]
        children = await list_children.asyncio(client=client, username="alice", path="acme")
        assert [n.path for n in children] == ["acme/web"]
        missing = await show.asyncio_detailed(client=client, username="alice", path="acme/nope")
        assert missing.status_code == 404
        assert missing.parsed.message == "Not Found"
        refused = await create.asyncio_detailed(client=client, body=request(name="acme"))
        assert refused.status_code == 400
