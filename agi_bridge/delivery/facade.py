"""Getting a request to NoojeeContact without holding the call and without losing it.

Nothing the dialplan is told is ever lost: before it hears ``QUEUED`` the request is on disk.

- ``sync``: wait for NoojeeContact within the route's budget, the request written ahead to the
  spool (:mod:`~agi_bridge.delivery.sync`).
- ``async``: answer ``QUEUED`` as soon as the request is on disk; the worker delivers it
  (:mod:`~agi_bridge.delivery.worker`, with its backoff).

The same action on the same call within the dedup window is sent once
(:mod:`~agi_bridge.delivery.repeats`). Whoever sends a request goes through one pool of
connection slots (:mod:`~agi_bridge.delivery.sender`), and whoever learns what became of a
spooled request records it the same way (:mod:`~agi_bridge.delivery.ledger`). This module only
puts them together behind the few calls the server and the app make.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from agi_bridge.delivery.config import DeliveryConfig
from agi_bridge.delivery.ended import RecentCalls
from agi_bridge.delivery.ledger import CANCELLED_BY_ITS_CALL, Ledger
from agi_bridge.delivery.repeats import RepeatCache
from agi_bridge.delivery.sender import Client, Sender
from agi_bridge.delivery.sync import SyncPath, queued
from agi_bridge.delivery.worker import Worker
from agi_bridge.metrics import Metrics
from agi_bridge.spool import Spool
from agi_bridge.vocabulary import ACTIONS, HandOff, Mode, Outcome, RecordingRequest, Status


class Delivery:
    """Sends requests now (sync), later (async), and again after failures (the worker)."""

    def __init__(
        self,
        *,
        config: DeliveryConfig,
        client: Client,
        spool: Spool,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._metrics = metrics
        self._wall_clock = wall_clock
        # Calls with a request by extension made within extension_max_age (recover() fills it
        # from the spool), and calls whose own stop has come.
        self._extension_calls = RecentCalls(max_age=config.extension_max_age, wall_clock=wall_clock)
        self._ended = RecentCalls(max_age=config.extension_max_age, wall_clock=wall_clock)
        self._sender = Sender(
            connections=config.connections, client=client, metrics=metrics, clock=clock
        )
        self._repeats = RepeatCache(
            window=config.dedup_window,
            spool=spool,
            clock=clock,
            extension_max_age=config.extension_max_age,
            on_expired=lambda *settled: self._ledger.note("expired", *settled),
        )
        self._ledger = ledger = Ledger(
            retry=config.retry,
            extension_max_age=config.extension_max_age,
            spool=spool,
            metrics=metrics,
            repeats=self._repeats,
            wall_clock=wall_clock,
        )
        self._worker = Worker(
            retry=config.retry,
            extension_max_age=config.extension_max_age,
            spool=spool,
            sender=self._sender,
            ledger=ledger,
            metrics=metrics,
            wall_clock=wall_clock,
            ended=self._ended,
        )
        self._sync = SyncPath(
            write_ahead_after=config.write_ahead_after,
            spool=spool,
            sender=self._sender,
            ledger=ledger,
            wake=self._worker.wake,
        )

    @property
    def last_failure(self) -> float | None:
        """Monotonic time of the last transient failure of NoojeeContact, if any."""
        return self._sender.last_failure

    @property
    def last_success(self) -> float | None:
        """Monotonic time of the last answer from NoojeeContact that was not a failure."""
        return self._sender.last_success

    async def submit(
        self,
        request: RecordingRequest,
        *,
        call_uniqueid: str,
        mode: Mode,
        budget: float,
        hand_off: HandOff,
    ) -> Outcome | None:
        """Deliver or queue ``request``: its outcome within ``budget`` plus a spool commit. A
        sync attempt runs in the caller's task; when it outlives the budget, the outcome goes
        to ``hand_off`` instead, and this returns None once the attempt is over."""
        if request.kind == "extension" and call_uniqueid in self._ended:
            # The code raced the call's end: sent now, it would reach the extension's next call.
            return Outcome(Status.EXPIRED, "by extension after its call ended: not sent")
        self._cancel_by_extension(request, call_uniqueid)

        async def send(hand_off: HandOff) -> Outcome | None:
            if mode == "async":
                store = self._spool.add(request, call_uniqueid=call_uniqueid)
                at_most_once = ACTIONS[request.action].at_most_once
                return await queued(
                    store, "queued for delivery", wake=self._worker.wake, at_most_once=at_most_once
                )
            return await self._sync.send_within(request, call_uniqueid, budget, hand_off)

        key = (request.target, call_uniqueid)
        outcome, repeated = await self._repeats.once(key, request, send, hand_off)
        if repeated:
            self._metrics.duplicates.inc()
        return outcome

    def _cancel_by_extension(self, request: RecordingRequest, call_uniqueid: str) -> None:
        """The call's own stop (its hangup, by uniqueid or linkedid) cancels what the call still
        has queued by extension: that could only reach the extension's NEXT call. Only calls
        known to have made a request by extension (recently) cost a spool query."""
        if request.kind == "extension":
            self._extension_calls.add(call_uniqueid)
        elif ACTIONS[request.action].supersedes_by_extension:
            self._ended.add(call_uniqueid)
            if not self._extension_calls.discard(call_uniqueid):
                return
            cancelling = self._spool.cancel_by_extension(call_uniqueid, CANCELLED_BY_ITS_CALL)
            cancelling.add_done_callback(lambda done: self._ledger.cancelled(done, call_uniqueid))

    async def recover(self) -> None:
        """At start-up, before anything is sent: settle as unconfirmed the starts the last
        process may have sent (they are never sent again), and note which calls still have
        requests queued by extension (their own stop cancels them)."""
        why = "may have reached NoojeeContact, not sent again: on its way when the bridge stopped"
        for entry in await self._spool.settle_interrupted(why):
            self._ledger.note("unconfirmed", entry.id, entry.request, why)
        for entry in await self._spool.by_extension():
            self._extension_calls.add(entry.call_uniqueid, at=entry.created)

    def write_ahead_in_flight(self) -> None:
        """Shutdown begins: spool every sync request not on disk yet, now and from now on."""
        self._sync.write_ahead_in_flight()

    def hurry(self) -> None:
        """A second signal: sessions still waiting for NoojeeContact hear QUEUED now (through
        their hand-off), and their attempts are cancelled."""
        self._sync.hurry()

    async def run(self) -> None:
        """The worker: deliver what the spool holds until :meth:`stop_worker` (or cancel)."""
        await self._worker.run()

    def stop_worker(self) -> None:
        """The worker finishes the batch in hand and claims nothing more."""
        self._worker.stop()

    async def drain(self, grace: float) -> None:
        """Within ``grace`` seconds, the sync attempts that outlived their session's answer end
        and their results are recorded; what still runs then is cancelled and stays pending."""
        await self._sync.drain(grace)
