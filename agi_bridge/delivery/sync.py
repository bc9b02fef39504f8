"""The sync path: wait for NoojeeContact within the route's budget, with the request written
ahead to the spool so that nothing the dialplan is told is ever lost.

An answer within the budget is the dialplan's answer. An attempt not confirmed within
``write_ahead_after`` is written to the spool while it goes on (so a sync request does not wait
for the disk unless it ends up queued); a timeout or a transient error leaves the request in
the spool and the dialplan hears ``QUEUED``. An attempt still running when the budget ends is
not cancelled: if it succeeds, the spool entry is settled and nothing is sent twice.

The attempt runs in its session's own task (a task of its own per request, with its future
and wake-ups, was a sixth of a sync request's cost in delivery: bench/README.md, "Ninth
round"). When the budget ends first, the session's answer is handed off
(:data:`~agi_bridge.vocabulary.HandOff`) to a task of its own, and the session's task goes on
with the attempt until what became of it is written to the spool; shutdown waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from agi_bridge.delivery.ledger import Ledger
from agi_bridge.delivery.sender import Sender
from agi_bridge.logs import get_logger
from agi_bridge.spool import Spool
from agi_bridge.tasks import finish_within
from agi_bridge.vocabulary import (
    ACTIONS,
    MESSAGE_MAX_CHARS,
    HandOff,
    NoojeeResult,
    Outcome,
    RecordingRequest,
    Status,
    unconfirmed_message,
)

log = get_logger("agi_bridge.delivery")

# How long a session waits for its spool commit before it answers FAILED rather than hold the
# call on a stalled disk: SQLite's own busy timeout (another process holding the lock) is 5 s.
STORE_TIMEOUT: Final = 5.0

# What a session waiting for NoojeeContact is told when a second signal cuts the wait short.
STOPPING: Final = "the bridge is stopping; NoojeeContact did not answer"


@dataclass(slots=True, eq=False)
class _Attempt:
    """A session's sync request under way, and its spool entry once written ahead."""

    request: RecordingRequest
    call_uniqueid: str
    hand_off: HandOff
    result: NoojeeResult | None = None
    store: asyncio.Future[int] | None = None
    timer: asyncio.TimerHandle | None = None
    handed_off: bool = False  # the session was answered without the result


