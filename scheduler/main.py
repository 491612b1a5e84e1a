"""`marid scheduler`: fires due cron jobs (scheduler/loop.py) and delivers webhooks
(scheduler/hooks.py) side by side until stopped."""

from __future__ import annotations

import asyncio

from marid import db
from marid.config import Config
from marid.scheduler import hooks, loop


async def run(config: Config, stop: asyncio.Event) -> None:
    """Both services on one pool until `stop` is set. It waits for the database first (and
    returns if stopped meanwhile); an outage later is each service's to ride out. Only a bug
    ends a service, and then the other is stopped too and the bug raised."""
    pool = await db.open_pool(config.database.dsn, config.database.pool_size, stop)
    if pool is None:
        return
    services = [
        asyncio.create_task(loop.run(config, stop, pool=pool), name="cron"),
        asyncio.create_task(hooks.run(config, stop, pool=pool), name="webhooks"),
    ]
    try:
        done, _ = await asyncio.wait(services, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # re-raise the failure
    finally:
        stop.set()
        await asyncio.gather(*services, return_exceptions=True)
        await pool.close()
