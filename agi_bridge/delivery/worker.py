"""The spool worker: delivers what the spool holds, and backs off while NoojeeContact is down.

It sends due entries at full concurrency while NoojeeContact answers. Once it fails
transiently, it stops sending everything and probes with one entry at a time, backing off
exponentially with jitter (stamina), so a server coming back from an outage is not hit by ten
thousand retries at once; any successful sync attempt ends the backoff early.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

import stamina

from agi_bridge.delivery.config import Retry
from agi_bridge.delivery.ended import RecentCalls
from agi_bridge.delivery.ledger import CANCELLED_BY_ITS_CALL, Ledger
from agi_bridge.delivery.sender import Sender
from agi_bridge.logs import get_logger
from agi_bridge.metrics import Metrics
from agi_bridge.spool import Spool, SpoolEntry
from agi_bridge.vocabulary import NoojeeResult

log = get_logger("agi_bridge.delivery")

# The worker looks at the spool at least this often when idle: entries that `agi-bridge spool
# retry` (another process) moved back to pending are picked up within a second.
IDLE_POLL: Final = 1.0
# After an unexpected error in the worker loop (the spool failing, say), wait this long before
# trying again rather than spin or die.
WORKER_ERROR_PAUSE: Final = 1.0


class _Unavailable(Exception):
    """NoojeeContact failed transiently: the probe's signal to stamina to back off."""