class SyncPath:
    """Sends a request while the session waits, spooled ahead so that it outlives the wait."""

    def __init__(
        self,
        *,
        write_ahead_after: float,
        spool: Spool,
        sender: Sender,
        ledger: Ledger,
        wake: Callable[[], None],
    ) -> None:
        self._write_ahead_after = write_ahead_after
        self._spool = spool
        self._sender = sender
        self._ledger = ledger
        self._wake = wake  # the worker has a retry to look at
        # Every attempt (its session's task) and every record of a result being written (a task
        # of its own) until it is over: shutdown spools the requests not written ahead yet,
        # answers the sessions still waiting, and waits for them all.
        self._in_flight: dict[asyncio.Task[Any], _Attempt] = {}
        self._write_at_once = False  # shutdown: requests go to disk without delay

    async def send_within(
        self, request: RecordingRequest, call_uniqueid: str, budget: float, hand_off: HandOff
    ) -> Outcome | None:
        """Deliver ``request`` within ``budget`` seconds, or queue it: the outcome, within
        ``budget`` plus a spool commit; or None once the session's answer was handed off to
        ``hand_off`` (at the budget's end, or a second signal), when the attempt is over."""
        loop = asyncio.get_running_loop()  # once: on Python 3.11 each costs a system call
        task = asyncio.current_task(loop)
        assert task is not None  # called from a session's task
        attempt = _Attempt(request, call_uniqueid, hand_off)
        self._in_flight[task] = attempt
        first_wait = 0.0 if self._write_at_once else min(self._write_ahead_after, budget)
        if first_wait <= 0:
            self._write_ahead(attempt)  # shutting down, or write_ahead_after = 0
        # One timer for the whole wait: at first_wait it writes the request ahead, at the end
        # of the budget it hands the session's answer off.
        attempt.timer = loop.call_later(
            first_wait, self._waited, attempt, budget - first_wait, budget
        )
        try:
            try:
                result = await self._sender.attempt(request, from_session=True, slot_wait=budget)
            finally:
                attempt.timer.cancel()
            attempt.result = result
            if attempt.handed_off:
                # Written ahead before the hand-off; nobody waits for the record but shutdown.
                await self._record(self._write_ahead(attempt), request, result)
                return None
        except asyncio.CancelledError:
            # Shutdown cut the session short: the request must outlive it all the same.
            self._write_ahead(attempt)
            raise
        finally:
            del self._in_flight[task]
        if result.ok:
            if attempt.store is not None:  # written ahead: the entry is settled meanwhile
                self._record_soon(attempt, attempt.store)
            return Outcome(ACTIONS[request.action].confirmed, result.message)
        # A failure is spooled too: a transient one for the worker to retry, a permanent one
        # (no permission, say) in the dead letters, for the operator to retry once fixed.
        store = self._write_ahead(attempt)
        self._record_soon(attempt, store)  # the session need not wait for that write
        if ACTIONS[request.action].at_most_once and result.uncertain:
            # Settled unconfirmed by _record (never sent again): nothing to wait for.
            return Outcome(Status.UNCONFIRMED, unconfirmed_message(result))
        if result.transient:
            at_most_once = ACTIONS[request.action].at_most_once
            return await queued(store, result.message, wake=self._wake, at_most_once=at_most_once)
        return Outcome(Status.FAILED, result.message)

    def _waited(self, attempt: _Attempt, rest: float, budget: float) -> None:
        """The attempt's timer: no result after write_ahead_after, then the budget is over."""
        if attempt.handed_off:
            return  # a second signal came first
        self._write_ahead(attempt)
        if rest > 0:
            loop = asyncio.get_running_loop()
            attempt.timer = loop.call_later(rest, self._waited, attempt, 0.0, budget)
        else:
            self._hand_off(attempt, f"NoojeeContact did not answer within {budget:g}s")

    def _hand_off(self, attempt: _Attempt, why: str) -> None:
        """The session hears now that its request is queued; the attempt goes on."""
        attempt.handed_off = True
        attempt.hand_off(self._queued_meanwhile(attempt, why))

    async def _queued_meanwhile(self, attempt: _Attempt, why: str) -> Outcome:
        """QUEUED once the entry written ahead is committed, the attempt still under way."""
        assert attempt.store is not None  # written ahead before the answer is handed off
        outcome = await queued(attempt.store, why, wake=self._wake)
        if outcome.status is Status.FAILED and ACTIONS[attempt.request.action].at_most_once:
            return _start_not_stored(outcome, attempt.result)
        return outcome

    def _record_soon(self, attempt: _Attempt, store: asyncio.Future[int]) -> None:
        """Record the attempt's result in its spool entry ``store`` in a task of its own."""
        assert attempt.result is not None
        recording = asyncio.get_running_loop().create_task(
            self._record(store, attempt.request, attempt.result)
        )
        self._in_flight[recording] = attempt
        recording.add_done_callback(self._in_flight.pop)

    async def _record(
        self, store: asyncio.Future[int], request: RecordingRequest, result: NoojeeResult
    ) -> None:
        """``result`` in the spool entry of ``store``, once it is stored."""
        try:
            # asyncio.wait, not await: a cancelled drain must not cancel the write the session
            # may be waiting on too.
            await asyncio.wait((store,))
            if store.exception() is not None:
                return  # the session reports it (queued), or it no longer matters
            write = self._ledger.record(store.result(), request, result)
            if not result.ok:
                self._wake()
            await write
        # Any failure of the spool (nobody else awaits this): the entry stays as it was, so at
        # worst a stop is sent twice.
        except Exception as exc:
            log.exception("spool.write.failed", error=str(exc), error_type=type(exc).__name__)

    def _write_ahead(self, attempt: _Attempt) -> asyncio.Future[int]:
        """Spool a sync request (once) while its attempt goes on; the entry is leased to the
        attempt, which records what became of it once the entry is stored."""
        if attempt.store is None:
            # A start's attempt is already under way: it is stored marked attempted, so that
            # whatever happens to this process it is never sent a second time.
            attempt.store = self._spool.add(
                attempt.request,
                call_uniqueid=attempt.call_uniqueid,
                lease=self._sender.lease,
                attempted=ACTIONS[attempt.request.action].at_most_once,
            )
        return attempt.store

    def write_ahead_in_flight(self) -> None:
        """Shutdown begins: spool every sync request not on disk yet, now and from now on, so
        that no way of ending the process (a second signal included) loses one."""
        self._write_at_once = True
        for attempt in self._in_flight.values():
            if attempt.result is None:
                self._write_ahead(attempt)

    def hurry(self) -> None:
        """A second signal: every request in flight goes to the spool, and each session still
        waiting hears at once that its request is queued; the attempt itself is cancelled (its
        entry stays pending: a stop may reach NoojeeContact twice, which is harmless)."""
        self.write_ahead_in_flight()
        for task, attempt in tuple(self._in_flight.items()):
            if attempt.result is None:
                if not attempt.handed_off:
                    self._hand_off(attempt, STOPPING)
                task.cancel()

    async def drain(self, grace: float) -> None:
        """Within ``grace`` seconds: let the attempts that outlived their session's answer end
        and record what became of them; cancel those still running at the deadline (their
        entries stay pending and are sent after the restart)."""
        await finish_within(tuple(self._in_flight), grace)


