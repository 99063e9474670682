"""Running an aiohttp service until SIGTERM: the part every role shares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

# Every agent asks for all of a blob's segment torrents at once: at the start of a pull with
# 16 agents the seeder's port took ~500 connections together, and aiohttp's default queue of
# 128 overflowed (the kernel logged "Possible SYN flooding" on it).
LISTEN_BACKLOG = 1024


async def serve(
    app: web.Application, host: str, port: int, what: str, log: logging.Logger, drain: float
) -> web.AppRunner:
    """Start ``app``; log the one line that says the role is ready. ``cleanup()`` of the
    runner stops accepting, lets running responses finish for ``drain`` seconds, then cuts
    them (a runtime retries a cut blob from its next host)."""
    # aiohttp waits its shutdown timeout for running handlers, cancels their requests (which
    # a response that is only writing never notices), then waits as long again: half each.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=drain / 2)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
    await site.start()
    log.info("%s ready on http://%s:%d", what, host, port)
    return runner


async def wait_for_signal() -> None:
    """Until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def every(seconds: float, job: Callable[[], object], log: logging.Logger) -> None:
    """Run ``job`` every ``seconds`` until cancelled; a failing run is logged, not fatal."""
    while True:
        await asyncio.sleep(seconds)
        try:
            result = job()
            if asyncio.iscoroutine(result):
                await result
        except Exception:  # noqa: BLE001 - housekeeping must not kill the service
            log.exception("periodic job failed")


@contextlib.asynccontextmanager
async def background(coro):  # type: ignore[no-untyped-def]
    """Run a coroutine as a task for the duration of a block."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
