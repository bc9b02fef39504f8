"""What became of an attempt on a spooled request, written to the spool whoever made it (a
session's sync attempt or the worker): delivered, to be retried, or settled without delivery
(dead-lettered, unconfirmed, expired).

A stop is retried as long as its attempts and age allow (a repeat is harmless). A start is
retried only after a failure that certainly never reached NoojeeContact: one that may have
(no answer, a reset, an answer that is not NoojeeContact's) is settled "unconfirmed", never
sent again, because a second start adds a recording leg. A request by extension is never sent
once ``extension_max_age`` has passed: it would act on whatever call the extension is on then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

from agi_bridge.delivery.config import Retry
from agi_bridge.delivery.repeats import Fate, RepeatCache
from agi_bridge.logs import get_logger
from agi_bridge.metrics import Metrics
from agi_bridge.spool import SettleReason, Spool
from agi_bridge.vocabulary import (
    ACTIONS,
    NoojeeResult,
    RecordingRequest,
    ResultKind,
    unconfirmed_message,
)

log = get_logger("agi_bridge.delivery")

# Why a request by extension was settled once its call's own stop came.
CANCELLED_BY_ITS_CALL: Final = "cancelled: the call's own stop (by its id) superseded it"


class Ledger:
    """Records each attempt's result on its spool entry, and tells the repeats what left."""

    def __init__(
        self,
        *,
        retry: Retry,
        extension_max_age: float,
        spool: Spool,
        metrics: Metrics,
        repeats: RepeatCache,
        wall_clock: Callable[[], float],
    ) -> None:
        self._retry = retry
        self._extension_max_age = extension_max_age
        self._spool = spool
        self._metrics = metrics
        self._repeats = repeats
        self._wall_clock = wall_clock

    def delivered(self, entry_id: int, message: str) -> asyncio.Future[None]:
        """NoojeeContact did what entry ``entry_id`` asked: it leaves the spool."""
        # Told before the write is queued: a repeat that finds the entry gone knows why.
        self._repeats.entry_left(entry_id, Fate.DELIVERED, message)
        return self._spool.remove(entry_id)

    def failed(
        self,
        entry_id: int,
        request: RecordingRequest,
        result: NoojeeResult,
        *,
        attempts: int,
        created: float,
    ) -> asyncio.Future[Any]:
        """One failed attempt of a spooled request: count it for a retry, or move the entry to
        the dead letters when the failure is permanent or the entry has used up its attempts
        or its age."""
        retry = self._retry
        age = self._wall_clock() - created
        rules = ACTIONS[request.action]
        if rules.at_most_once and result.uncertain:
            return self.dismiss("unconfirmed", entry_id, request, unconfirmed_message(result))
        if result.transient and request.kind == "extension" and age >= self._extension_max_age:
            why = f"{result.message}; {self.too_late}"
            return self.dismiss("expired", entry_id, request, why)
        exhausted = attempts + 1 >= retry.max_attempts or age >= retry.max_age
        if result.transient and not exhausted:
            self._metrics.retries.inc()
            return self._spool.reschedule(entry_id, result.message, retry_at=self._wall_clock())
        if result.kind is ResultKind.NOT_FOUND and rules.not_found_settles:
            # No such call: a stop that reached NoojeeContact after the call (and its recording)
            # ended. Nobody can fix or retry that, so it pages nobody as a dead letter; it is
            # still a WARNING and counted (agi_bridge_noojee_errors{kind="not_found"}), so that
            # a site where EVERY stop ends here (a wrong identifier) sees it.
            log.warning(
                "spool.entry.not_found",
                id=entry_id,
                target=request.target,
                attempts=attempts + 1,
                error=result.message,
            )
            self._repeats.entry_left(entry_id, Fate.NOT_FOUND, result.message)
            return self._spool.remove(entry_id)
        self._metrics.dead_letters.inc()
        log.error(
            "spool.entry.dead",
            id=entry_id,
            action=request.action,
            target=request.target,
            attempts=attempts + 1,
            age=round(age, 1),
            error=result.message,
        )
        return self._spool.dead_letter(entry_id, result.message)

    @property
    def too_late(self) -> str:
        """Why a request by extension is no longer sent."""
        max_age = self._extension_max_age
        return f"expired: by extension and not delivered within {max_age:g}s, not sent"

    def dismiss(
        self,
        reason: SettleReason,
        entry_id: int,
        request: RecordingRequest,
        message: str,
        *,
        attempted: bool = True,
    ) -> asyncio.Future[None]:
        """Settle a request without delivery, never to be sent again: an unconfirmed start
        (a second one adds a recording leg), or a request by extension expired or cancelled
        (it would reach the extension's next call). ``attempted`` counts this try."""
        self.note(reason, entry_id, request, message)
        return self._spool.dead_letter(entry_id, message, attempted=attempted, reason=reason)

    def note(
        self, reason: SettleReason, entry_id: int, request: RecordingRequest, message: str
    ) -> None:
        """Count and log (a WARNING for the operator) a request settled without delivery."""
        self._metrics.settle(reason)
        log.warning(
            f"spool.entry.{reason}",
            id=entry_id,
            action=request.action,
            target=request.target,
            kind=request.kind,
            error=message,
        )

    def cancelled(self, entries: asyncio.Future[list[int]], call_uniqueid: str) -> None:
        """Count and log the requests by extension that a call's own stop cancelled."""
        if entries.cancelled():
            return
        error = entries.exception()
        if error is not None:
            log.error("spool.write.failed", error=str(error), error_type=type(error).__name__)
            return
        for entry_id in entries.result():
            self._metrics.settle("cancelled")
            log.warning("spool.entry.cancelled", id=entry_id, call_uniqueid=call_uniqueid)

    def record(
        self, entry_id: int, request: RecordingRequest, result: NoojeeResult
    ) -> asyncio.Future[Any]:
        """A session's own attempt on the entry it wrote ahead (its first attempt)."""
        if result.ok:
            return self.delivered(entry_id, result.message)
        return self.failed(entry_id, request, result, attempts=0, created=self._wall_clock())
