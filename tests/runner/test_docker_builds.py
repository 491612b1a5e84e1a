"""Issue 4's acceptance on the real Docker engine: builds submitted over HTTP, executed by a
real runner in containers, observed through the API."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import docker
import pytest
from aiohttp.test_utils import TestClient

from marid.api.app import create_app
from marid.config import Config
from marid.pgcluster import free_port
from marid.runner.drivers.docker import STOP_TIMEOUT
from marid.runner.worker import Worker, instance_of
from tests.conftest import MakeToken, bearer
from tests.runner.conftest import (
    BUSYBOX,
    ROOT,
    Gate,
    GatedClient,
    LoopbackRegistry,
    background_worker,
)
from tests.runner.test_worker import finished, submit, wait_for

pytestmark = pytest.mark.docker
SCOPE = "build:read,write,delete variable:write object:write namespace:read,write"
GIT_IMAGE = "marid-test/git:latest"


@pytest.fixture
def pull() -> str:
    """docker.pull for the test's runner; the pull tests parametrize it."""
    return "never"


@pytest.fixture
def docker_config(config: Config, docker_engine: docker.DockerClient, pull: str) -> Config:
    return dataclasses.replace(
        config,
        drivers=["docker"],
        docker=dataclasses.replace(config.docker, network="none", pull=pull),
        runner=dataclasses.replace(config.runner, lease=5.0),
    )


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], docker_config: Config, pool: asyncpg.Pool
) -> TestClient:
    return await aiohttp_client(create_app(docker_config, pool))


@pytest.fixture
async def worker(docker_config: Config, pool: asyncpg.Pool) -> AsyncIterator[Worker]:
    async with background_worker(docker_config, pool) as running:
        yield running


def leftovers(engine: docker.DockerClient, build_id: int, dsn: str) -> list[str]:
    """Containers and volumes a build left behind (the driver labels what it creates). Other
    test runs may share the engine with the same build ids: the instance label tells them apart."""
    label = {"label": [f"marid.build={build_id}", f"marid.instance={instance_of(dsn)}"]}
    containers = engine.containers.list(all=True, filters=label)
    volumes = engine.volumes.list(filters=label)
    return [c.name for c in containers] + [v.name for v in volumes]


ACCEPTANCE = """\
driver:
  type: docker
  image: marid-test/busybox:latest
  workspace: /workspace
env:
- PLAIN=visible
objects:
- data.txt => conf/data.txt
stages:
- lint
- test
- package
allow_failures:
- lint
jobs:
- stage: lint
  commands:
  - echo linting
  - exit 1
- stage: test
  commands:
  - echo "secret is $SECRET"
  - cat conf/data.txt
  - pwd
- stage: package
  commands:
  - head -c 200000 /dev/urandom > app.bin
  artifacts:
  - app.bin => dist/app.bin
"""


async def test_three_stage_build_on_the_docker_engine(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    docker_engine: docker.DockerClient,
    db_dsn: str,
):
    value = await token(SCOPE)
    await client.post(
        "/api/variables",
        headers=bearer(value),
        json={"key": "SECRET", "value": "hunter2-secret", "mask": True},
    )
    await client.post("/api/objects?name=data.txt", headers=bearer(value), data=b"object content\n")
    build = await submit(client, value, ACCEPTANCE)
    build = await wait_for(client, value, build["url"], finished)
    assert build["status"] == "passed_with_failures", build["output"]
    base = f"/api/b/alice/{build['number']}"
    jobs = await (await client.get(base + "/jobs", headers=bearer(value))).json()
    assert [(j["name"], j["status"]) for j in jobs] == [
        ("create-driver", "passed"),
        ("lint.1", "passed_with_failures"),
        ("test.1", "passed"),
        ("package.1", "passed"),
    ]
    test_output = jobs[2]["output"]
    assert "secret is xxxxxx" in test_output and "hunter2" not in build["output"]
    assert "object content\n" in test_output and "/workspace\n" in test_output

    artifacts = await (await client.get(base + "/artifacts", headers=bearer(value))).json()
    raw = await client.get(
        base + "/artifacts/dist/app.bin",
        headers={**bearer(value), "Accept": "application/octet-stream"},
    )
    content = await raw.read()
    assert len(content) == 200000 == artifacts[0]["size"]
    assert hashlib.sha256(content).hexdigest() == artifacts[0]["sha256"]
    assert leftovers(docker_engine, build["id"], db_dsn) == []


