"""Build caches end to end (docs/manifest.md §10): HTTP submission, a real worker, the API's view,
and the blob store on both backends."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from marid import config as config_module
from marid.api.app import create_app
from marid.config import Config
from marid.runner.worker import Worker
from tests.api.helpers import create_namespace
from tests.conftest import MakeToken, bearer
from tests.fixtures.s3 import NOT_NEEDED
from tests.runner.conftest import background_worker
from tests.runner.test_worker import finished, submit, wait_for

SCOPE = "build:read,write,delete namespace:read,write"


def manifest(commands: list[str], namespace: str = "proj", cache: str = "[deps, out/lib]") -> str:
    lines = "".join(f"  - {command}\n" for command in commands)
    head = f"namespace: {namespace}\n" if namespace else ""
    return (
        f"{head}driver:\n  type: os\ncache: {cache}\nstages: [build]\n"
        f"jobs:\n- stage: build\n  commands:\n{lines}"
    )


WRITE = manifest(["mkdir -p deps/sub out/lib", "echo one > deps/sub/a.txt", "echo two > out/lib/b"])
READ = manifest(["cat deps/sub/a.txt out/lib/b"])


@pytest.fixture
def os_config(config: Config) -> Config:
    return dataclasses.replace(
        config,
        drivers=["os"],
        runner=dataclasses.replace(config.runner, lease=2.0, parallelism=1),
    )


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], os_config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(os_config, pool))


@pytest.fixture
async def worker(os_config: Config, pool: asyncpg.Pool) -> AsyncIterator[Worker]:
    async with background_worker(os_config, pool, stop_timeout=30) as running:
        yield running


async def run(client: TestClient, token: str, text: str) -> tuple[dict[str, Any], list[dict]]:
    """Submit `text`, wait for its end; the build and its jobs."""
    build = await wait_for(client, token, (await submit(client, token, text))["url"], finished)
    jobs = await (
        await client.get(f"/api/b/alice/{build['number']}/jobs", headers=bearer(token))
    ).json()
    return build, jobs


async def test_a_cache_saved_by_one_build_is_restored_in_the_next(
    client: TestClient, token: MakeToken, worker: Worker
):
    value = await token(SCOPE)
    first, jobs = await run(client, value, WRITE)
    assert first["status"] == "passed", first["output"]
    assert "cache default: nothing saved yet; starting without it\n" in jobs[0]["output"]
    assert jobs[-1]["output"].endswith("cache default saved: 2 paths, 10.0 KiB\n")

    second, jobs = await run(client, value, READ)
    assert second["status"] == "passed", second["output"]
    assert (
        f"cache default restored: 2 paths, 10.0 KiB (saved by build #{first['number']})\n"
        in jobs[0]["output"]
    )
    assert "one\ntwo\n" in jobs[1]["output"]


async def test_another_namespace_does_not_see_the_cache(
    client: TestClient, token: MakeToken, worker: Worker
):
    value = await token(SCOPE)
    first, _ = await run(client, value, WRITE)
    assert first["status"] == "passed", first["output"]
    for other in (manifest(["cat deps/sub/a.txt"], "other"), manifest(["cat deps/sub/a.txt"], "")):
        build, jobs = await run(client, value, other)
        assert build["status"] == "failed"
        assert "cache default: nothing saved yet; starting without it\n" in jobs[0]["output"]
        assert "No such file or directory" in jobs[1]["output"]


async def test_a_failed_build_saves_nothing(client: TestClient, token: MakeToken, worker: Worker):
    value = await token(SCOPE)
    failing = manifest(["mkdir deps", "echo one > deps/a.txt", "exit 3"])
    build, jobs = await run(client, value, failing)
    assert build["status"] == "failed"
    assert "cache" not in jobs[-1]["output"]
    build, jobs = await run(client, value, manifest(["ls deps"]))
    assert build["status"] == "failed"
    assert "cache default: nothing saved yet" in jobs[0]["output"]


async def test_passed_with_failures_saves_nothing_and_says_so(
    client: TestClient, token: MakeToken, worker: Worker
):
    value = await token(SCOPE)
    text = WRITE.replace("stages: [build]", "stages: [build]\nallow_failures: [build]")
    text += "  - exit 1\n"
    build, jobs = await run(client, value, text)
    assert build["status"] == "passed_with_failures"
    assert (
        "cache default not saved: the build is passed_with_failures;"
        " only passed builds save a cache\n" in jobs[-1]["output"]
    )


async def test_paths_that_do_not_exist_are_named_and_none_saves_nothing(
    client: TestClient, token: MakeToken, worker: Worker
):
    value = await token(SCOPE)
    build, jobs = await run(client, value, manifest(["true"]))
    assert build["status"] == "passed"
    assert jobs[-1]["output"].endswith(
        "cache default not saved: none of its paths exist (deps, out/lib)\n"
    )
    build, jobs = await run(client, value, manifest(["mkdir deps", "echo x > deps/x"]))
    assert "cache default saved: 1 path, 10.0 KiB (out/lib did not exist)\n" in jobs[-1]["output"]


@pytest.fixture
def small_config(os_config: Config) -> Config:
    """Entries up to 30 KiB, 50 KiB per namespace."""
    caches = config_module.CachesConfig(max_size=30 * 1024, max_total=50 * 1024)
    return dataclasses.replace(os_config, caches=caches)


def sized(key: str, kib: int) -> str:
    return manifest(
        [f"mkdir -p deps && head -c {kib * 1024} /dev/zero > deps/{key}"],
        cache=f"{{key: {key}, paths: [deps]}}",
    )


async def test_a_cache_over_the_cap_is_not_saved_and_the_oldest_entries_are_evicted(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    small_config: Config,
    pool: asyncpg.Pool,
    token: MakeToken,
):
    client = await aiohttp_client(create_app(small_config, pool))
    value = await token(SCOPE)
    async with background_worker(small_config, pool, stop_timeout=30):
        _, jobs = await run(client, value, sized("huge", 40))
        assert jobs[-1]["output"].endswith(
            "cache huge not saved: larger than caches.max_size (30.0 KiB)\n"
        )
        for key in ("a", "b"):
            _, jobs = await run(client, value, sized(key, 15))
            assert f"cache {key} saved: 1 path, 20.0 KiB\n" in jobs[-1]["output"]
        _, jobs = await run(client, value, manifest(["ls deps"], cache="{key: a, paths: [deps]}"))
        assert "cache a restored" in jobs[0]["output"]  # a is now more recently used than b
        _, jobs = await run(client, value, sized("c", 15))
        assert jobs[-1]["output"].endswith(
            "cache c saved: 1 path, 20.0 KiB; evicted the least recently used: b\n"
        )
    listed = await client.get("/api/n/alice/proj/-/caches", headers=bearer(value))
    assert [entry["key"] for entry in await listed.json()] == ["c", "a"]


DOCKER = """\
namespace: proj
driver:
  type: docker
  image: marid-test/busybox:latest
  workspace: /workspace
