"""`marid scheduler`: fires due cron jobs (scheduler/loop.py) and delivers webhooks
(scheduler/hooks.py) side by side until stopped."""

from __future__ import annotations

import asyncio

from marid.config import Config
from marid.scheduler import hooks, loop


async def run(config: Config, stop: asyncio.Event) -> None:
    """Both services until `stop` is set; if one fails, the other is stopped too."""
    services = [
        asyncio.create_task(loop.run(config, stop), name="cron"),
        asyncio.create_task(hooks.run(config, stop), name="webhooks"),
    ]
    try:
        done, _ = await asyncio.wait(services, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # re-raise the failure
    finally:
        stop.set()
        await asyncio.gather(*services, return_exceptions=True)