async def test_missing_image_fails_create_driver(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    docker_engine: docker.DockerClient,
    db_dsn: str,
):
    value = await token(SCOPE)
    manifest = "driver: {type: docker, image: 'nothere/image:1', workspace: /w}\n"
    build = await wait_for(client, value, (await submit(client, value, manifest))["url"], finished)
    assert build["status"] == "failed"
    assert (
        "image nothere/image:1 not found: upload it with POST /images (driver docker) "
        "or load it on the runner" in build["output"]
    )
    assert leftovers(docker_engine, build["id"], db_dsn) == []


@pytest.fixture(scope="session")
def git_image(docker_engine: docker.DockerClient) -> str:
    """The Debian image with git (debootstrap; cached between runs on this machine)."""
    subprocess.run(
        ["scripts/test-images", "--only", "git"], cwd=ROOT, check=True, capture_output=True
    )
    return GIT_IMAGE


@pytest.fixture
def git_bundle(tmp_path: Path) -> Path:
    """A local repository with tag v1 ("version one") and main ("version two"), as a bundle
    file: `git clone` reads it like a remote, with no network."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "README").write_text("version one\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    subprocess.run([*git, "tag", "v1"], check=True)
    (repo / "README").write_text("version two\n")
    subprocess.run([*git, "commit", "-q", "-am", "two"], check=True)
    bundle = tmp_path / "repo.bundle"
    subprocess.run(
        [*git, "bundle", "create", str(bundle), "--all"], check=True, capture_output=True
    )
    return bundle


async def test_sources_are_cloned_from_a_local_repository(
    client: TestClient, token: MakeToken, worker: Worker, git_image: str, git_bundle: Path
):
    value = await token(SCOPE)
    resp = await client.post(
        "/api/objects?name=repo.bundle", headers=bearer(value), data=git_bundle.read_bytes()
    )
    assert resp.status == 201, await resp.text()
    manifest = f"""\
driver: {{type: docker, image: '{git_image}', workspace: /src}}
objects:
- repo.bundle
sources:
- /src/repo.bundle v1 => tagged
- /src/repo.bundle => repo
stages: [check]
jobs:
- stage: check
  commands: [cat tagged/README repo/README]
"""
    build = await wait_for(client, value, (await submit(client, value, manifest))["url"], finished)
    assert build["status"] == "passed", build["output"]
    assert "version one\nversion two\n" in build["output"]


SLEEPER = (
    "driver: {type: docker, image: 'marid-test/busybox:latest', workspace: /w}\n"
    "stages: [s]\njobs:\n- stage: s\n  commands: [echo up, sleep 60]\n"
)


async def kill(client: TestClient, token: str, build: dict) -> None:
    resp = await client.delete(f"/api/b/alice/{build['number']}", headers=bearer(token))
    assert resp.status == 204


async def job_output(client: TestClient, token: str, build: dict, job: str) -> str:
    """What a user reads at GET /b/:username/:number/jobs/:name/output."""
    url = f"/api/b/alice/{build['number']}/jobs/{job}/output"
    resp = await client.get(url, headers=bearer(token))
    assert resp.status == 200, await resp.text()
    return await resp.text()


async def until_output(client: TestClient, token: str, build: dict, job: str, text: str) -> None:
    """Return once the job's live output (Server-Sent Events) holds `text`."""
    url = f"/api/b/alice/{build['number']}/jobs/{job}/output"
    headers = {**bearer(token), "Accept": "text/event-stream"}
    seen = ""
    async with asyncio.timeout(60), client.get(url, headers=headers) as resp:
        async for line in resp.content:
            if line.startswith(b"data:") and "text" in (data := json.loads(line[5:])):
                seen += data["text"]
                if text in seen:
                    return
    raise AssertionError(f"{job} ended without {text!r} in its output: {seen!r}")


async def test_delete_kills_a_running_container_build(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    docker_engine: docker.DockerClient,
    db_dsn: str,
):
    value = await token(SCOPE)
    build = await submit(client, value, SLEEPER)
    await until_output(client, value, build, "s.1", "up\n")
    await kill(client, value, build)
    # Sooner than the SIGKILL that follows SIGTERM after STOP_TIMEOUT: the shell got SIGTERM.
    async with asyncio.timeout(STOP_TIMEOUT - 1):
        done = await wait_for(client, value, build["url"], finished)
    assert done["status"] == "killed"
    assert leftovers(docker_engine, build["id"], db_dsn) == []


