"""Issue 11 row 12: an uploaded docker image is loaded into the engine under a cache tag
(`marid-cache/sha256:<archive sha256>`), and only builds that resolve it as an upload (their
namespace's, or their owner's personal images: docs/manifest.md §9.2) may run it. Real builds of
two users on the real engine."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import docker
import pytest
from aiohttp.test_utils import TestClient
from docker.errors import ImageNotFound

from marid.api.app import create_app
from marid.config import Config
from marid.runner.drivers.docker import CACHE_REPOSITORY
from marid.runner.worker import Worker
from marid.users import User
from tests.conftest import MakeToken, MakeUser, bearer
from tests.runner.conftest import BUSYBOX, background_worker
from tests.runner.test_worker import finished, submit, wait_for

pytestmark = pytest.mark.docker
SCOPE = "build:read,write image:read,write namespace:read,write"


@dataclasses.dataclass(frozen=True)
class Private:
    name: str  # the name it is uploaded under; the engine has no image of that name
    archive: Path
    digest: str  # sha256 of the archive: its cache tag
    secret: str  # the content of its /secret, in no other image


@pytest.fixture
def private_image(docker_engine: docker.DockerClient, tmp_path: Path) -> Iterator[Private]:
    """A `docker save` archive of an image of its own (busybox with a /secret): its ID is no
    other image's. Its cache tag, and any tag a test gives it, are removed afterwards."""
    secret = f"secret-{random.randrange(10**9)}"
    repository = f"marid-test/private-{random.randrange(10**9)}"
    container = docker_engine.containers.run(
        BUSYBOX, ["sh", "-c", f"echo {secret} > /secret"], network_mode="none", detach=True
    )
    try:
        container.wait()
        image = container.commit(repository, "v1")
    finally:
        container.remove(force=True)
    archive = tmp_path / "private.tar"
    try:
        with archive.open("wb") as file:
            for chunk in image.save(named=f"{repository}:v1"):
                file.write(chunk)
    finally:
        docker_engine.images.remove(f"{repository}:v1")  # the image goes with its only tag
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    yield Private(f"{repository}:v1", archive, digest, secret)
    with contextlib.suppress(ImageNotFound):
        for tag in docker_engine.images.get(f"{CACHE_REPOSITORY}:{digest}").tags:
            docker_engine.images.remove(tag)


@pytest.fixture
def docker_config(config: Config, docker_engine: docker.DockerClient) -> Config:
    return dataclasses.replace(
        config,
        drivers=["docker"],
        docker=dataclasses.replace(config.docker, network="none"),
        runner=dataclasses.replace(config.runner, lease=5.0),
    )


@pytest.fixture
async def client(aiohttp_client: Any, docker_config: Config, pool: asyncpg.Pool) -> TestClient:
    return await aiohttp_client(create_app(docker_config, pool))


@pytest.fixture
async def worker(docker_config: Config, pool: asyncpg.Pool) -> AsyncIterator[Worker]:
    async with background_worker(docker_config, pool) as running:
        yield running


@pytest.fixture
async def bob(make_user: MakeUser) -> User:
    return await make_user("bob")


async def upload(client: TestClient, token: str, image: Private, **params: str) -> None:
    """POST /images of the archive as a docker image named like it."""
    resp = await client.post(
        "/api/images",
        headers={**bearer(token), "Content-Type": "application/x-tar"},
        params={"name": image.name, "driver": "docker", **params},
        data=io.BytesIO(image.archive.read_bytes()),
    )
    assert resp.status == 201, await resp.text()


async def build(client: TestClient, token: str, image: str, extra: str = "") -> dict[str, Any]:
    """The finished build of one job printing /secret in `image` (`extra`: manifest lines)."""
    manifest = (
        extra + f"driver: {{type: docker, image: '{image}', workspace: /w}}\n"
        "stages: [one]\njobs:\n- stage: one\n  commands: ['cat /secret']\n"
    )
    return await wait_for(client, token, (await submit(client, token, manifest))["url"], finished)


async def loaded(
    client: TestClient, docker_engine: docker.DockerClient, token: str, image: Private
) -> str:
    """Upload `image` and run it in a build of the uploader; returns its ID in the engine."""
    await upload(client, token, image)
    own = await build(client, token, image.name)
    assert own["status"] == "passed", own["output"]
    assert f"{image.secret}\n" in own["output"]
    return str(docker_engine.images.get(f"{CACHE_REPOSITORY}:{image.digest}").id)


