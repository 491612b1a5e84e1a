"""Issue 11 row 8 on the real engine: what a job container gets (docs/manifest.md §9.2,
docs/security.md §2): no-new-privileges, the capabilities of docker.cap_drop taken away, the
OCI runtime of docker.runtime, and with docker.network `build` a network of the attempt's own."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import docker
import pytest
from aiohttp.test_utils import TestClient
from docker.models.networks import Network, NetworkCollection

from marid.api.app import create_app
from marid.config import Config, DockerConfig
from marid.runner.drivers.base import DriverError
from marid.runner.drivers.docker import LABEL_BUILD, LABEL_INSTANCE, DockerDriver
from marid.runner.worker import Worker, instance_of
from tests.conftest import MakeToken
from tests.runner.conftest import BUSYBOX, DEFAULT_HOST, ROOT, background_worker
from tests.runner.test_docker_builds import GIT_IMAGE, SCOPE, leftovers
from tests.runner.test_docker_driver import LIMITS, WORKSPACE, Output, nothing_uploaded, run
from tests.runner.test_worker import finished, submit, wait_for

pytestmark = pytest.mark.docker
_build_ids = itertools.count(random.randrange(10**6, 10**9, 1000))

# Linux capability numbers (linux/capability.h) of the engine's default set.
CAPABILITIES = {
    0: "CHOWN",
    1: "DAC_OVERRIDE",
    3: "FOWNER",
    4: "FSETID",
    5: "KILL",
    6: "SETGID",
    7: "SETUID",
    8: "SETPCAP",
    10: "NET_BIND_SERVICE",
    13: "NET_RAW",
    18: "SYS_CHROOT",
    27: "MKNOD",
    29: "AUDIT_WRITE",
    31: "SETFCAP",
}
# What a job keeps of them with the default docker.cap_drop: enough for apt and friends.
KEPT = {"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "NET_BIND_SERVICE"}
STATUS = "grep -E '^(CapEff|NoNewPrivs):' /proc/self/status"

MakeDriver = Callable[..., DockerDriver]


def privileges(output: str) -> tuple[set[str], str]:
    """(capability names, NoNewPrivs) from the lines STATUS printed."""
    fields = dict(line.split(":\t") for line in output.splitlines() if ":\t" in line)
    mask = int(fields["CapEff"], 16)
    unknown = mask & ~sum(1 << number for number in CAPABILITIES)
    assert not unknown, f"capabilities beyond the engine's defaults: {unknown:#x}"
    return {name for number, name in CAPABILITIES.items() if mask >> number & 1}, fields[
        "NoNewPrivs"
    ]


@pytest.fixture
async def make_driver(docker_engine: docker.DockerClient) -> AsyncIterator[MakeDriver]:
    """`make_driver(network=..., **settings)` -> a driver of busybox for a new build id; every
    driver made is destroyed afterwards."""
    drivers: list[DockerDriver] = []

    def make(network: str | None = "none", client: Any = None, **settings: Any) -> DockerDriver:
        driver = DockerDriver(
            client or docker_engine,
            build_id=next(_build_ids),
            attempt=1,
            image=BUSYBOX,
            workspace=WORKSPACE,
            limits=LIMITS,
            network=network,
            pull="never",
            uploaded=nothing_uploaded,
            instance="hardening-test",
            **settings,
        )
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await driver.destroy()


def containers_of(engine: docker.DockerClient, driver: DockerDriver) -> list[Any]:
    return engine.containers.list(all=True, filters={"label": f"{LABEL_BUILD}={driver.build_id}"})


def networks_of(
    engine: docker.DockerClient, build_id: int, instance: str = "hardening-test"
) -> list[Network]:
    labels = [f"{LABEL_BUILD}={build_id}", f"{LABEL_INSTANCE}={instance}"]
    return engine.networks.list(filters={"label": labels})


# --- privileges ------------------------------------------------------------------------------


async def test_a_job_has_no_new_privileges_and_not_the_dropped_capabilities(
    make_driver: MakeDriver,
) -> None:
    driver = make_driver()
    await driver.create(Output())

    capabilities, no_new_privileges = privileges((await run(driver, STATUS)).text)

    assert (capabilities, no_new_privileges) == (KEPT, "1")


@pytest.mark.parametrize(
    ("cap_drop", "expected"),
    [
        ([], set(CAPABILITIES.values())),  # the engine's whole default set
        (["CHOWN", "NET_RAW"], set(CAPABILITIES.values()) - {"CHOWN", "NET_RAW"}),
    ],
)
async def test_the_capabilities_dropped_are_docker_cap_drop(
    make_driver: MakeDriver, cap_drop: list[str], expected: set[str]
) -> None:
    driver = make_driver(cap_drop=cap_drop)
    await driver.create(Output())

    assert privileges((await run(driver, STATUS)).text) == (expected, "1")


async def test_the_helper_container_is_hardened_too(
    make_driver: MakeDriver, docker_engine: docker.DockerClient, tmp_path: Path
) -> None:
    driver = make_driver()
    await driver.create(Output())
    (tmp_path / "file").write_text("outside the workspace\n")
    await driver.place_object(tmp_path / "file", "/etc/placed")  # made by the helper

    (helper,) = containers_of(docker_engine, driver)
    assert helper.name.endswith("-files")
    host = helper.attrs["HostConfig"]
    assert (host["SecurityOpt"], sorted(host["CapDrop"]), host["NetworkMode"]) == (
        ["no-new-privileges"],
        sorted(["NET_RAW", "MKNOD", "SYS_CHROOT", "AUDIT_WRITE", "SETFCAP", "SETPCAP"]),
        "none",
    )


# --- runtime ---------------------------------------------------------------------------------


async def test_job_containers_run_under_docker_runtime(
    make_driver: MakeDriver, docker_engine: docker.DockerClient
) -> None:
    driver = make_driver(runtime="runc")
    await driver.create(Output())
    await run(driver, "true")

    (job,) = containers_of(docker_engine, driver)
    assert job.attrs["HostConfig"]["Runtime"] == "runc"


async def test_an_unknown_runtime_is_refused_before_anything_is_made(
    make_driver: MakeDriver, docker_engine: docker.DockerClient
) -> None:
    driver = make_driver(runtime="marid-no-such-runtime")
    out = Output()

    with pytest.raises(DriverError) as raised:
        await driver.create(out)

    runtimes = ", ".join(sorted(docker_engine.info()["Runtimes"]))
    assert str(raised.value) == (
        "docker.runtime 'marid-no-such-runtime' is not a runtime of this runner's Docker engine"
        f" (it has: {runtimes})"
    )
    assert out.text == ""  # the image was not even looked at
    assert containers_of(docker_engine, driver) == []


# --- the build's own network -----------------------------------------------------------------


async def test_docker_network_build_gives_the_attempt_a_network_of_its_own(
    make_driver: MakeDriver, docker_engine: docker.DockerClient
) -> None:
    first, second = make_driver(network="build"), make_driver(network="build")
    for driver in (first, second):
        await driver.create(Output())
    one = await run(first, "ip -o -4 addr show eth0 | awk '{print $4}'")
    two = await run(first, "ip -o -4 addr show eth0 | awk '{print $4}'")

    (network,) = networks_of(docker_engine, first.build_id)
    assert network.name == first.network
    assert network.attrs["Driver"] == "bridge"
    assert network.attrs["Labels"] == {
        "marid.build": str(first.build_id),
        "marid.attempt": "1",
        "marid.instance": "hardening-test",
    }
    (subnet,) = [pool["Subnet"] for pool in network.attrs["IPAM"]["Config"]]
    (other,) = networks_of(docker_engine, second.build_id)
    assert other.attrs["IPAM"]["Config"][0]["Subnet"] != subnet
    # Both jobs joined it (one after the other: the same first address).
    prefix = subnet.split("/")[0].rsplit(".", 1)[0]
    assert one.text.startswith(prefix) and two.text == one.text
    # The build's sandbox alone joined it; the job shared the sandbox's network namespace.
    by_role = {c.labels.get("marid.role"): c for c in containers_of(docker_engine, first)}
    assert by_role["network"].attrs["HostConfig"]["NetworkMode"] == network.name
    assert by_role[None].attrs["HostConfig"]["NetworkMode"] == f"container:{by_role['network'].id}"

    await first.destroy()

    assert networks_of(docker_engine, first.build_id) == []
    assert [n.name for n in networks_of(docker_engine, second.build_id)] == [other.name]


class _Networks(NetworkCollection):
    """Networks of a driver that the engine itself refuses (no such network driver)."""

    def create(self, name: Any, *args: Any, **kwargs: Any) -> Network:
        return super().create(name, *args, **{**kwargs, "driver": "marid-no-such-driver"})


class RefusingClient(docker.DockerClient):
    """A client of the real engine (as docker_client() makes) whose network creations fail."""

    @property
    def networks(self) -> NetworkCollection:
        return _Networks(client=self)


async def test_a_network_the_engine_cannot_create_is_a_driver_error_saying_so(
    make_driver: MakeDriver, docker_engine: docker.DockerClient
) -> None:
    client = RefusingClient(base_url=DEFAULT_HOST)
    driver = make_driver(network="build", client=client)
    try:
        with pytest.raises(DriverError) as raised:
            await driver.create(Output())
        await driver.destroy()
    finally:
        client.close()

    assert str(raised.value).startswith(
        "docker.network build: the engine could not create this build's network: "
    )
    assert "marid-no-such-driver" in str(raised.value)
    assert docker_engine.volumes.list(filters={"label": f"{LABEL_BUILD}={driver.build_id}"}) == []


# --- real builds -----------------------------------------------------------------------------


@pytest.fixture
def settings() -> dict[str, Any]:
    """docker.* settings of the test's runner besides the suite's (pull: never)."""
    return {}


@pytest.fixture
def docker_config(config: Config, docker_engine: docker.DockerClient, settings: Any) -> Config:
    """The suite's configuration with docker builds and the *default* docker.network."""
    return dataclasses.replace(
        config,
        drivers=["docker"],
        docker=dataclasses.replace(config.docker, network=DockerConfig().network, **settings),
        runner=dataclasses.replace(config.runner, lease=5.0),
    )


