"""Running an aiohttp service until SIGTERM: the part every role shares."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web


async def serve(
    app: web.Application, host: str, port: int, what: str, log: logging.Logger
) -> web.AppRunner:
    """Start ``app``; log the one line that says the role is ready."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
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
