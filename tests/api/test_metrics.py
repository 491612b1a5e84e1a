"""GET /metrics (docs/api.md §21): this process's HTTP figures and the installation's totals."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families

from marid import __version__, metrics, webhooks
from marid import config as config_module
from marid.metrics import Http
from marid.webhooks import Outcome
from tests.conftest import MakeToken, bearer

MANIFEST = "driver: {type: docker, image: busybox, workspace: /w}\njobs: [{commands: [x]}]\n"


def parse(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample line."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


async def scrape(api: TestClient, **headers: str) -> dict[str, float]:
    resp = await api.get("/api/metrics", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(await resp.text())


async def test_http_requests_are_counted_by_route_template(api: TestClient, token: MakeToken):
    value = await token("build:read")
    for _ in range(2):
        assert (await api.get("/api/user", headers=bearer(value))).status == 200
    assert (await api.get("/api/b/alice/7", headers=bearer(value))).status == 404
    assert (await api.get("/api/no/such/thing")).status == 404
    assert (await api.request("PROPFIND", "/api/user")).status == 405
    got = await scrape(api)
    assert got['marid_http_requests_total{method="GET",route="/user",status="200"}'] == 2
    assert (
        got['marid_http_requests_total{method="GET",route="/b/{username}/{number}",status="404"}']
        == 1
    )
    assert got['marid_http_requests_total{method="GET",route="",status="404"}'] == 1
    assert got['marid_http_requests_total{method="other",route="",status="405"}'] == 1
    user = 'method="GET",route="/user"'
    assert got[f"marid_http_request_duration_seconds_count{{{user}}}"] == 2
    assert got[f'marid_http_request_duration_seconds_bucket{{{user},le="+Inf"}}'] == 2
    buckets = [got[f'marid_http_request_duration_seconds_bucket{{{user},le="{b:g}"}}']
               for b in metrics.BUCKETS]  # fmt: skip
    assert buckets == sorted(buckets)  # cumulative
    assert 0 < got[f"marid_http_request_duration_seconds_sum{{{user}}}"] < 60
    assert got[f'marid_build_info{{version="{__version__}"}}'] == 1
    assert got["marid_database_up"] == 1
    assert got["marid_rate_limited_total"] == 0


async def test_totals_come_from_the_database(api: TestClient, token: MakeToken, pool: asyncpg.Pool):
    value = await token("build:read,write")
    for _ in range(3):
        resp = await api.post("/api/builds", headers=bearer(value), json={"manifest": MANIFEST})
        assert resp.status == 201
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE builds SET status = 'passed' WHERE id = (SELECT min(id) FROM builds)"
        )
        await conn.execute(
            "UPDATE build_jobs SET status = 'failed' WHERE id = (SELECT min(id) FROM build_jobs)"
        )
    got = await scrape(api)
    assert got["marid_builds_submitted_total"] == 3
    assert got['marid_builds_finished_total{status="passed"}'] == 1
    assert got['marid_builds{status="queued"}'] == 2
    assert got['marid_builds{status="running"}'] == 0
    assert got['marid_jobs_finished_total{status="failed"}'] == 1
    assert got['marid_webhook_deliveries_total{result="response"}'] == 0


async def test_webhook_attempts_are_counted_and_survive_the_purge(
    api: TestClient, token: MakeToken, pool: asyncpg.Pool
):
    value = await token("namespace:write webhook:write")
    resp = await api.post("/api/namespaces", headers=bearer(value), json={"name": "team"})
    ns_id = (await resp.json())["id"]
    resp = await api.post(
        "/api/n/alice/team/-/webhooks",
        headers=bearer(value),
        json={"payload_url": "https://hooks.example.org/"},
    )
    assert resp.status == 201
    now = datetime.now(UTC) + timedelta(seconds=1)  # after the deliveries' now()
    async with pool.acquire() as conn:
        for _ in range(3):
            await webhooks.emit(conn, ns_id, "objects", {"action": "created"})
        due = await webhooks.claim_due(conn, now, 10, timedelta(seconds=90))
        for delivery, code in zip(due, (200, None, 500), strict=True):
            error = None if code else "refused"
            await webhooks.record(conn, delivery, Outcome(code, 1, error), now, None)
        await conn.execute(
            "UPDATE webhook_attempts SET created_at = created_at - interval '40 days'"
        )
        await conn.execute(
            "UPDATE webhook_deliveries SET created_at = created_at - interval '40 days'"
        )
        await webhooks.purge(conn, now)
    got = await scrape(api)
    assert got['marid_webhook_deliveries_total{result="response"}'] == 2
    assert got['marid_webhook_deliveries_total{result="error"}'] == 1


async def test_a_metrics_token_is_required_when_configured(
    aiohttp_client, config: config_module.Config, pool: asyncpg.Pool
):
    from marid.api.app import create_app

    guarded = dataclasses.replace(config, metrics=config_module.MetricsConfig(token="scrape-me"))
    api = await aiohttp_client(create_app(guarded, pool))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "scrape-me"}):
        resp = await api.get("/api/metrics", headers=headers)
        assert resp.status == 401
        assert await resp.json() == {"message": "Unauthorized"}
    assert (await scrape(api, Authorization="Bearer scrape-me"))["marid_database_up"] == 1


def test_without_the_database_its_families_have_no_samples():
    text = metrics.render(Http(), None)
    got = parse(text)
    assert got["marid_database_up"] == 0
    assert not any(key.startswith("marid_builds") for key in got)
    assert "# TYPE marid_builds_submitted_total counter" in text
    assert "# TYPE marid_http_request_duration_seconds histogram" in text


TYPES = {
    "marid_http_requests": "counter",
    "marid_http_request_duration_seconds": "histogram",
    "marid_builds_submitted": "counter",
    "marid_builds_finished": "counter",
    "marid_builds": "gauge",
    "marid_jobs_finished": "counter",
    "marid_webhook_deliveries": "counter",
    "marid_rate_limited": "counter",
    "marid_database_up": "gauge",
    "marid_build_info": "gauge",
}
# What Prometheus 2.x/3.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


async def test_the_official_parser_reads_every_family_with_its_type(
    api: TestClient, token: MakeToken
):
    assert (await api.get("/api/user", headers=bearer(await token("build:read")))).status == 200
    resp = await api.get("/api/metrics")
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = list(text_string_to_metric_families(await resp.text()))
    assert {family.name: family.type for family in families} == TYPES
    [requests] = [family for family in families if family.name == "marid_http_requests"]
    [sample] = [s for s in requests.samples if s.labels["route"] == "/user"]
    assert (sample.name, sample.labels, sample.value) == (
        "marid_http_requests_total",
        {"method": "GET", "route": "/user", "status": "200"},
        1,
    )


@pytest.mark.parametrize(
    "accept",
    [PROMETHEUS_ACCEPT, "application/openmetrics-text", "application/openmetrics-text; q=0.9"],
)
async def test_openmetrics_when_the_accept_header_asks_for_it(
    api: TestClient, token: MakeToken, accept: str
):
    assert (await api.get("/api/user", headers=bearer(await token("build:read")))).status == 200
    resp = await api.get("/api/metrics", headers={"Accept": accept})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == (
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    )
    text = await resp.text()
    assert text.endswith("\n# EOF\n")
    families = list(om_families(text))
    assert {family.name: family.type for family in families} == TYPES
    [duration] = [f for f in families if f.name == "marid_http_request_duration_seconds"]
    user = [s for s in duration.samples if s.labels.get("route") == "/user"]
    assert [s.value for s in user if s.name.endswith("_count")] == [1]
    # Anything else gets the text format.
    for other in ("text/plain", "*/*", "application/openmetrics-text;q=0.4,text/plain;q=0.5"):
        resp = await api.get("/api/metrics", headers={"Accept": other})
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "# EOF" not in await resp.text()


def test_openmetrics_without_the_database_parses_too():
    text = metrics.render(Http(), None, openmetrics=True)
    families = list(om_families(text))
    assert {family.name: family.type for family in families} == TYPES
