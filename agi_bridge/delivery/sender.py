"""One request to NoojeeContact through a bounded pool of connection slots, logged and counted
the same way whoever sends it (a session or the worker)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from agi_bridge.delivery.config import Connections
from agi_bridge.logs import get_logger
from agi_bridge.metrics import Metrics
from agi_bridge.vocabulary import NoojeeResult, RecordingRequest, ResultKind

log = get_logger("agi_bridge.delivery")


class Client(Protocol):
    """What delivery needs of the NoojeeContact client (tests pass a fake)."""

    async def send(self, request: RecordingRequest) -> NoojeeResult:
        """Perform one request; never raises for network or server trouble."""
        ...


class Sender:
    """Sends one request at a time per slot and keeps what the health check needs to know."""

    def __init__(
        self,
        *,
        connections: Connections,
        client: Client,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._clock = clock
        self.connections = connections
        self._max_connections = connections.max_connections
        self._slots = asyncio.Semaphore(connections.max_connections)
        self.lease = connections.lease
        # Set when a session's request got through: the worker's backoff may end early.
        self.recovered = asyncio.Event()
        self.last_failure: float | None = None  # clock time of the last transient failure
        self.last_success: float | None = None

    async def attempt(
        self, request: RecordingRequest, *, from_session: bool, slot_wait: float | None = None
    ) -> NoojeeResult:
        """One request through a connection slot. ``slot_wait`` bounds the wait for a slot: a
        session's attempt that would start after its budget is not started at all, so it can
        never run past the lease of its spool entry and meet the worker's copy."""
        try:
            if self._slots.locked():  # a timer only when there is a wait to bound
                async with asyncio.timeout(slot_wait):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()  # returns at once, without yielding
        except TimeoutError:
            return NoojeeResult(
                ResultKind.TIMEOUT,
                f"all {self._max_connections} NoojeeContact connections busy",
                unsent=True,
            )
        try:
            started = self._clock()
            result = await self._client.send(request)
        except Exception as exc:  # the client promises not to raise: a safety net
            log.exception("noojee.client.bug", error=str(exc), error_type=type(exc).__name__)
            result = NoojeeResult(ResultKind.TRANSPORT, f"client error: {type(exc).__name__}")
        finally:
            self._slots.release()
        self._metrics.observe_noojee(result, self._clock() - started)
        if result.transient:
            self.last_failure = self._clock()
            log.warning(
                # An answer that is not NoojeeContact's: its excerpt (redacted) is the message.
                "noojee.request.unexpected"
                if result.kind is ResultKind.UNEXPECTED
                else "noojee.request.failed",
                kind=result.kind.value,
                message=result.message,
                http_status=result.http_status,
                action=request.action,
            )
            return result
        self.last_success = self._clock()
        if result.ok and from_session:
            # A session got through while the worker backs off: no need to wait for the
            # next probe. (The worker's own probe ends the backoff by returning.)
            self.recovered.set()
        if result.kind is ResultKind.WARNING:
            log.info(
                "noojee.request.warning",
                message=result.message,
                code=result.code,
                action=request.action,
            )
        elif not result.ok:
            log.warning(
                "noojee.request.rejected",
                kind=result.kind.value,
                message=result.message,
                code=result.code,
                http_status=result.http_status,
                action=request.action,
            )
        return result