@pytest.mark.parametrize(
    ("where", "job"),
    [("volume", "create-driver"), ("container", "s.1"), ("created", "s.1")],
    ids=["while-the-volume-is-made", "while-the-container-is-made", "before-the-container-starts"],
)
async def test_a_kill_while_the_engine_creates_ends_killed_and_leaves_nothing(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    docker_engine: docker.DockerClient,
    db_dsn: str,
    where: str,
    job: str,
):
    """The engine call is held at a gate while the kill lands, and released only once the
    runner has reported the job killed: the container or volume it then makes is removed
    with the rest, and a created container never starts."""
    gate = Gate(where)
    worker.docker = GatedClient(gate)  # what the worker's first docker build uses
    value = await token(SCOPE)
    build = await submit(client, value, SLEEPER)
    try:
        await gate.wait()
        await kill(client, value, build)
        url = build["url"] + f"/jobs/{job}"
        await wait_for(client, value, url, lambda body: body["status"] == "killed")
    finally:
        gate.release()
    done = await wait_for(client, value, build["url"], finished)
    assert done["status"] == "killed"
    assert "up\n" not in done["output"]
    assert leftovers(docker_engine, build["id"], db_dsn) == []


# --- why a job ended (docs/manifest.md §6.8) ---------------------------------------------------


def ready_then(*commands: str, **fields: str) -> str:
    """A one-job build whose job prints "ready" (and nothing else), then runs `commands`."""
    extra = "".join(f"{key}: {value}\n" for key, value in fields.items())
    listed = ", ".join(repr(command) for command in ["set +x", "echo ready", *commands])
    return (
        "driver: {type: docker, image: 'marid-test/busybox:latest', workspace: /w}\n"
        f"{extra}stages: [s]\njobs:\n- stage: s\n  commands: [{listed}]\n"
    )


def job_container(engine: docker.DockerClient, build_id: int, dsn: str, job: str) -> Any:
    """The container running `job` of the build, found by the labels the driver sets."""
    labels = [f"marid.build={build_id}", f"marid.instance={instance_of(dsn)}", f"marid.job={job}"]
    (container,) = engine.containers.list(all=True, filters={"label": labels})
    return container


async def test_a_container_killed_from_outside_fails_the_job_and_says_so(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    docker_engine: docker.DockerClient,
    db_dsn: str,
):
    value = await token(SCOPE)
    build = await submit(client, value, ready_then("sleep 60"))
    await until_output(client, value, build, "s.1", "ready\n")

    await asyncio.to_thread(job_container(docker_engine, build["id"], db_dsn, "s.1").kill)

    done = await wait_for(client, value, build["url"], finished)
    assert done["status"] == "failed"
    assert await job_output(client, value, build, "s.1") == (
        "+ set +x\nready\nkilled by signal 9 (SIGKILL)\n"
    )
    assert leftovers(docker_engine, build["id"], db_dsn) == []


async def test_a_kill_request_says_so_last(client: TestClient, token: MakeToken, worker: Worker):
    value = await token(SCOPE)
    build = await submit(client, value, ready_then("sleep 60"))
    await until_output(client, value, build, "s.1", "ready\n")

    await kill(client, value, build)

    done = await wait_for(client, value, build["url"], finished)
    assert done["status"] == "killed"
    assert await job_output(client, value, build, "s.1") == "+ set +x\nready\nkilled on request\n"


async def test_a_job_out_of_memory_says_so_with_the_limit(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    docker_engine: docker.DockerClient,
    db_dsn: str,
):
    value = await token(SCOPE)
    # dd fills a 64 MiB buffer: twice the limit, and no swap to spill into. It starts once the
    # test opens the gate, after the engine's start call: Docker 20.10 watches a container for
    # out-of-memory kills only from then on.
    gate = "until [ -e gate ]; do sleep 0.05; done"
    hog = ready_then(gate, "dd if=/dev/zero of=/dev/null bs=64M count=1", resources="{memory: 32m}")
    build = await submit(client, value, hog)
    await until_output(client, value, build, "s.1", "ready\n")

    container = job_container(docker_engine, build["id"], db_dsn, "s.1")
    await asyncio.to_thread(container.exec_run, ["touch", "gate"])

    done = await wait_for(client, value, build["url"], finished)
    assert done["status"] == "failed"
    # The shell reports its killed command ("Killed"), then marid says why.
    assert await job_output(client, value, build, "s.1") == (
        "+ set +x\nready\nKilled\nout of memory (limit 32m)\n"
    )


