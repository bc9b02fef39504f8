"""Getting a request to NoojeeContact without holding the call and without losing it.

Nothing the dialplan is told is ever lost: before it hears ``QUEUED`` the request is on disk.

- ``sync``: wait for NoojeeContact within the route's budget. An answer within the budget is
  the dialplan's answer. An attempt not confirmed within ``write_ahead_after`` is written to the
  spool while it goes on (so a sync request does not wait for the disk unless it ends up
  queued); a timeout or a transient error leaves the request in the spool and the dialplan
  hears ``QUEUED``. An attempt still running when the budget ends is not cancelled: if it
  succeeds, the spool entry is settled and nothing is sent twice.
- ``async``: answer ``QUEUED`` as soon as the request is on disk; the worker delivers it.

The worker sends due entries at full concurrency while NoojeeContact answers. Once it fails
transiently, the worker stops sending everything and probes with one entry at a time, backing
off exponentially with jitter (stamina), so a server coming back from an outage is not hit by
ten thousand retries at once; any successful sync attempt ends the backoff early.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import stamina

from agi_bridge.logs import get_logger
from agi_bridge.metrics import Metrics
from agi_bridge.noojee import NoojeeClient
from agi_bridge.settings import Mode, Settings
from agi_bridge.spool import Spool, SpoolEntry, SpoolError
from agi_bridge.tasks import finish_within
from agi_bridge.vocabulary import (
    MESSAGE_MAX_CHARS,
    NoojeeResult,
    Outcome,
    RecordingRequest,
    ResultKind,
    Status,
)

log = get_logger("agi_bridge.delivery")

# How long a session waits for its spool commit before it answers FAILED rather than hold the
# call on a stalled disk: SQLite's own busy timeout (another process holding the lock) is 5 s.
STORE_TIMEOUT: Final = 5.0
# The worker looks at the spool at least this often when idle: entries that `agi-bridge spool
# retry` (another process) moved back to pending are picked up within a second.
IDLE_POLL: Final = 1.0
# After an unexpected error in the worker loop (the spool failing, say), wait this long before
# trying again rather than spin or die.
WORKER_ERROR_PAUSE: Final = 1.0


def _log_write_failure(write: asyncio.Future[Any]) -> None:
    """A spool write nobody awaits: its failure must still be seen (the entry stays as it was,
    so at worst a stop is sent twice)."""
    if not write.cancelled() and write.exception() is not None:
        log.error("spool.write.failed", error=str(write.exception()))


@dataclass(slots=True, eq=False)
class _SyncAttempt:
    """A session's own attempt at a sync request, and its spool entry once written ahead."""

    request: RecordingRequest
    call_uniqueid: str
    task: asyncio.Future[NoojeeResult]
    store: asyncio.Future[int] | None = None


class _Unavailable(Exception):
    """NoojeeContact failed transiently: the probe's signal to stamina to back off."""


async def _outcome_of(earlier: asyncio.Future[Outcome]) -> Outcome | None:
    """The earlier request's outcome, or None when it was abandoned (its session cancelled)."""
    try:
        return await asyncio.shield(earlier)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this session itself is being cancelled
        return None


def _done_status(request: RecordingRequest) -> Status:
    return Status.STOPPED if request.action == "stop" else Status.STARTED


