"""One request to NoojeeContact through a bounded pool of connection slots, logged and counted
the same way whoever sends it (a session or the worker)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
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


class _Slots:
    """At most ``size`` requests in flight, the waiting served in arrival order: what
    asyncio.Semaphore does. The caller takes a free slot itself (``free`` and ``waiting``
    read, ``free`` decremented) and gives it back with :meth:`release`: the Semaphore's
    locked() (twice, each with a generator), acquire() and release() were seven Python calls
    on every request."""

    def __init__(self, size: int) -> None:
        self.free = size
        # Futures of those waiting, oldest first; a slot is handed over by its result (True).
        self.waiting: deque[asyncio.Future[bool]] = deque()

    async def wait(self, at_most: float | None) -> bool:
        """Wait for a slot handed over by :meth:`release`, at most ``at_most`` seconds (None:
        as long as it takes); whether one came. Only when no slot is free, or others wait."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self.waiting.append(waiter)
        timer = None if at_most is None else loop.call_later(at_most, _give_up, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if _handed(waiter):
                self.release()  # handed a slot, cancelled before it could use it: pass it on
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not _handed(waiter):
                with contextlib.suppress(ValueError):  # release() may have dropped it already
                    self.waiting.remove(waiter)  # gave up: no release must hand it a slot

    def release(self) -> None:
        """Give a slot back: to the oldest one still waiting, or to the free ones."""
        waiting = self.waiting
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self.free += 1


def _give_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def _handed(waiter: asyncio.Future[bool]) -> bool:
    """Whether ``waiter`` was handed a slot (not given up on, not cancelled)."""
    return waiter.done() and not waiter.cancelled() and waiter.result()


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
        self._slots = _Slots(connections.max_connections)
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
        slots = self._slots
        if slots.free and not slots.waiting:
            slots.free -= 1  # at once, without yielding
        elif not await slots.wait(slot_wait):  # a timer only when there is a wait to bound
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
            slots.release()
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