def _start_not_stored(failed: Outcome, result: NoojeeResult | None) -> Outcome:
    """A start that could not be queued (a full or stalled disk) while its attempt was on its
    way: FAILED ("nothing changed, press again") would invite a second start, a second leg."""
    if result is None:
        return Outcome(
            Status.UNCONFIRMED,
            f"{failed.message}; its attempt is still on its way: it may be applied, not sent again",
        )
    if result.ok:
        return Outcome(Status.STARTED, result.message)
    if result.uncertain:
        return Outcome(Status.UNCONFIRMED, unconfirmed_message(result))
    return failed  # it never reached NoojeeContact: pressing again is a fresh attempt


async def queued(
    store: asyncio.Future[int], why: str, *, wake: Callable[[], None], at_most_once: bool = False
) -> Outcome:
    """``QUEUED`` once ``store`` (the spool write) is committed, and the worker woken to send
    it; FAILED if the write fails or stalls. A write that stalls may still land and be sent:
    for a request sent ``at_most_once`` (a start) that is UNCONFIRMED, since FAILED ("nothing
    changed, press again") would invite a second start, a second recording leg."""
    if not await _done_within(store, STORE_TIMEOUT):
        log.error("spool.write.slow", timeout=STORE_TIMEOUT)
        if at_most_once:
            return Outcome(
                Status.UNCONFIRMED,
                f"{why}; the spool took over {STORE_TIMEOUT:g} s: it may still be queued and sent",
            )
        return Outcome(Status.FAILED, f"{why}; could not queue: spool too slow")
    error = store.exception()
    if error is not None:
        log.error(
            "spool.write.failed", error=str(error), error_type=type(error).__name__, exc_info=error
        )
        return Outcome(Status.FAILED, f"{why}; could not queue: spool not writable")
    wake()
    return Outcome(Status.QUEUED, why[:MESSAGE_MAX_CHARS], store.result())


async def _done_within(future: asyncio.Future[Any], seconds: float) -> bool:
    """Whether ``future`` is done within ``seconds``. Never cancels it: a cancelled
    session leaves alone the write that others settle on. What asyncio.wait((future,),
    timeout=...) does for one future, at half its cost (9.8 against 5.6 us on uvloop): every
    async session waits for its spool commit this way."""
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    timer = loop.call_later(seconds, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)
    return future.done()