cache:
  key: deps
  paths: [/workspace/deps, out]
stages: [build]
jobs:
- stage: build
  commands:
"""


@pytest.mark.docker
async def test_docker_builds_share_a_cache_through_either_blob_store(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    config: Config,
    pool: asyncpg.Pool,
    token: MakeToken,
    docker_engine: Any,
    storage_settings: dict[str, Any],
    stored_blobs: Callable[[], list[str]],
):
    storage = config_module.from_dict({"storage": storage_settings}, optional=NOT_NEEDED).storage
    docker_config = dataclasses.replace(
        config,
        drivers=["docker"],
        storage=storage,
        docker=dataclasses.replace(config.docker, network="none"),
        runner=dataclasses.replace(config.runner, lease=5.0),
    )
    client = await aiohttp_client(create_app(docker_config, pool))
    value = await token(SCOPE)
    write = DOCKER + (
        "  - mkdir -p deps/sub out && echo one > deps/sub/a.txt && ln -sf sub/a.txt deps/link\n"
        "  - echo $RANDOM > out/b && chmod 600 out/b\n"
    )
    read = DOCKER + "  - cat deps/link && ls -l out/b\n"
    async with background_worker(docker_config, pool):
        first, jobs = await run(client, value, write)
        assert first["status"] == "passed", first["output"]
        assert "cache deps saved: 2 paths" in jobs[-1]["output"]
        assert len(stored_blobs()) == 1
        second, jobs = await run(client, value, read)
        assert second["status"] == "passed", second["output"]
        assert "cache deps restored: 2 paths" in jobs[0]["output"]
        assert "one\n" in jobs[1]["output"] and "-rw-------" in jobs[1]["output"]
        third, jobs = await run(client, value, write)  # replaces the entry: one blob still
        assert "cache deps saved: 2 paths" in jobs[-1]["output"]
    assert len(stored_blobs()) == 1
    listed = await (await client.get("/api/n/alice/proj/-/caches", headers=bearer(value))).json()
    assert [(e["key"], e["paths"], e["build_url"]) for e in listed] == [
        ("deps", ["deps", "out"], f"https://ci.example.com/api/b/alice/{third['number']}")
    ]


async def test_this_builds_objects_win_over_what_the_cache_holds(
    client: TestClient, token: MakeToken, worker: Worker
):
    value = await token(SCOPE + " object:write")
    await create_namespace(client, value, "proj")
    resp = await client.post(
        "/api/objects?name=conf&namespace=proj", headers=bearer(value), data=b"fresh\n"
    )
    assert resp.status == 201, await resp.text()
    with_object = WRITE.replace("cache:", "objects: [conf => deps/conf]\ncache:")
    first, _ = await run(client, value, with_object + "  - echo stale > deps/conf\n")
    assert first["status"] == "passed", first["output"]
    second, jobs = await run(
        client,
        value,
        READ.replace("cache:", "objects: [conf => deps/conf]\ncache:").replace(
            "cat deps/sub/a.txt", "cat deps/conf deps/sub/a.txt"
        ),
    )
    assert second["status"] == "passed", second["output"]
    assert "fresh\none\ntwo\n" in jobs[1]["output"], jobs[0]["output"]
