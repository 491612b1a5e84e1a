"""PostgreSQL stopped for 10 s under a whole installation (issue 10, Acceptance 1).

Two builds run, one printing a line a second, both waiting on a gate the test opens; three
clients send requests in a loop; the scheduler delivers webhooks to a receiver of the test's.
Requests during the outage get 503 with Retry-After (never a 500, never a refused
connection); within 5 s of PostgreSQL's return serve answers, a new build is claimed and the
scheduler delivers its webhook, none of them restarted; every build passes, each job ran once
in the container it started in, and no process exited.

The module stops its own cluster (tests/fixtures/outage.py), never the session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from marid.pgcluster import Cluster
from tests.faults.conftest import WAIT, Installation, Starter, until
from tests.fixtures.outage import start_database, stop_database

pytestmark = pytest.mark.docker

OUTAGE = 10.0  # seconds PostgreSQL is away (the scenario)
RECOVERY = 5.0  # seconds after its return by which every process serves again (the issue's)
GATE = "until [ -e /w/gate ]; do sleep 0.2; done"
WAITING = f"""\
driver: {{type: docker, image: 'marid-test/busybox:latest', workspace: /w}}
namespace: ops
stages: [s]
jobs:
- stage: s
  commands: [set +x, echo start, '{GATE}', echo end]
"""
TICKING = """\
driver: {type: docker, image: 'marid-test/busybox:latest', workspace: /w}
namespace: ops
stages: [s]
jobs:
- stage: s
  commands:
  - set +x
  - echo start
  - 'i=0; until [ -e /w/gate ]; do i=$((i+1)); echo tick $i; sleep 1; done'
  - echo end
"""
AFTER = """\
driver: {type: docker, image: 'marid-test/busybox:latest', workspace: /w}
namespace: ops
stages: [s]
jobs:
- stage: s
  commands: [set +x, echo after the outage]