async def test_a_job_time_limit_says_so_last(client: TestClient, token: MakeToken, worker: Worker):
    value = await token(SCOPE)
    manifest = ready_then("sleep 60").replace("  commands:", "  timeout: 3s\n  commands:")
    build = await submit(client, value, manifest)

    done = await wait_for(client, value, build["url"], finished)
    assert done["status"] == "timed_out"
    # The limit counts from the job's start, container creation included: "ready" may or
    # may not have come first.
    output = await job_output(client, value, build, "s.1")
    assert output.endswith("\ntime limit 3s reached\n") or output == "time limit 3s reached\n"


# --- docker.pull ------------------------------------------------------------------------------
# Every image named here lives on a "registry" on loopback where nothing listens: a pull the
# engine attempts is refused at once, and no traffic leaves the machine.


def refusing_registry() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def present_image(docker_engine: docker.DockerClient) -> Iterator[str]:
    """busybox under a second name, on the refusing registry: pulling it would fail."""
    repository = f"{refusing_registry()}/marid-present"
    docker_engine.images.get(BUSYBOX).tag(repository, "latest")
    yield f"{repository}:latest"
    docker_engine.images.remove(f"{repository}:latest")  # the tag only


def on(image: str) -> str:
    return (
        f"driver: {{type: docker, image: '{image}', workspace: /w}}\n"
        "stages: [s]\njobs:\n- stage: s\n  commands: [echo ran]\n"
    )


@pytest.mark.parametrize("pull", ["if-not-present"])
async def test_if_not_present_uses_an_image_the_engine_has_without_pulling(
    client: TestClient, token: MakeToken, worker: Worker, present_image: str
):
    value = await token(SCOPE)
    build = await submit(client, value, on(present_image))
    done = await wait_for(client, value, build["url"], finished)

    assert done["status"] == "passed", done["output"]  # a pull would have been refused
    output = await job_output(client, value, build, "create-driver")
    assert output.startswith(f"Using image {present_image} (sha256:")
    assert "Pulling" not in output


@pytest.mark.parametrize("pull", ["never"])
async def test_never_names_the_missing_image_and_the_policy(
    client: TestClient, token: MakeToken, worker: Worker
):
    value = await token(SCOPE)
    missing = f"{refusing_registry()}/marid-missing:latest"
    build = await submit(client, value, on(missing))
    done = await wait_for(client, value, build["url"], finished)

    assert done["status"] == "failed"
    assert await job_output(client, value, build, "create-driver") == (
        f"error: image {missing} not found: upload it with POST /images (driver docker) or load"
        " it on the runner (this runner pulls no images: docker.pull is never)\n"
    )


@pytest.mark.parametrize(
    ("pull", "present"), [("if-not-present", False), ("always", True)], ids=["missing", "present"]
)
async def test_a_refused_pull_fails_the_build_with_the_engines_reason(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    request: pytest.FixtureRequest,
    pull: str,
    present: bool,
):
    """`always` pulls even an image the engine has; a pull that fails ends the build, the
    engine's reason in the create-driver job's output."""
    image = (
        request.getfixturevalue("present_image")
        if present
        else f"{refusing_registry()}/marid-missing:latest"
    )
    value = await token(SCOPE)
    build = await submit(client, value, on(image))
    done = await wait_for(client, value, build["url"], finished)

    assert done["status"] == "failed"
    pulling, error = (await job_output(client, value, build, "create-driver")).splitlines()
    assert pulling == f"Pulling image {image} (docker.pull is {pull})"
    # The engine's words: 'Get "http://127.0.0.1:<port>/v2/": dial tcp ... connection refused'
    assert error.startswith(f"error: image {image} could not be pulled: Get ")
    assert error.endswith(f"dial tcp {image.split('/')[0]}: connect: connection refused")


@pytest.mark.parametrize("pull", ["if-not-present", "always"])
async def test_a_missing_image_is_pulled_from_a_registry(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    loopback_registry: LoopbackRegistry,
    pull: str,
):
    image = f"{loopback_registry.address}/marid-pulled:latest"
    value = await token(SCOPE)
    build = await submit(client, value, on(image))
    done = await wait_for(client, value, build["url"], finished)

    assert done["status"] == "passed", done["output"]
    pulling, status, using = (await job_output(client, value, build, "create-driver")).splitlines()
    assert pulling == f"Pulling image {image} (docker.pull is {pull})"
    assert status == f"Status: Downloaded newer image for {image}"
    assert using.startswith(f"Using image {image} (sha256:")
    assert "ran\n" in done["output"]
