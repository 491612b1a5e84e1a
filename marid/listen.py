"""A LISTEN connection that outlives database restarts (docs/architecture.md).

It is a connection of its own, not one of the pool's, held for as long as the process runs.
When it is lost (the database restarted, or an idle connection stopped answering a heartbeat),
it is opened again with capped exponential backoff and the outage is logged once: a warning when
it starts, a line when it ends. Notifications sent while it was away are lost, so every
(re)connection calls `connected`, which tells the owner to look at the table again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

import asyncpg

log = logging.getLogger(__name__)

FIRST_RETRY = 0.5  # seconds before the first reconnection attempt, doubled after each failure
MAX_RETRY = 30.0
CONNECT_TIMEOUT = 10.0
HEARTBEAT = 30.0  # seconds between checks that the idle connection still answers
# While the connection is down its owner looks at the table this often instead of waiting for a
# NOTIFY (deaf_wait): nothing is missed for longer than this, however long the backoff.
DEAF_POLL = 1.0
# What losing the database looks like: refused or reset sockets, timeouts, "the database system
# is starting up", "terminating connection due to administrator command", a closed connection.
LOST = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# The subset of LOST that says the database is away rather than that a statement is wrong:
# what a loop retries while other errors still fail (class 08 connection exceptions, class 57
# "shutting down" / "starting up", refused sockets, a connection closed under a statement).
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
)


class Listener:
    """LISTEN `channel` on `dsn` until cancelled, calling `notified(payload)` for each
    notification and `connected()` after each (re)connection. `others` maps more channels to
    their own callbacks, listened to on the same connection."""

    def __init__(
        self,
        dsn: str,
        channel: str,
        notified: Callable[[str], None],
        connected: Callable[[], None],
        first_retry: float = FIRST_RETRY,
        max_retry: float = MAX_RETRY,
        others: Mapping[str, Callable[[str], None]] | None = None,
    ) -> None:
        self.dsn = dsn
        self.channel = ",".join([channel, *(others or {})])  # for logs and application_name
        self.handlers = {channel: notified, **(others or {})}
        self.connected = connected
        self.first_retry = first_retry
        self.max_retry = max_retry
        self.failures = 0  # connections lost or refused since the last one that worked
        self.pid: int | None = None  # the listening backend's process id while connected
        self._retry_now = asyncio.Event()

    async def run(self) -> None:
        """Listen, reconnecting whenever the connection is lost; returns only by cancellation."""
        delay = self.first_retry
        while True:
            try:
                await self._listen()
            except LOST as exc:
                if self.failures == 0:
                    log.warning(
                        "LISTEN %s: %s; reconnecting with backoff (up to %gs)",
                        self.channel,
                        _describe(exc),
                        self.max_retry,
                    )
                    delay = self.first_retry
                self.failures += 1
            self._retry_now.clear()
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for loses a cancellation that
            # arrives as the event is set (deaf_wait sets it), and this loop would never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._retry_now.wait()
            delay = min(delay * 2, self.max_retry)

    @property
    def listening(self) -> bool:
        return self.pid is not None

    def deaf_wait(self, wait: float) -> float:
        """How long the owner may wait for a notification: `wait` while listening; while not,
        at most DEAF_POLL, and the next reconnection is tried at once — the owner calls this
        after a round that reached the database, so it is back."""
        if self.listening:
            return wait
        self._retry_now.set()
        return min(wait, DEAF_POLL)

    async def _listen(self) -> None:
        """Connect and LISTEN, then watch the connection; raises once it is lost."""
        conn = await asyncpg.connect(
            self.dsn,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": f"marid LISTEN {self.channel}"},
        )
        try:
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _: lost.set())
            for channel in self.handlers:
                await conn.add_listener(channel, self._notified)
            if self.failures:
                log.info("LISTEN %s: reconnected after %d failures", self.channel, self.failures)
            self.failures = 0
            self.pid = conn.get_server_pid()
            self.connected()
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEARTBEAT):
                        await lost.wait()
                if lost.is_set() or conn.is_closed():
                    raise ConnectionResetError("the connection was closed")
                await asyncio.wait_for(conn.execute("SELECT 1"), CONNECT_TIMEOUT)
        finally:
            self.pid = None
            with contextlib.suppress(*LOST):
                await conn.close(timeout=CONNECT_TIMEOUT)

    def _notified(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        self.handlers[channel](payload)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