class Worker:
    """Claims due entries from the spool and sends them, until stopped."""

    def __init__(
        self,
        *,
        retry: Retry,
        extension_max_age: float,
        spool: Spool,
        sender: Sender,
        ledger: Ledger,
        metrics: Metrics,
        wall_clock: Callable[[], float],
        ended: RecentCalls,
    ) -> None:
        self._retry = retry
        self._ended = ended
        self._extension_max_age = extension_max_age
        self._spool = spool
        self._sender = sender
        self._ledger = ledger
        self._metrics = metrics
        self._wall_clock = wall_clock
        self._work = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        """Something was queued or failed: look at the spool now rather than at the next poll."""
        self._work.set()

    async def run(self) -> None:
        """Deliver what the spool holds until :meth:`stop` (or cancel)."""
        while not self._stopping:
            try:
                await self._run_once()
            except Exception as exc:  # the worker must outlive any one failure
                log.exception("spool.worker.error", error=str(exc), error_type=type(exc).__name__)
                await asyncio.sleep(WORKER_ERROR_PAUSE)

    def stop(self) -> None:
        """Ask the worker to finish the batch in hand and claim nothing more (shutdown): what
        it has not claimed stays pending for the next start, nothing is cut mid-request."""
        self._stopping = True
        self._work.set()
        self._sender.recovered.set()  # ends a backoff at once

    async def _run_once(self) -> None:
        self._work.clear()
        claimed_at = self._wall_clock()
        entries = await self._spool.claim_due(
            limit=self._sender.connections.max_connections, lease=self._sender.lease
        )
        if not entries:
            if not self._stopping:
                await self._wait_for_work(claimed_at)
            return
        pause = self._pause(await self._deliver(entries))
        if pause is not None and not self._stopping:
            await self._back_off(pause)

    async def _wait_for_work(self, claimed_at: float) -> None:
        if self._work.is_set():
            return  # stored while the claim ran: no need to ask the spool when to look again
        next_due = await self._spool.next_due()
        if next_due is None or next_due <= claimed_at:
            # Nothing, or only what was due already and not claimed: what the spool holds in
            # memory while its disk is full (a lease, a settlement whose record waits) or a
            # start, which a full disk does not claim. The next poll, not a claim at once
            # in a loop for as long as the disk stays full.
            timeout = IDLE_POLL
        else:
            timeout = max(0.0, next_due - self._wall_clock())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(timeout, IDLE_POLL)):
                await self._work.wait()

    async def _deliver(self, entries: list[SpoolEntry]) -> list[NoojeeResult]:
        """One attempt for each of ``entries``, all at once: the answers of those sent."""
        results = await asyncio.gather(*(self._send_entry(entry) for entry in entries))
        return [result for result in results if result is not None]

    def _pause(self, results: list[NoojeeResult]) -> float | None:
        """When one of ``results`` failed transiently, the seconds NoojeeContact asked us to
        wait (its longest Retry-After, 0 without one, at most ``retry_max_delay``); None when
        none did."""
        failed = [result.retry_after or 0.0 for result in results if result.transient]
        return min(max(failed), self._retry.max_delay) if failed else None

    async def _send_entry(self, entry: SpoolEntry) -> NoojeeResult | None:
        request = entry.request
        if (
            request.kind == "extension"
            and self._wall_clock() - entry.created >= self._extension_max_age
        ):
            # Checked as it is claimed, not only on a failure: after a backoff, the extension
            # may be on another customer's call by now.
            why = self._ledger.too_late
            why = f"{entry.last_error}; {why}" if entry.last_error else why
            await self._ledger.dismiss("expired", entry.id, request, why, attempted=False)
            return None
        if request.kind == "extension" and entry.call_uniqueid in self._ended:
            # Its call's own stop came after the spool's cancellation had looked (the request
            # was on its way then, or written ahead later): its extension may be on its next call.
            await self._ledger.dismiss(
                "cancelled", entry.id, request, CANCELLED_BY_ITS_CALL, attempted=False
            )
            return None
        result = await self._sender.attempt(entry.request, from_session=False)
        if result.ok:
            # At once, not with the rest of the batch: a delivery made must be recorded even
            # if the batch is cut short (shutdown, kill -9), or it is sent again. The spool
            # thread still commits the batch's deletions together.
            await self._ledger.delivered(entry.id, result.message)
            self._metrics.delivered.inc()
            log.info(
                "spool.entry.delivered",
                id=entry.id,
                action=entry.request.action,
                attempts=entry.attempts + 1,
                message=result.message,
            )
        else:
            await self._ledger.failed(
                entry.id, entry.request, result, attempts=entry.attempts, created=entry.created
            )
        return result

    async def _back_off(self, pause: float) -> None:
        """Wait ``pause`` (a Retry-After), then probe with one entry at a time, backing off,
        until NoojeeContact answers again."""
        recovered = self._sender.recovered
        recovered.clear()
        probe = asyncio.ensure_future(self._probe(pause))
        waiter = asyncio.ensure_future(recovered.wait())
        try:
            await asyncio.wait((probe, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (probe, waiter):
                task.cancel()
            await asyncio.gather(probe, waiter, return_exceptions=True)
        if not probe.cancelled() and probe.exception() is not None:
            raise probe.exception()  # type: ignore[misc]  # e.g. the spool failing: run() logs it
        if not self._stopping:  # stop() ends the backoff too: that says nothing of NoojeeContact
            log.info("noojee.available")

    async def _probe(self, pause: float) -> None:
        retry = self._retry
        log.warning("noojee.unavailable", retry_max_delay=retry.max_delay, retry_after=pause)
        await asyncio.sleep(pause)  # a session's success or the stop ends it (_back_off)
        async for attempt in stamina.retry_context(
            on=_Unavailable,
            attempts=None,  # the spool's own limits (attempts, age) end an entry's life
            timeout=None,
            wait_initial=retry.initial_delay,
            wait_max=retry.max_delay,
            wait_jitter=retry.initial_delay,
        ):
            with attempt:
                if self._stopping:
                    return
                entries = await self._spool.claim_due(limit=1, lease=self._sender.lease)
                # Nothing due (the rest is leased to sync attempts in flight), or nothing
                # sent (expired): no proof yet that NoojeeContact is back, so keep the pace.
                results = await self._deliver(entries) if entries else []
                wait = self._pause(results)
                if wait:
                    await asyncio.sleep(wait)  # the Retry-After, before stamina's own wait
                if not results or wait is not None:
                    raise _Unavailable
