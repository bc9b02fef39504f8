"""The operator's HTTP listener: ``/metrics`` (Prometheus text), ``/healthz``, ``/readyz``.

A few requests a minute from Prometheus and a load balancer: a minimal HTTP/1.1 server on h11
(declared in pyproject; httpx's own parser too) rather than another web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final

import h11
from prometheus_client import CONTENT_TYPE_LATEST

from agi_bridge.logs import get_logger
from agi_bridge.settings import Address
from agi_bridge.spool import SpoolError

log = get_logger("agi_bridge.health")

# Prometheus and probes send one small GET; anything bigger or slower is not one of them.
MAX_REQUEST_BYTES: Final = 16384
REQUEST_TIMEOUT: Final = 5.0

Readiness = Callable[[], Awaitable[list[str]]]
"""Returns the reasons the bridge is not ready; empty when it is."""


class HealthServer:
    def __init__(
        self,
        address: Address,
        *,
        registry_text: Callable[[], Awaitable[bytes]],
        readiness: Readiness,
    ) -> None:
        self._address = address
        self._registry_text = registry_text
        self._readiness = readiness
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self._address.host, self._address.port, reuse_address=True
        )
        log.info("health.listening", listen=f"{self._address.host}:{self.port}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _respond(self, target: bytes) -> tuple[int, bytes, bytes]:
        path = target.split(b"?", 1)[0]
        if path == b"/metrics":
            try:
                return 200, CONTENT_TYPE_LATEST.encode(), await self._registry_text()
            except SpoolError as exc:  # the spool gauges cannot be read: say so, stay up
                return 500, b"text/plain", f"{exc}\n".encode()
        if path == b"/healthz":
            return 200, b"text/plain", b"ok\n"
        if path == b"/readyz":
            problems = await self._readiness()
            if problems:
                return 503, b"text/plain", ("\n".join(problems) + "\n").encode()
            return 200, b"text/plain", b"ready\n"
        return 404, b"text/plain", b"not found: try /metrics, /healthz or /readyz\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        connection.receive_data(await reader.read(MAX_REQUEST_BYTES))
                        continue
                    if isinstance(event, h11.Request):
                        status, content_type, body = (
                            await self._respond(event.target)
                            if event.method in (b"GET", b"HEAD")
                            else (405, b"text/plain", b"GET only\n")
                        )
                        headers = [
                            (b"content-type", content_type),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ]
                        writer.write(
                            connection.send(h11.Response(status_code=status, headers=headers))
                        )
                        if event.method != b"HEAD":
                            writer.write(connection.send(h11.Data(data=body)))
                        writer.write(connection.send(h11.EndOfMessage()))
                        await writer.drain()
                    break
        except (h11.RemoteProtocolError, TimeoutError, OSError) as exc:
            log.debug("health.request.failed", error=str(exc), error_type=exc.__class__.__name__)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