def refused(body: dict[str, Any], image: Private) -> bool:
    return body["status"] == "failed" and image.secret not in body["output"]


async def test_another_users_build_cannot_run_an_upload_by_its_cache_tag_or_id(
    client: TestClient,
    token: MakeToken,
    bob: User,
    worker: Worker,
    docker_engine: docker.DockerClient,
    private_image: Private,
) -> None:
    alice = await token(SCOPE)
    image_id = await loaded(client, docker_engine, alice, private_image)
    others = await token(SCOPE, user=bob)

    for name in [
        f"{CACHE_REPOSITORY}:{private_image.digest}",
        f"docker.io/{CACHE_REPOSITORY}:{private_image.digest}",
        f"index.docker.io/{CACHE_REPOSITORY}",
        image_id,
        image_id.removeprefix("sha256:"),
        image_id.removeprefix("sha256:")[:12],  # a short ID, as `docker images` shows
        f"{CACHE_REPOSITORY}@{image_id}",
    ]:
        body = await build(client, others, name)
        assert refused(body, private_image), (name, body["output"])
        assert f"error: image {name} is not available to this build\n" in body["output"]
        assert "upload" not in body["output"].lower(), body["output"]  # nothing said of whose


async def test_a_digest_reference_to_an_upload_is_refused(
    client: TestClient,
    token: MakeToken,
    bob: User,
    worker: Worker,
    docker_engine: docker.DockerClient,
    private_image: Private,
) -> None:
    """Some engines resolve `anything@sha256:<image ID>` to the image with that ID; this one
    may answer "not found": either way the build fails without running it."""
    image_id = await loaded(client, docker_engine, await token(SCOPE), private_image)

    body = await build(client, await token(SCOPE, user=bob), f"busybox@{image_id}")

    assert refused(body, private_image), body["output"]


async def test_the_uploaders_other_builds_reach_it_only_by_its_name(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    docker_engine: docker.DockerClient,
    private_image: Private,
) -> None:
    alice = await token(SCOPE)
    image_id = await loaded(client, docker_engine, alice, private_image)

    body = await build(client, alice, image_id)

    assert refused(body, private_image), body["output"]
    assert f"error: image {image_id} is not available to this build\n" in body["output"]


async def test_an_image_the_engine_also_has_under_a_public_tag_stays_usable(
    client: TestClient,
    token: MakeToken,
    bob: User,
    worker: Worker,
    docker_engine: docker.DockerClient,
    private_image: Private,
) -> None:
    image_id = await loaded(client, docker_engine, await token(SCOPE), private_image)
    public = f"marid-test/public-{random.randrange(10**9)}"
    docker_engine.images.get(image_id).tag(public, "1")  # e.g. an administrator's `docker load`
    others = await token(SCOPE, user=bob)

    by_tag, by_id = (
        await build(client, others, f"{public}:1"),
        await build(client, others, image_id),
    )
    by_cache = await build(client, others, f"{CACHE_REPOSITORY}:{private_image.digest}")

    assert (by_tag["status"], by_id["status"]) == ("passed", "passed"), by_id["output"]
    assert f"Using image {image_id} ({image_id})\n" in by_id["output"]
    assert refused(by_cache, private_image)  # the cache repository is never a build's


async def test_a_namespaces_upload_serves_the_namespaces_builds_only(
    client: TestClient,
    token: MakeToken,
    bob: User,
    worker: Worker,
    docker_engine: docker.DockerClient,
    private_image: Private,
) -> None:
    alice = await token(SCOPE)
    resp = await client.post("/api/namespaces", headers=bearer(alice), json={"name": "team"})
    assert resp.status == 201, await resp.text()
    await upload(client, alice, private_image, namespace="team")

    in_team = await build(client, alice, private_image.name, "namespace: team\n")
    image_id = str(docker_engine.images.get(f"{CACHE_REPOSITORY}:{private_image.digest}").id)
    personal = await build(client, alice, private_image.name)  # not among her personal images
    by_cache = await build(client, alice, f"{CACHE_REPOSITORY}:{private_image.digest}")
    by_id = await build(client, await token(SCOPE, user=bob), image_id)

    assert in_team["status"] == "passed", in_team["output"]
    assert f"{private_image.secret}\n" in in_team["output"]
    assert refused(personal, private_image)
    assert f"error: image {private_image.name} not found" in personal["output"]
    for body in (by_cache, by_id):
        assert refused(body, private_image), body["output"]
        assert "is not available to this build\n" in body["output"]
