"""Webhook delivery (docs/api.md §10.7): queued deliveries -> signed HTTP POSTs.

Runs inside `marid scheduler` (and so inside `marid up`). Deliveries are claimed with
FOR UPDATE SKIP LOCKED, so any number of schedulers share them; a claim is a lease, so one whose
scheduler died mid-request is retried once the lease ends. A delivery that gets no answer, or a
5xx, is retried with exponential backoff (`webhooks.attempts`, `webhooks.retry_delay`,
docs/configuration.md §1); any other response counts as delivered. Every attempt
is recorded, and the records expire after 30 days. Requests go only where the outbound policy
allows (marid/outbound.py, docs/security.md §3), and a refusal is all the log tells of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
from aiohttp.abc import AbstractResolver

from marid import __version__, channels, db, outbound, webhooks
from marid.config import Config, WebhooksConfig
from marid.crypto import Cipher, DecryptionError
from marid.listen import Listener
from marid.webhooks import Delivery, Outcome

log = logging.getLogger(__name__)

USER_AGENT = f"marid-hook/{__version__}"
TIMEOUT = 60.0  # §10.7
LEASE = timedelta(seconds=TIMEOUT + 30)  # a claim outlives the longest request
POLL = 5.0  # seconds between looks at the queue when no NOTIFY arrives
PURGE_EVERY = 3600.0  # seconds between deletions of records older than 30 days
ERROR_LIMIT = 500  # characters of a transport error kept in the log


class Resolver(outbound.Resolver, AbstractResolver):
    """The policy's resolver as aiohttp's type: a name is connected to only at the addresses
    the policy allows, checked in the answer the connection uses (no DNS rebinding)."""


def session(settings: WebhooksConfig, policy: outbound.Policy) -> aiohttp.ClientSession:
    """The HTTP client for deliveries: system trust store for https (aiohttp's default), no
    cookies kept between receivers, names resolved only to what `policy` allows (a literal
    host is checked by `send`)."""
    connector = aiohttp.TCPConnector(resolver=Resolver(policy), limit=settings.concurrency)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    )


def retry_at(settings: WebhooksConfig, delivery: Delivery, now: datetime) -> datetime | None:
    """When to try again after a failed attempt: retry_delay, then 4x longer each time; None
    when the attempts are used up."""
    if delivery.attempts >= settings.attempts:
        return None
    return now + timedelta(seconds=settings.retry_delay * 4 ** (delivery.attempts - 1))


def headers(delivery: Delivery, secret: str | None, timestamp: int) -> dict[str, str]:
    """The request headers of one attempt made at `timestamp` (unix seconds), §10.7. The
    delivery id is the same on every attempt of a delivery, so a receiver can drop repeats."""
    delivery_id = str(delivery.id)
    sent = {
        "Content-Type": "application/json; charset=utf-8",
        "Accept": "*/*",
        "User-Agent": USER_AGENT,
        "X-Djinn-CI-Event": delivery.event,
        "X-Djinn-CI-Hook-ID": str(delivery.webhook_id),
        "X-Marid-Delivery": delivery_id,
        "X-Marid-Timestamp": str(timestamp),
    }
    if secret is not None:
        sent["X-Djinn-CI-Signature"] = webhooks.signature(secret, delivery.body)
        sent["X-Marid-Signature"] = webhooks.marid_signature(
            secret, timestamp, delivery_id, delivery.body
        )
    return sent


async def send(
    client: aiohttp.ClientSession, policy: outbound.Policy, delivery: Delivery, secret: str | None
) -> Outcome:
    """POST the delivery once; never raises for the receiver's or the network's failures. A
    host the policy refuses is not connected to, and its error says only that."""
    try:
        # A literal host is checked here (aiohttp connects to it without resolving), a name's
        # addresses by the session's Resolver.
        url = policy.checked_url(delivery.payload_url)
    except outbound.Refused as exc:  # a literal saved under another configuration: final
        return Outcome(None, 0, str(exc), final=True)
    except ValueError as exc:
        return Outcome(None, 0, f"{type(exc).__name__}: {exc}"[:ERROR_LIMIT], final=True)
    started = time.perf_counter_ns()
    try:
        async with client.post(
            url,
            data=delivery.body,
            headers=headers(delivery, secret, int(time.time())),
            allow_redirects=False,
        ) as response:
            code = response.status
    except outbound.Refused as exc:  # a name resolved to refused addresses: DNS may change
        return Outcome(None, time.perf_counter_ns() - started, str(exc))
    except TimeoutError:
        return Outcome(None, time.perf_counter_ns() - started, f"no response in {TIMEOUT:.0f}s")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:ERROR_LIMIT]
        return Outcome(None, time.perf_counter_ns() - started, error)
    return Outcome(code, time.perf_counter_ns() - started, None)


async def deliver(
    pool: asyncpg.Pool,
    client: aiohttp.ClientSession,
    cipher: Cipher,
    policy: outbound.Policy,
    settings: WebhooksConfig,
    delivery: Delivery,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Outcome:
    """Send one claimed delivery and record the attempt."""
    try:
        secret = webhooks.secret_of(cipher, delivery.webhook_id, delivery.secret_sealed)
    except DecryptionError:
        # crypto.key changed: signing with no secret would mislead the receiver.
        error = "the webhook secret cannot be decrypted (crypto.key changed?)"
        outcome = Outcome(None, 0, error, final=True)
    else:
        outcome = await send(client, policy, delivery, secret)
    now = clock()
    again = retry_at(settings, delivery, now) if outcome.retry else None
    async with pool.acquire() as conn:
        await webhooks.record(conn, delivery, outcome, now, again)
    log.info(
        "webhook %d %s delivery %d attempt %d: %s%s",
        delivery.webhook_id,
        delivery.event,
        delivery.id,
        delivery.attempts,
        outcome.code if outcome.code is not None else outcome.error,
        f", retry at {again:%H:%M:%S}" if again else "",
    )
    return outcome


async def deliver_due(
    pool: asyncpg.Pool,
    client: aiohttp.ClientSession,
    cipher: Cipher,
    policy: outbound.Policy,
    settings: WebhooksConfig,
    now: datetime,
) -> int:
    """Claim what is due at `now` (up to `webhooks.concurrency`), send it concurrently and
    record each attempt at `now`; returns how many were sent. Tests drive retries with it."""
    async with pool.acquire() as conn:
        due = await webhooks.claim_due(conn, now, settings.concurrency, LEASE)
    await asyncio.gather(
        *(deliver(pool, client, cipher, policy, settings, d, lambda: now) for d in due)
    )
    return len(due)


async def run(
    config: Config,
    stop: asyncio.Event,
    pool: asyncpg.Pool | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Deliver webhooks until `stop` is set: woken by NOTIFY when events are queued, and every
    POLL seconds for retries; up to `webhooks.concurrency` requests in flight. Without `pool`
    it opens its own once the database answers. Tests pass a `clock` to make deliveries due."""
    if pool is not None:
        await _serve(config, pool, stop, clock)
        return
    own = await db.open_pool(config.database.dsn, config.database.pool_size, stop)
    if own is None:
        return  # stopped while waiting for the database
    try:
        await _serve(config, own, stop, clock)
    finally:
        await own.close()


async def _serve(
    config: Config, pool: asyncpg.Pool, stop: asyncio.Event, clock: Callable[[], datetime]
) -> None:
    """The loop of `run`. A database outage never ends it: a failed pass is logged once per
    outage (marid/db.py `Outage`) and tried again with capped backoff, and the LISTEN
    connection (marid/listen.py) coming back wakes it at once. A delivery whose attempt could
    not be recorded stays claimed and is sent again once its lease ends (docs/architecture.md
    §3.4)."""
    settings = config.webhooks
    policy = outbound.Policy.from_config(config)
    cipher = Cipher(config.crypto.key)
    wake = asyncio.Event()
    flying: set[asyncio.Task[Outcome]] = set()
    outage = db.Outage("webhook delivery", log)

    def finished(task: asyncio.Task[Outcome]) -> None:
        flying.discard(task)
        wake.set()  # a slot is free
        failure = None if task.cancelled() else task.exception()
        if isinstance(failure, db.OUTAGE):
            outage.failed(failure)  # not recorded: the claim's lease runs out, then a retry
        elif failure is not None:
            log.error("webhook delivery failed", exc_info=failure)

    listener = Listener(config.database.dsn, channels.HOOKS, lambda _: wake.set(), wake.set)
    listening = asyncio.create_task(listener.run(), name="webhooks LISTEN")
    listening.add_done_callback(lambda _: wake.set())  # to re-raise its failure below
    purged = 0.0
    try:
        async with session(settings, policy) as client:
            while not stop.is_set():
                wake.clear()
                try:
                    if time.monotonic() - purged >= PURGE_EVERY:
                        async with pool.acquire() as conn:
                            await webhooks.purge(conn, clock())
                        purged = time.monotonic()
                    free = settings.concurrency - len(flying)
                    if not free:
                        wait = POLL  # every slot is busy: the next to finish sets `wake`
                    else:
                        async with pool.acquire() as conn:
                            due = await webhooks.claim_due(conn, clock(), free, LEASE)
                        outage.worked()
                        for delivery in due:
                            sending = deliver(
                                pool, client, cipher, policy, settings, delivery, clock
                            )
                            task = asyncio.create_task(sending)
                            flying.add(task)
                            task.add_done_callback(finished)
                        if due and len(due) == free:
                            continue  # more may be due: claim again as slots free up
                        wait = listener.deaf_wait(await _until_next(pool, clock()))
                except db.OUTAGE as exc:
                    wait = outage.failed(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_either(wake, stop), wait)
                if listening.done():
                    listening.result()  # a bug, not an outage: fail loudly
            # Stopping: requests in flight get a moment; the rest are retried after their lease.
            if flying:
                await asyncio.wait(flying, timeout=5)
    finally:
        for task in flying:
            task.cancel()
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)


async def _until_next(pool: asyncpg.Pool, now: datetime) -> float:
    """Seconds from `now` until the next pending delivery is due, between 0 and POLL."""
    async with pool.acquire() as conn:
        when = await webhooks.next_due(conn)
    if when is None:
        return POLL
    return min(max((when - now).total_seconds(), 0.0), POLL)


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    waiters = [asyncio.create_task(first.wait()), asyncio.create_task(second.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
