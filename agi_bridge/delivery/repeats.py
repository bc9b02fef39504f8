"""Repeats: the same action on the same call within the window is sent once, and a repeat is
told where the first request stands now.

The key holds the call's uniqueid, so a new call on the same extension is never taken for a
repeat; a stop after a start (an agent toggling) is not a repeat either. An entry that left the
spool is reported from what this process saw become of it (delivered, or unknown to
NoojeeContact); an entry gone without such a record (purged by an operator, say) was never
confirmed, and is not reported as delivered.
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from agi_bridge.logs import get_logger
from agi_bridge.spool import Spool, SpoolError
from agi_bridge.vocabulary import (
    ACTIONS,
    MESSAGE_MAX_CHARS,
    Action,
    HandOff,
    Outcome,
    RecordingRequest,
    Status,
)

log = get_logger("agi_bridge.delivery")

# (target, call uniqueid): what makes two presses the same request.
Key = tuple[str, str]


class Fate(enum.Enum):
    """Why a spool entry left the spool without a dead letter."""

    DELIVERED = "delivered"
    NOT_FOUND = "not_found"  # NoojeeContact knows no such call: settled, never confirmed


@dataclass(slots=True)
class _Recent:
    """A request seen within the window, and its outcome: a future while the request is under
    way (a repeat arriving then waits for it), the outcome itself once known (set in place: a
    second record per request cost every session). A future kept for the whole window would be
    one more object per session held for a minute."""

    action: Action
    at: float
    outcome: asyncio.Future[Outcome] | Outcome


@dataclass(frozen=True, slots=True)
class _Settled:
    """What became of a spool entry, and when this process saw it."""

    fate: Fate
    at: float
    message: str


class RepeatCache:
    """The requests of the last ``window`` seconds, and the fates of the entries they queued."""

    def __init__(
        self,
        *,
        window: float,
        spool: Spool,
        clock: Callable[[], float],
        extension_max_age: float | None = None,
        on_expired: Callable[[int, RecordingRequest, str], None] | None = None,
    ) -> None:
        self._window = window
        self._on_expired = on_expired  # counts and logs an entry this cache settled expired
        # A queued request by extension older than this is never sent (the worker settles it
        # when it gets to it): a repeat hears that at once, not "still queued".
        self._extension_max_age = extension_max_age
        self._spool = spool
        self._clock = clock
        self._recent: OrderedDict[Key, _Recent] = OrderedDict()
        # A repeat asks about an entry queued by a request at most ``window`` old, whose fate
        # came later still: a fate older than the window can never be asked about.
        self._settled: OrderedDict[int, _Settled] = OrderedDict()

    async def once(
        self,
        key: Key,
        request: RecordingRequest,
        send: Callable[[HandOff], Awaitable[Outcome | None]],
        hand_off: HandOff,
    ) -> tuple[Outcome | None, bool]:
        """``send(hand_off)``'s outcome, or (True: a repeat) that of the same action on the same
        call within the window, which a repeat arriving meanwhile waits for. None when ``send``
        handed the outcome off: the repeats then hear it as ``hand_off`` does."""
        earlier = self.earlier(key, request.action)
        if earlier is not None:
            repeated = await self.answer(request, earlier, first_at=self.seen_at(key))
            if repeated is not None:
                if repeated.status is Status.EXPIRED:
                    # Told once; the next press is a fresh request, sent while the call is on.
                    self.forget(key, earlier)
                return repeated, True
        remembered = self.remember(key, request.action)
        handed_off = False

        def hand_off_settled(later: Awaitable[Outcome]) -> None:
            nonlocal handed_off
            handed_off = True
            hand_off(self._settled_later(key, remembered, later))

        try:
            outcome = await send(hand_off_settled)
        except BaseException:
            if not handed_off:  # else the task handed the outcome settles it
                self._abandoned(key, remembered)
            raise
        if outcome is not None:
            self._settle(key, remembered, outcome)
        return outcome, False

    async def _settled_later(
        self, key: Key, remembered: asyncio.Future[Outcome], later: Awaitable[Outcome]
    ) -> Outcome:
        try:
            outcome = await later
        except BaseException:
            self._abandoned(key, remembered)
            raise
        self._settle(key, remembered, outcome)
        return outcome

    def _settle(self, key: Key, remembered: asyncio.Future[Outcome], outcome: Outcome) -> None:
        """The request behind ``remembered`` had ``outcome``: its repeats hear it."""
        remembered.set_result(outcome)
        if outcome.status is Status.FAILED:
            self.forget(key, remembered)  # a failure is worth trying again at once
        else:
            seen = self._recent.get(key)
            if seen is not None and seen.outcome is remembered:
                seen.outcome = outcome

    def _abandoned(self, key: Key, remembered: asyncio.Future[Outcome]) -> None:
        self.forget(key, remembered)
        remembered.cancel()  # repeats waiting on it try for themselves

    def earlier(self, key: Key, action: Action) -> asyncio.Future[Outcome] | Outcome | None:
        """The outcome (a future while still to come) of the same action on the same call
        within the window, or None."""
        now = self._clock()
        _expire(self._recent, now - self._window)
        seen = self._recent.get(key)
        if seen is None or seen.action != action:
            return None
        return seen.outcome

    def remember(self, key: Key, action: Action) -> asyncio.Future[Outcome]:
        """A request is under way: its outcome, for the caller to set, answers its repeats."""
        outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if self._window > 0:
            self._recent.pop(key, None)
            self._recent[key] = _Recent(action, self._clock(), outcome)
        return outcome

    def forget(self, key: Key, outcome: asyncio.Future[Outcome] | Outcome) -> None:
        """The request behind ``outcome`` is worth trying again at once (it failed, or was
        abandoned)."""
        seen = self._recent.get(key)
        if seen is not None and seen.outcome is outcome:
            del self._recent[key]

    def entry_left(self, entry_id: int, fate: Fate, message: str) -> None:
        """Spool entry ``entry_id`` is leaving the spool without a dead letter."""
        if self._window <= 0:
            return  # no repeat will ever ask
        now = self._clock()
        _expire(self._settled, now - self._window)
        self._settled[entry_id] = _Settled(fate, now, message)

    def seen_at(self, key: Key) -> float | None:
        """When the request that ``key``'s repeats answer to was made (clock time)."""
        seen = self._recent.get(key)
        return None if seen is None else seen.at

    async def answer(
        self,
        request: RecordingRequest,
        earlier: asyncio.Future[Outcome] | Outcome,
        *,
        first_at: float | None = None,
    ) -> Outcome | None:
        """A repeat's answer: the earlier request's outcome, where it stands now if it was
        queued; None when the earlier request was abandoned (its session cancelled)."""
        if isinstance(earlier, Outcome):
            repeated = earlier
        else:
            try:
                repeated = await asyncio.shield(earlier)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this session itself is being cancelled
                return None
        if repeated.entry is not None:
            # QUEUED then: the agent pressing again wants to know where the request stands
            # NOW, not what the bridge knew when it first answered.
            repeated = await self._now(request, repeated.entry, repeated, first_at)
        message = f"repeat within {self._window:g}s, sent once: {repeated.message}"
        return Outcome(repeated.status, message[:MESSAGE_MAX_CHARS])

    async def _now(
        self, request: RecordingRequest, entry_id: int, queued: Outcome, first_at: float | None
    ) -> Outcome:
        """Where a queued request stands: still queued, settled without delivery, or done."""
        try:
            found = await self._spool.where(entry_id)
        except SpoolError as exc:
            log.exception("spool.read.failed", error=str(exc), error_type=type(exc).__name__)
            return queued  # what the bridge knew; the spool's failure is logged
        if found is not None:
            table, error, reason = found
            if table == "dead":
                return _settled_outcome(reason, error or "")
            max_age = self._extension_max_age
            if (
                request.kind == "extension"
                and max_age is not None
                and first_at is not None
                and self._clock() - first_at >= max_age
            ):
                # Settled here, and told EXPIRED ("press again") only if it is not on its way:
                # a request being sent may still be applied, and a second start adds a leg.
                why = f"by extension and not delivered within {max_age:g}s: not sent"
                try:
                    expired = await self._spool.expire_if_idle(entry_id, why)
                except SpoolError as exc:
                    log.exception(
                        "spool.write.failed", error=str(exc), error_type=type(exc).__name__
                    )
                    return queued
                if expired:
                    if self._on_expired is not None:
                        self._on_expired(entry_id, request, why)
                    return Outcome(Status.EXPIRED, why)
                return Outcome(Status.QUEUED, "being sent now: not confirmed yet", entry_id)
            return Outcome(Status.QUEUED, f"still queued: {error or 'not confirmed yet'}", entry_id)
        _expire(self._settled, self._clock() - self._window)
        settled = self._settled.get(entry_id)
        if settled is None:
            # Purged by an operator, or settled by another process: nothing says it was done.
            return Outcome(Status.FAILED, "no longer queued and never confirmed")
        if settled.fate is Fate.NOT_FOUND:
            return Outcome(Status.FAILED, f"not confirmed since it was queued: {settled.message}")
        return Outcome(ACTIONS[request.action].confirmed, "delivered since it was queued")


def _settled_outcome(reason: str | None, error: str) -> Outcome:
    """What a repeat hears of a request settled without delivery since it was queued."""
    if reason == "unconfirmed":
        return Outcome(Status.UNCONFIRMED, error)
    if reason in ("expired", "cancelled"):
        return Outcome(Status.EXPIRED, error)
    return Outcome(Status.FAILED, f"failed since it was queued: {error}")


class _Seen(Protocol):
    @property
    def at(self) -> float: ...


_K = TypeVar("_K")
_V = TypeVar("_V", bound=_Seen)


def _expire(entries: OrderedDict[_K, _V], before: float) -> None:
    """Drop the entries seen before ``before`` (they are in the order they were seen)."""
    while entries:
        oldest = next(iter(entries.values()))
        if oldest.at >= before:
            return
        entries.popitem(last=False)