"""


@dataclass
class Hooks:
    """A webhook receiver on loopback: the build numbers of the `build.submitted` events it
    got, with the time each arrived."""

    url: str = ""
    submitted: dict[int, float] = field(default_factory=dict)


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    received = Hooks()

    async def receive(request: web.Request) -> web.Response:
        body = await request.json()
        if request.headers.get("X-Djinn-CI-Event") == "build.submitted":
            received.submitted.setdefault(body["number"], time.monotonic())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    received.url = f"http://127.0.0.1:{port}/hook"
    yield received
    await runner.cleanup()


@dataclass
class Answer:
    started: float
    ended: float
    status: int | str  # an HTTP status, or the name of a transport error
    retry_after: str | None = None


class Client:
    """Sends one kind of request in a loop and records every answer."""

    def __init__(self, marid: Installation, method: str, path: str, **kwargs: Any) -> None:
        self.marid, self.method, self.path, self.kwargs = marid, method, path, kwargs
        self.answers: list[Answer] = []

    async def loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                async with self.marid.http.request(
                    self.method, self.marid.url + self.path, headers=self.marid.headers,
                    **self.kwargs,
                ) as resp:  # fmt: skip
                    await resp.read()
                    answer = Answer(started, time.monotonic(), resp.status)
                    answer.retry_after = resp.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as exc:
                answer = Answer(started, time.monotonic(), type(exc).__name__)
            self.answers.append(answer)
            await asyncio.sleep(0.05)

    def during(self, start: float, end: float) -> list[Answer]:
        return [a for a in self.answers if a.started >= start and a.ended <= end]


def ticks(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"^tick (\d+)$", output, re.MULTILINE)]


async def test_a_10s_database_outage_under_load(
    outage_cluster: Cluster, outage_dsn: str, start_marid: Starter, hooks: Hooks
):
    marid = await start_marid(outage_dsn, webhooks={"allow_loopback": True})
    status, body = await marid.request("POST", "/namespaces", json={"name": "ops"})
    assert status == 201, body
    hook = {"payload_url": hooks.url, "events": ["build.submitted"]}
    status, body = await marid.request("POST", "/n/alice/ops/-/webhooks", json=hook)
    assert status == 201, body

    before = [await marid.submit(WAITING), await marid.submit(TICKING)]
    for build in before:
        await marid.until_output(build, "s.1", "start\n")
    await marid.until_output(before[1], "s.1", "tick 2\n")
    containers = {}
    for build in before:
        (container,) = await asyncio.to_thread(marid.containers, build=build["id"], job="s.1")
        containers[build["number"]] = container.id

    clients = [
        Client(marid, "GET", "/user"),
        Client(marid, "GET", "/builds"),
        Client(marid, "GET", f"/b/alice/{before[0]['number']}/jobs"),
    ]
    loops = [asyncio.create_task(client.loop()) for client in clients]
    try:
        await until("each client to be answered", lambda: _all_answered(clients))
        await stop_database(outage_cluster)
        stopped = time.monotonic()
        await asyncio.sleep(OUTAGE)
        outage_end = time.monotonic()
        await start_database(outage_cluster)
        after, recovered = await _recovery(marid, hooks, back=time.monotonic())
        await asyncio.sleep(1)  # the clients see the return too
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    late = {what: round(seconds, 2) for what, seconds in recovered.items() if seconds > RECOVERY}
    assert not late, f"not serving again within {RECOVERY:g}s of PostgreSQL's return: {late}"
    for client in clients:
        _check_answers(client, stopped, outage_end)

    # The gates open only now: each job is still the run that started before the outage.
    for build in before:
        (container,) = await asyncio.to_thread(marid.containers, build=build["id"], job="s.1")
        assert container.id == containers[build["number"]], "the job was started again"
        result = await asyncio.to_thread(container.exec_run, ["touch", "/w/gate"])
        assert result.exit_code == 0, result.output
    for build in [*before, after]:
        done = await marid.finished(build)
        assert done["status"] == "passed", done["output"]
        assert "orphaned" not in done["tags"], done["tags"]  # never requeued by lease expiry
        assert done.get("attempts", 1) == 1, done
    waited = await marid.job_output(before[0], "s.1")
    assert waited == "+ set +x\nstart\nend\n"
    ticked = await marid.job_output(before[1], "s.1")
    numbers = ticks(ticked)
    assert numbers == list(range(1, len(numbers) + 1)), ticked  # every line once, in order
    assert len(numbers) > OUTAGE, ticked
    assert ticked == "+ set +x\nstart\n" + "".join(f"tick {n}\n" for n in numbers) + "end\n"
    assert await marid.job_output(after, "s.1") == "+ set +x\nafter the outage\n"
    marid.assert_running()  # no process exited, none was restarted
    await asyncio.to_thread(marid.stop_all, WAIT)  # SIGTERM: each stops cleanly
    assert marid.exits == {name: [0] for name in marid.processes}, marid.exits


async def _all_answered(clients: list[Client]) -> bool:
    return all(client.answers for client in clients)


async def _recovery(
    marid: Installation, hooks: Hooks, back: float
) -> tuple[dict[str, Any], dict[str, float]]:
    """From PostgreSQL's return at `back` (the moment start_database returned): the seconds
    until serve answers 200, a build submitted then is claimed by a runner, and the scheduler
    delivers that build's webhook."""
    recovered: dict[str, float] = {}

    async def serves() -> bool:
        marid.assert_running()  # a process that exited will not come back: say so at once
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            status, _ = await marid.request("GET", "/user")
            return status == 200
        return False

    await until("serve to answer 200 again", serves)
    recovered["serve"] = time.monotonic() - back

    async def submitted() -> dict[str, Any] | None:
        status, body = await marid.request("POST", "/builds", json={"manifest": AFTER})
        assert status in (201, 503), (status, body)  # 503: the pool is still reconnecting
        return dict(body) if status == 201 else None

    after: dict[str, Any] = await until("a build to be accepted again", submitted)

    async def claimed() -> bool:
        marid.assert_running()
        return (await marid.build(after))["status"] != "queued"

    await until("a runner to claim the build submitted after the outage", claimed)
    recovered["runner"] = time.monotonic() - back

    async def delivered() -> bool:
        marid.assert_running()
        return after["number"] in hooks.submitted

    await until("the scheduler to deliver the new build's webhook", delivered)
    recovered["scheduler"] = hooks.submitted[after["number"]] - back
    return after, recovered


