"""`marid runner` with the wall time of every docker API call and SQL statement recorded
(bench/runner.py --trace), to see where a build's time goes without changing marid.

Each call is appended as one JSON line `[kind, what, start, end]` (wall clock seconds) to the
file named by $MARID_BENCH_TRACE. The wrappers cost a few microseconds per call.

    MARID_BENCH_TRACE=FILE python bench/traced_runner.py --config FILE
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import requests

_lock = threading.Lock()
_VERSION = re.compile(r"^/v[0-9.]+")


def _recorder(path: str) -> Callable[[str, str, float, float], None]:
    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's life

    def record(kind: str, what: str, start: float, end: float) -> None:
        with _lock:
            out.write(json.dumps([kind, what, start, end]) + "\n")

    return record


def _trace_docker(record: Callable[[str, str, float, float], None]) -> None:
    """docker-py's APIClient is a requests.Session: every engine call goes through request()."""
    original = requests.Session.request

    @functools.wraps(original)
    def request(self: requests.Session, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return original(self, method, url, *args, **kwargs)
        finally:
            path = _VERSION.sub("", unquote(urlsplit(url).path))
            record("docker", f"{method} {path}", start, time.time())

    requests.Session.request = request  # type: ignore[method-assign,assignment]


def _trace_sql(record: Callable[[str, str, float, float], None]) -> None:
    connection = asyncpg.connection.Connection
    for name in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
        setattr(connection, name, _timed(getattr(connection, name), record))
    # BEGIN, COMMIT and the pool's reset on release go through execute() too.


def _timed(
    method: Callable[..., Any], record: Callable[[str, str, float, float], None]
) -> Callable[..., Any]:
    @functools.wraps(method)
    async def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return await method(self, *args, **kwargs)
        finally:
            what = " ".join(str(args[0]).split())[:70]
            record("sql", what, start, time.time())

    return timed


def main() -> None:
    # This script's directory comes first on sys.path, and its bench/runner.py would shadow
    # marid's `runner` package.
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    record = _recorder(os.environ["MARID_BENCH_TRACE"])
    _trace_docker(record)
    _trace_sql(record)
    from marid.cli import main as marid_main

    marid_main(["runner", *sys.argv[1:]])


if __name__ == "__main__":
    main()
