"""Calls remembered for a while by id, oldest first: the facade's calls that made a request by
extension (whose own stop must cancel it) and calls whose own stop has come (their hangup
stop, by uniqueid or linkedid), each kept ``extension_max_age``, past which a request by
extension is never sent anyway.

Why the ended calls: the spool's cancellation settles what a call had queued by extension when
its stop arrives; what it cannot see then is caught here: an attempt on its way then that
failed without reaching NoojeeContact (due again), a sync request written ahead after the stop,
a code pressed after it. In memory only: after a restart the spool's cancellation remains.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class RecentCalls:
    """Call ids noted within the last ``max_age`` seconds (wall clock, as the spool's)."""

    def __init__(self, *, max_age: float, wall_clock: Callable[[], float]) -> None:
        self._max_age = max_age
        self._wall_clock = wall_clock
        self._calls: OrderedDict[str, float] = OrderedDict()  # oldest first

    def add(self, call: str, at: float | None = None) -> None:
        """Note ``call`` now (or at ``at``, a spool entry's creation time)."""
        self._calls.pop(call, None)
        self._calls[call] = self._wall_clock() if at is None else at
        self._prune()

    def discard(self, call: str) -> bool:
        """Forget ``call``; whether it was noted (and still recent)."""
        self._prune()
        return self._calls.pop(call, None) is not None

    def __contains__(self, call: object) -> bool:
        self._prune()
        return call in self._calls

    def _prune(self) -> None:
        calls, oldest = self._calls, self._wall_clock() - self._max_age
        while calls and next(iter(calls.values())) < oldest:
            calls.popitem(last=False)
