"""A bridge in the test's event loop, in front of the NoojeeContact simulator over real HTTPS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agi_bridge.app import Bridge
from agi_bridge.settings import Settings
from agi_bridge.testing.fake_asterisk import Call, SessionResult, run_call
from agi_bridge.testing.simulator import NoojeeSimulator, SimulatorConfig

API_KEY = "f863246a-973e-11e6-8784-08002718f5b5"


def make_settings(
    simulator: NoojeeSimulator, ca_file: Path, data_dir: Path, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "noojee_url": simulator.base_url,
        "noojee_api_key": SecretStr(API_KEY),
        "noojee_ca_file": ca_file,
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "data_dir": data_dir,
        # Tests restore the simulator at once: keep the worker's backoff short.
        "retry_initial_delay": 0.05,
        "retry_max_delay": 0.2,
        "spool_fsync": False,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_simulator(
    server_ssl_context: ssl.SSLContext, **config: Any
) -> AsyncIterator[NoojeeSimulator]:
    simulator = NoojeeSimulator(SimulatorConfig(api_key=API_KEY, **config))
    await simulator.start("127.0.0.1", 0, server_ssl_context)
    try:
        yield simulator
    finally:
        await simulator.stop()


# What a test peer does with each connection it accepts.
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Peer:
    """A server that runs ``handler`` for each connection and counts them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.handlers: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.handlers.add(asyncio.current_task())  # type: ignore[arg-type]  # always in a task
        self.writers.add(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await self.handler(reader, writer)
        writer.close()


@contextlib.asynccontextmanager
async def peer(handler: Handler) -> AsyncIterator[Peer]:
    running = Peer(handler)
    server = await asyncio.start_server(running.serve, "127.0.0.1", 0)
    running.port = server.sockets[0].getsockname()[1]
    try:
        yield running
    finally:
        server.close()
        for writer in running.writers:
            writer.close()  # the handlers' reads end, and so do they
        await asyncio.gather(*running.handlers, return_exceptions=True)
        await server.wait_closed()


def answering(*answers: bytes) -> Handler:
    """Answer each request head with the next of ``answers`` (the last repeated)."""
    queue = list(answers)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(queue.pop(0) if len(queue) > 1 else queue[0])
            await writer.drain()

    return handler


@contextlib.asynccontextmanager
async def raw_http_server(*answers: bytes) -> AsyncIterator[int]:
    """A peer that reads each HTTP request head and answers the next of ``answers`` verbatim,
    whichever connection the request came on (the last is repeated); by default something
    that is not HTTP (a broken proxy). Yields its port."""
    async with peer(answering(*answers or (b"garbage\r\n\r\n",))) as server:
        yield server.port


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings) -> AsyncIterator[Bridge]:
    bridge = Bridge(settings)
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()


async def call(
    bridge: Bridge, *arguments: str, script: str = "recording/stop", **fields: Any
) -> SessionResult:
    """One AGI session from a fake Asterisk that speaks like the captures."""
    hangup = fields.pop("hangup_before_commands", False)
    return await run_call(
        Call(script=script, arguments=arguments, port=bridge.server.port, **fields),
        hangup_before_commands=hangup,
        deadline=10.0,
    )