class Delivery:
    """Sends requests now (sync), later (async), and again after failures (the worker)."""

    def __init__(
        self,
        *,
        settings: Settings,
        client: NoojeeClient,
        spool: Spool,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._client = client
        self._spool = spool
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._slots = asyncio.Semaphore(settings.noojee_max_connections)
        # Longest one attempt can take: /Time, the request, and its one retry after an
        # expired timestamp, plus a margin. Until then no one else sends the same entry.
        self._lease = settings.noojee_connect_timeout + 3 * settings.noojee_timeout + 1.0
        self._work = asyncio.Event()
        self._recovered = asyncio.Event()
        self._tasks: set[asyncio.Future[NoojeeResult]] = set()  # attempts past their budget
        self._writes: set[asyncio.Future[Any]] = set()  # spool writes nobody awaits
        self._settling: set[asyncio.Future[int]] = set()  # stores whose outcome waits on them
        # (target, call uniqueid) -> (action, when, its outcome, perhaps still to come)
        self._recent: OrderedDict[tuple[str, str], tuple[str, float, asyncio.Future[Outcome]]] = (
            OrderedDict()
        )
        self._stopping = False
        self._write_at_once = False  # shutdown: sync requests go to disk without delay
        self._unstored: set[_SyncAttempt] = set()  # sync attempts not written ahead (yet)
        self.last_failure: float | None = None  # monotonic time of the last transient failure
        self.last_success: float | None = None

    # --- the session's side ---------------------------------------------------------------

    async def submit(
        self, request: RecordingRequest, *, call_uniqueid: str, mode: Mode, budget: float
    ) -> Outcome:
        """Deliver or queue ``request``; returns within ``budget`` plus a spool commit."""
        key = (request.exten_or_uniqueid, call_uniqueid)
        earlier = self._earlier(key, request.action)
        if earlier is not None:
            # The same action on the same call is under way or done: answer with its outcome
            # (a repeat arriving meanwhile waits for it, within the same budget).
            repeated = await _outcome_of(earlier)
            if repeated is not None:
                self._metrics.duplicates.inc()
                if repeated.entry is not None:
                    # QUEUED then: the agent pressing again wants to know where the request
                    # stands NOW, not what the bridge knew when it first answered.
                    repeated = await self._now(request, repeated)
                window = self._settings.dedup_window
                message = f"repeat within {window:g}s, sent once: {repeated.message}"
                return Outcome(repeated.status, message[:MESSAGE_MAX_CHARS])
        remembered = self._remember(key, request.action)
        try:
            outcome = await self._submit(request, call_uniqueid, mode, budget)
        except BaseException:
            self._forget(key, remembered)
            remembered.cancel()  # repeats waiting on it try for themselves
            raise
        remembered.set_result(outcome)
        if outcome.status is Status.FAILED:
            self._forget(key, remembered)  # a failure is worth trying again at once
        return outcome

    async def _submit(
        self, request: RecordingRequest, call_uniqueid: str, mode: Mode, budget: float
    ) -> Outcome:
        if mode == "async":
            store = self._spool.add(request, call_uniqueid=call_uniqueid)
            return await self._queued(store, "queued for delivery")
        return await self._send_within(request, call_uniqueid, budget)

    async def _send_within(
        self, request: RecordingRequest, call_uniqueid: str, budget: float
    ) -> Outcome:
        task = asyncio.ensure_future(self._attempt(request, from_session=True, slot_wait=budget))
        # Tracked from the start: shutdown waits for it even if this session is cancelled.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        attempt = _SyncAttempt(request, call_uniqueid, task)
        first_wait = 0.0 if self._write_at_once else min(self._settings.write_ahead_after, budget)
        if first_wait <= 0:
            self._write_ahead(attempt)  # shutting down, or write_ahead_after = 0
        else:
            self._unstored.add(attempt)
        try:
            done, _ = await asyncio.wait((task,), timeout=first_wait)
        except asyncio.CancelledError:
            # Shutdown cut the session short: the request must outlive it all the same.
            self._write_ahead(attempt)
            raise
        finally:
            self._unstored.discard(attempt)
        if done and task.result().ok:
            return Outcome(_done_status(request), task.result().message)
        # A failure is spooled too: a transient one for the worker to retry, a permanent one
        # (no permission, say) in the dead letters, for the operator to retry once fixed.
        store = self._write_ahead(attempt)
        if not done and budget > first_wait:
            done, _ = await asyncio.wait((task,), timeout=budget - first_wait)
        if not done:
            # Not cancelled: a late answer still settles the spool entry (sent once).
            return await self._queued(store, f"NoojeeContact did not answer within {budget:g}s")
        result = task.result()
        if result.ok:
            return Outcome(_done_status(request), result.message)
        if result.transient:
            return await self._queued(store, result.message)
        return Outcome(Status.FAILED, result.message)

    async def _now(self, request: RecordingRequest, queued: Outcome) -> Outcome:
        """Where a queued request stands: delivered, still queued, or failed for good."""
        assert queued.entry is not None
        try:
            found = await self._spool.where(queued.entry)
        except SpoolError as exc:
            log.exception("spool.read.failed", error=str(exc))
            return queued  # what the bridge knew; the spool's failure is logged
        if found is None:
            return Outcome(_done_status(request), "delivered since it was queued")
        table, error = found
        if table == "dead":
            return Outcome(Status.FAILED, f"failed since it was queued: {error}")
        return Outcome(Status.QUEUED, f"still queued: {error or 'not confirmed yet'}", queued.entry)

    def _write_ahead(self, attempt: _SyncAttempt) -> asyncio.Future[int]:
        """Spool a sync request (once) while its attempt goes on; the entry is leased to the
        attempt, and what becomes of the attempt is recorded once the entry is stored."""
        if attempt.store is not None:
            return attempt.store
        request, task = attempt.request, attempt.task
        store = self._spool.add(request, call_uniqueid=attempt.call_uniqueid, lease=self._lease)
        attempt.store = store
        if task.done():
            self._settle_when_stored(request, store, task)
        else:
            task.add_done_callback(lambda done: self._settle_when_stored(request, store, done))
        return store

    def write_ahead_in_flight(self) -> None:
        """Shutdown begins: spool every sync request not on disk yet, now and from now on, so
        that no way of ending the process (a second signal included) loses one."""
        self._write_at_once = True
        for attempt in list(self._unstored):
            self._write_ahead(attempt)

    async def _queued(self, store: asyncio.Future[int], why: str) -> Outcome:
        # asyncio.wait never cancels what it waits for: a cancelled session leaves alone the
        # write that others settle on (and it costs less than a timeout around a shield).
        done, _ = await asyncio.wait((store,), timeout=STORE_TIMEOUT)
        if not done:
            log.error("spool.write.slow", timeout=STORE_TIMEOUT)
            return Outcome(Status.FAILED, f"{why}; could not queue: spool too slow")
        error = store.exception()
        if error is not None:
            log.error("spool.write.failed", error=str(error), exc_info=error)
            return Outcome(Status.FAILED, f"{why}; could not queue: spool not writable")
        self._work.set()
        return Outcome(Status.QUEUED, why[:MESSAGE_MAX_CHARS], store.result())

    def _settle_when_stored(
        self,
        request: RecordingRequest,
        store: asyncio.Future[int],
        attempt: asyncio.Future[NoojeeResult],
    ) -> None:
        """Record in the spool what became of a sync attempt, once its entry is stored.
        Callbacks rather than a task per session: this runs for every stop."""
        if attempt.cancelled():
            return  # shutdown: the entry stays pending and is replayed after the restart
        result = attempt.result()
        if store.done():
            self._settle(request, store, result)
        else:
            self._settling.add(store)  # drain() waits for it before the spool closes
            store.add_done_callback(self._settling.discard)
            store.add_done_callback(lambda stored: self._settle(request, stored, result))

    def _settle(
        self, request: RecordingRequest, store: asyncio.Future[int], result: NoojeeResult
    ) -> None:
        if store.cancelled() or store.exception() is not None:
            return  # reported by _queued, or irrelevant after a success
        entry_id = store.result()
        # The spool runs its jobs in order, so the worker's next claim sees these writes.
        if result.ok:
            write: asyncio.Future[Any] = self._spool.delivered(entry_id)
        else:
            write = self._record_failure(
                entry_id, request, result, attempts=0, created=self._wall_clock()
            )
            self._work.set()
        write.add_done_callback(_log_write_failure)
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    # --- deduplication --------------------------------------------------------------------

    def _earlier(self, key: tuple[str, str], action: str) -> asyncio.Future[Outcome] | None:
        """The outcome (perhaps still to come) of the same action on the same call within the
        window, or None.

        The key holds the call's uniqueid, so a new call on the same extension is never taken
        for a repeat; a stop after a start (an agent toggling) is not a repeat either.
        """
        now = self._clock()
        window = self._settings.dedup_window
        recent = self._recent
        while recent:
            _, (_, at, _) = next(iter(recent.items()))
            if now - at <= window:
                break
            recent.popitem(last=False)
        seen = recent.get(key)
        if seen is None or seen[0] != action:
            return None
        return seen[2]

    def _remember(self, key: tuple[str, str], action: str) -> asyncio.Future[Outcome]:
        outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if self._settings.dedup_window > 0:
            self._recent.pop(key, None)
            self._recent[key] = (action, self._clock(), outcome)
        return outcome

    def _forget(self, key: tuple[str, str], outcome: asyncio.Future[Outcome]) -> None:
        seen = self._recent.get(key)
        if seen is not None and seen[2] is outcome:
            del self._recent[key]

    # --- talking to NoojeeContact ---------------------------------------------------------

    async def _attempt(
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
                f"all {self._settings.noojee_max_connections} NoojeeContact connections busy",
            )
        try:
            started = self._clock()
            result = await self._client.send(request)
        except Exception as exc:  # the client promises not to raise: a safety net
            log.exception("noojee.client.bug", error=type(exc).__name__)
            result = NoojeeResult(ResultKind.TRANSPORT, f"client error: {type(exc).__name__}")
        finally:
            self._slots.release()
        self._metrics.observe_noojee(result, self._clock() - started)
        if result.transient:
            self.last_failure = self._clock()
            log.warning(
                "noojee.request.failed",
                kind=result.kind.value,
                message=result.message,
                http_status=result.http_status,
                action=request.action,
            )
        else:
            self.last_success = self._clock()
            if result.ok and from_session:
                # A session got through while the worker backs off: no need to wait for the
                # next probe. (The worker's own probe ends the backoff by returning.)
                self._recovered.set()
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

    # --- the background worker ------------------------------------------------------------

    async def run(self) -> None:
        """Deliver what the spool holds, forever (cancel to stop)."""
        while not self._stopping:
            try:
                await self._run_once()
            except Exception as exc:  # the worker must outlive any one failure
                log.exception("spool.worker.error", error=str(exc))
                await asyncio.sleep(WORKER_ERROR_PAUSE)

    def stop_worker(self) -> None:
        """Ask the worker to finish the batch in hand and claim nothing more (shutdown): what
        it has not claimed stays pending for the next start, nothing is cut mid-request."""
        self._stopping = True
        self._work.set()
        self._recovered.set()  # ends a backoff at once

    async def _run_once(self) -> None:
        self._work.clear()
        entries = await self._spool.claim_due(
            limit=self._settings.noojee_max_connections, lease=self._lease
        )
        if not entries:
            if not self._stopping:
                await self._wait_for_work()
            return
        if await self._deliver(entries) and not self._stopping:
            await self._back_off()

    async def _wait_for_work(self) -> None:
        if self._work.is_set():
            return  # stored while the claim ran: no need to ask the spool when to look again
        next_due = await self._spool.next_due()
        timeout = IDLE_POLL if next_due is None else max(0.0, next_due - self._wall_clock())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(timeout, IDLE_POLL)):
                await self._work.wait()

    async def _deliver(self, entries: list[SpoolEntry]) -> bool:
        """One attempt for each of ``entries``, all at once; True when one failed transiently."""
        results = await asyncio.gather(*(self._send_entry(entry) for entry in entries))
        return any(result.transient for result in results)

    async def _send_entry(self, entry: SpoolEntry) -> NoojeeResult:
        result = await self._attempt(entry.request, from_session=False)
        if result.ok:
            # At once, not with the rest of the batch: a delivery made must be recorded even
            # if the batch is cut short (shutdown, kill -9), or it is sent again. The spool
            # thread still commits the batch's deletions together.
            await self._spool.delivered(entry.id)
            self._metrics.delivered.inc()
            log.info(
                "spool.entry.delivered",
                id=entry.id,
                action=entry.request.action,
                attempts=entry.attempts + 1,
                message=result.message,
            )
        else:
            await self._record_failure(
                entry.id, entry.request, result, attempts=entry.attempts, created=entry.created
            )
        return result

    def _record_failure(
        self,
        entry_id: int,
        request: RecordingRequest,
        result: NoojeeResult,
        *,
        attempts: int,
        created: float,
    ) -> asyncio.Future[Any]:
        """One failed attempt of a spooled request, from a session or the worker: count it for a
        retry, or move the entry to the dead letters when the failure is permanent or the
        entry has used up its attempts or its age."""
        age = self._wall_clock() - created
        exhausted = (
            attempts + 1 >= self._settings.retry_max_attempts or age >= self._settings.retry_max_age
        )
        if result.transient and not exhausted:
            self._metrics.retries.inc()
            return self._spool.failed(entry_id, result.message, retry_at=self._wall_clock())
        if result.kind is ResultKind.NOT_FOUND and request.action == "stop":
            # No such call: a stop that reached NoojeeContact after the call (and its recording)
            # ended. Nobody can fix or retry that, so it pages nobody as a dead letter; it is
            # still a WARNING and counted (agi_bridge_noojee_errors{kind="not_found"}), so that
            # a site where EVERY stop ends here (a wrong identifier) sees it.
            log.warning(
                "spool.entry.not_found",
                id=entry_id,
                target=request.exten_or_uniqueid,
                attempts=attempts + 1,
                error=result.message,
            )
            return self._spool.delivered(entry_id)
        self._metrics.dead_letters.inc()
        log.error(
            "spool.entry.dead",
            id=entry_id,
            action=request.action,
            target=request.exten_or_uniqueid,
            attempts=attempts + 1,
            age=round(age, 1),
            error=result.message,
        )
        return self._spool.dead_letter(entry_id, result.message)

    async def _back_off(self) -> None:
        """Probe with one entry at a time, backing off, until NoojeeContact answers again."""
        self._recovered.clear()
        probe = asyncio.ensure_future(self._probe())
        recovered = asyncio.ensure_future(self._recovered.wait())
        try:
            await asyncio.wait((probe, recovered), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (probe, recovered):
                task.cancel()
            await asyncio.gather(probe, recovered, return_exceptions=True)
        if not probe.cancelled() and probe.exception() is not None:
            raise probe.exception()  # type: ignore[misc]  # e.g. the spool failing: run() logs it
        log.info("noojee.available")

    async def _probe(self) -> None:
        settings = self._settings
        log.warning("noojee.unavailable", retry_max_delay=settings.retry_max_delay)
        async for attempt in stamina.retry_context(
            on=_Unavailable,
            attempts=None,  # the spool's own limits (attempts, age) end an entry's life
            timeout=None,
            wait_initial=settings.retry_initial_delay,
            wait_max=settings.retry_max_delay,
            wait_jitter=settings.retry_initial_delay,
        ):
            with attempt:
                if self._stopping:
                    return
                entries = await self._spool.claim_due(limit=1, lease=self._lease)
                # Nothing due (the rest is leased to sync attempts in flight): no proof yet
                # that NoojeeContact is back, so keep the pace.
                if not entries or await self._deliver(entries):
                    raise _Unavailable

    async def drain(self, grace: float) -> None:
        """Within ``grace`` seconds: let the attempts that outlived their session end, and
        cancel those still running at the deadline (their entries stay pending and are sent
        after the restart); then wait for the spool writes that record what became of them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await finish_within(self._tasks, grace)
        await asyncio.sleep(0)  # let the attempts' done-callbacks run
        if self._settling:
            left = max(0.0, deadline - loop.time())
            await asyncio.wait(set(self._settling), timeout=min(STORE_TIMEOUT, left))
        await asyncio.sleep(0)  # and the stores' callbacks submit their writes
        if self._writes:
            left = max(0.0, deadline - loop.time())
            await asyncio.wait(set(self._writes), timeout=min(STORE_TIMEOUT, left))
