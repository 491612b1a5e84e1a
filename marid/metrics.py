"""Metrics for `GET /metrics` (docs/api.md §21) in the Prometheus text format 0.0.4, or in
OpenMetrics 1.0.0 when the scraper's `Accept` header prefers it.

Two kinds of figures: those of this API process (HTTP requests, kept in memory by `Http`), and
those of the whole installation, read from PostgreSQL at scrape time (builds, jobs, webhook
deliveries), so every API process reports the same totals whatever process did the work.
Ten families do not need a client library: the format is a few lines of text (the tests read
it with the official client library's parsers).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import asyncpg

from marid import __version__
from marid.builds import FINAL

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# Seconds; Prometheus's usual request-latency buckets.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels, float]  # (suffix, labels, value)


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))  # not cumulative
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(BUCKETS, value)
        if index < len(BUCKETS):
            self.counts[index] += 1
        self.total += value
        self.count += 1


@dataclass
class Http:
    """This process's HTTP requests, by method, route template and status."""

    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    durations: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    rate_limited: int = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests[(method, route, status)] += 1
        self.durations.setdefault((method, route), Histogram()).observe(seconds)


@dataclass(frozen=True)
class Totals:
    """The installation's figures, from the database."""

    builds: dict[str, int]  # by status, every status present
    jobs_finished: dict[str, int]  # by final status
    deliveries: dict[str, int]  # webhook attempts by result: response, error


async def totals(conn: asyncpg.Connection) -> Totals:
    builds = {row["status"]: row["n"] for row in await conn.fetch(
        "SELECT status, count(*) AS n FROM builds GROUP BY status"
    )}  # fmt: skip
    jobs = {row["status"]: row["n"] for row in await conn.fetch(
        "SELECT status, count(*) AS n FROM build_jobs WHERE status = ANY($1::text[])"
        " GROUP BY status",
        sorted(FINAL),
    )}  # fmt: skip
    # Attempts still kept plus those purged (counted into metric_counters as they go).
    deliveries = {row["result"]: row["n"] for row in await conn.fetch(
        """
        SELECT result, sum(n)::bigint AS n FROM (
            SELECT CASE WHEN code IS NULL THEN 'error' ELSE 'response' END AS result,
                   count(*) AS n
            FROM webhook_attempts GROUP BY 1
            UNION ALL
            SELECT label, value FROM metric_counters WHERE name = 'webhook_deliveries'
        ) AS counted GROUP BY result
        """
    )}  # fmt: skip
    return Totals(builds, jobs, deliveries)


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def wants_openmetrics(accept: str) -> bool:
    """Whether an `Accept` header prefers OpenMetrics to the text format (RFC 9110 §12.5.1
    quality values; a tie goes to OpenMetrics, as the official client library's does)."""
    best = {"openmetrics": 0.0, "text": 0.0}
    for media_range in accept.split(","):
        kind, *params = (part.strip() for part in media_range.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        kind = kind.lower()
        if kind == "application/openmetrics-text":
            best["openmetrics"] = max(best["openmetrics"], q)
        elif kind in ("text/plain", "text/*", "*/*"):
            best["text"] = max(best["text"], q)
    return best["openmetrics"] > 0 and best["openmetrics"] >= best["text"]


def _family(
    name: str, kind: str, text: str, samples: Iterable[Sample], openmetrics: bool
) -> list[str]:
    # The text format names a counter's family after its samples (`x_total`); OpenMetrics names
    # it without the suffix. Either way the parsers see the samples belong to the family.
    family = f"{name}_total" if kind == "counter" and not openmetrics else name
    lines = [f"# HELP {family} {text}", f"# TYPE {family} {kind}"]
    for suffix, labels, value in samples:
        inner = ",".join(f'{key}="{_escape(val)}"' for key, val in labels)
        lines.append(f"{name}{suffix}{{{inner}}} {_number(value)}" if inner else
                     f"{name}{suffix} {_number(value)}")  # fmt: skip
    return lines


def _histogram_samples(http: Http) -> Iterable[Sample]:
    for (method, route), hist in sorted(http.durations.items()):
        base = (("method", method), ("route", route))
        running = 0
        for bound, count in zip(BUCKETS, hist.counts, strict=True):
            running += count
            yield "_bucket", (*base, ("le", _number(bound))), running
        yield "_bucket", (*base, ("le", "+Inf")), hist.count
        yield "_sum", base, hist.total
        yield "_count", base, hist.count


def render(http: Http, found: Totals | None, openmetrics: bool = False) -> str:
    """The exposition, in OpenMetrics when `openmetrics`; `found` is None when the database did
    not answer (its families are then listed without samples and marid_database_up is 0)."""
    t = found or Totals({}, {}, {})
    requests = (
        ("_total", (("method", m), ("route", r), ("status", str(s))), n)
        for (m, r, s), n in sorted(http.requests.items())
    )
    finished = sorted((s, n) for s, n in t.builds.items() if s in FINAL)
    family = partial(_family, openmetrics=openmetrics)
    lines = [
        *family("marid_http_requests", "counter", "HTTP requests served by this process.",
                requests),
        *family("marid_http_request_duration_seconds", "histogram",
                "HTTP request durations in this process.", _histogram_samples(http)),
        *family("marid_builds_submitted", "counter", "Builds submitted.",
                [("_total", (), sum(t.builds.values()))] if found else []),
        *family("marid_builds_finished", "counter", "Builds that reached a final status.",
                (("_total", (("status", s),), n) for s, n in finished)),
        *family("marid_builds", "gauge", "Builds queued or running now.",
                [("", (("status", s),), t.builds.get(s, 0)) for s in ("queued", "running")]
                if found else []),
        *family("marid_jobs_finished", "counter", "Jobs that reached a final status.",
                (("_total", (("status", s),), n) for s, n in sorted(t.jobs_finished.items()))),
        *family("marid_webhook_deliveries", "counter",
                "Webhook delivery attempts, by whether a response came back.",
                [("_total", (("result", r),), t.deliveries.get(r, 0))
                 for r in ("response", "error")] if found else []),
        *family("marid_rate_limited", "counter", "Requests this process answered 429.",
                [("_total", (), http.rate_limited)]),
        *family("marid_database_up", "gauge", "Whether PostgreSQL answered this scrape.",
                [("", (), 1 if found else 0)]),
        *family("marid_build_info", "gauge", "The marid version.",
                [("", (("version", __version__),), 1)]),
    ]  # fmt: skip
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"