@pytest.fixture
async def client(aiohttp_client: Any, docker_config: Config, pool: asyncpg.Pool) -> TestClient:
    return await aiohttp_client(create_app(docker_config, pool))


@pytest.fixture
async def worker(docker_config: Config, pool: asyncpg.Pool) -> AsyncIterator[Worker]:
    async with background_worker(docker_config, pool) as running:
        yield running


@pytest.fixture(scope="session")
def debian_image(docker_engine: docker.DockerClient) -> str:
    """The Debian image with git and apt (scripts/test-images; cached on this machine)."""
    subprocess.run(
        ["scripts/test-images", "--only", "git"], cwd=ROOT, check=True, capture_output=True
    )
    return GIT_IMAGE


def on(image: str, *commands: str) -> str:
    """A manifest of one job running `commands` in `image`."""
    lines = "".join(f"  - {json.dumps(command)}\n" for command in commands)
    return (
        f"driver: {{type: docker, image: '{image}', workspace: /w}}\n"
        f"stages: [one]\njobs:\n- stage: one\n  commands:\n{lines}"
    )


async def test_a_build_on_the_defaults_is_hardened_on_a_network_of_its_own(
    client: TestClient,
    token: MakeToken,
    worker: Worker,
    docker_engine: docker.DockerClient,
    db_dsn: str,
) -> None:
    value = await token(SCOPE)
    manifest = on(BUSYBOX, STATUS, "ip -o -4 route show default | cut -d' ' -f1-2")
    build = await wait_for(client, value, (await submit(client, value, manifest))["url"], finished)

    assert build["status"] == "passed", build["output"]
    job = build["output"].split("one.1", 1)[-1]
    assert privileges(job) == (KEPT, "1")
    assert "default via" in job  # on a bridge network: with `none` there is no route at all
    assert leftovers(docker_engine, build["id"], db_dsn) == []
    assert networks_of(docker_engine, build["id"], instance_of(db_dsn)) == []