def _check_answers(client: Client, stopped: float, outage_end: float) -> None:
    """Only 200s and 503s with Retry-After; 503s while PostgreSQL was away; 200 at the end."""
    what = f"{client.method} {client.path}"
    statuses = [answer.status for answer in client.answers]
    assert set(statuses) <= {200, 503}, f"{what}: {statuses}"
    for answer in client.answers:
        if answer.status == 503:
            assert answer.retry_after, f"{what}: a 503 without Retry-After"
    during = [answer.status for answer in client.during(stopped, outage_end)]
    assert during, f"{what}: no request was answered during the outage"
    assert set(during) == {503}, f"{what} during the outage: {during}"
    assert statuses[-1] == 200, f"{what}: {statuses}"


async def test_an_outage_longer_than_the_lease_stops_the_job_before_it_runs_again(
    outage_cluster: Cluster, outage_dsn: str, start_marid: Starter
):
    """The runner cannot renew its 6 s lease while PostgreSQL is away for 10 s: it stops the
    job itself before the lease runs out, so the attempt that follows never overlaps it, and
    the new attempt says why (docs/manifest.md §6.13, "Leases")."""
    marid = await start_marid(outage_dsn, runner={"lease": "6s"})
    build = await marid.submit(TICKING.replace("namespace: ops\n", ""))
    await marid.until_output(build, "s.1", "tick 2\n")
    assert await asyncio.to_thread(marid.containers, build=build["id"], status="running")

    await stop_database(outage_cluster)
    await asyncio.sleep(OUTAGE)
    running = await asyncio.to_thread(marid.containers, build=build["id"], status="running")
    await start_database(outage_cluster)
    assert running == [], "the job still ran when its lease ran out"

    async def second_attempt() -> Any:
        marid.assert_running()
        found = await asyncio.to_thread(marid.containers, build=build["id"], job="s.1")
        return next((c for c in found if c.labels.get("marid.attempt") == "2"), None)

    container = await until("the build's second attempt to run its job", second_attempt)
    await marid.until_output(build, "s.1", "tick 1\n")
    result = await asyncio.to_thread(container.exec_run, ["touch", "/w/gate"])
    assert result.exit_code == 0, result.output

    done = await marid.finished(build)
    assert done["status"] == "passed", done["output"]
    assert done["attempts"] == 2
    # The lease ran out during the outage, or the runner handed the attempt back after it.
    assert done["output"].startswith("marid: attempt 2 (attempt 1: runner lost its lease"), done[
        "output"
    ]
    ticked = await marid.job_output(build, "s.1")
    numbers = ticks(ticked)
    assert numbers == list(range(1, len(numbers) + 1)), ticked  # the second run, once
    assert ticked == "+ set +x\nstart\n" + "".join(f"tick {n}\n" for n in numbers) + "end\n"
    marid.assert_running()


async def test_a_kill_requested_after_an_outage_reaches_the_running_job(
    outage_cluster: Cluster, outage_dsn: str, start_marid: Starter
):
    """The runner's LISTEN connection died with PostgreSQL; a DELETE made as soon as it is
    back still stops the job, by NOTIFY once the listener reconnects or at the next renewal
    (docs/manifest.md §6.10, §6.13)."""
    marid = await start_marid(outage_dsn)
    build = await marid.submit(WAITING.replace("namespace: ops\n", ""))
    await marid.until_output(build, "s.1", "start\n")

    await stop_database(outage_cluster)
    await asyncio.sleep(OUTAGE)
    await start_database(outage_cluster)

    async def deleted() -> bool:
        marid.assert_running()
        with contextlib.suppress(aiohttp.ClientError):
            status, body = await marid.request("DELETE", f"/b/alice/{build['number']}")
            assert status in (204, 503), (status, body)
            return status == 204
        return False

    await until("the API to accept the kill", deleted)
    done = await marid.finished(build)
    assert done["status"] == "killed", done["output"]
    assert done["attempts"] == 1
    assert await marid.job_output(build, "s.1") == "+ set +x\nstart\nkilled on request\n"
    marid.assert_running()