# What apt and package scripts do as root: chown, switch users (setuid/setgid, su with PAM),
# add users and write files as them.
AS_ROOT = [
    "touch /tmp/owned && chown nobody:nogroup /tmp/owned && stat -c %U:%G /tmp/owned",
    "su -s /bin/sh nobody -c 'echo by nobody > /tmp/nobody.txt' && stat -c %U /tmp/nobody.txt",
    "setpriv --reuid=65534 --regid=65534 --clear-groups id -u",
    "useradd -m builder && su builder -c 'touch ~/file' && stat -c %U /home/builder/file",
    "apt-get -o Debug::NoLocking=1 check >/dev/null && echo apt ok",
]


async def test_root_in_a_hardened_job_still_does_what_package_managers_need(
    client: TestClient, token: MakeToken, worker: Worker, debian_image: str
) -> None:
    value = await token(SCOPE)
    manifest = on(debian_image, STATUS, *AS_ROOT)
    build = await wait_for(client, value, (await submit(client, value, manifest))["url"], finished)

    assert build["status"] == "passed", build["output"]
    assert privileges(build["output"]) == (KEPT, "1")
    for line in ["nobody:nogroup", "nobody", "65534", "builder", "apt ok"]:
        assert f"\n{line}\n" in build["output"]


@pytest.mark.parametrize("settings", [{"runtime": "marid-no-such-runtime"}])
async def test_an_unknown_runtime_fails_the_build_naming_docker_runtime(
    client: TestClient, token: MakeToken, worker: Worker
) -> None:
    value = await token(SCOPE)
    build = await wait_for(
        client, value, (await submit(client, value, on(BUSYBOX, "true")))["url"], finished
    )

    assert build["status"] == "failed"
    assert (
        "error: docker.runtime 'marid-no-such-runtime' is not a runtime of this runner's"
        " Docker engine (it has: " in build["output"]
    )
