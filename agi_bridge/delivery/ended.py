"""Calls remembered for a while by id: the facade's calls that made a request by
extension (whose own stop must cancel it) and calls whose own stop has come (their hangup
stop, by uniqueid or linkedid), each kept ``extension_max_age``, past which a request by
extension is never sent anyway.

Why the ended calls: the spool's cancellation settles what a call had queued by extension when
its stop arrives; what it cannot see then is caught here: an attempt on its way then that
failed without reaching NoojeeContact (due again), a sync request written ahead after the stop,
a code pressed after it. In memory only: after a restart the spool's cancellation remains.
"""

from __future__ import annotations

from collections.abc import Callable


class RecentCalls:
    """Call ids noted within the last ``max_age`` seconds (wall clock, as the spool's).

    Every stop notes its call, so this is written once per session and read rarely. Two
    generations of plain dicts, the older dropped whole once it has aged out: a note costs
    one dict entry, and nothing is pruned one call at a time (as an ordered dict pruned from
    its front was, on every stop). A call is forgotten between ``max_age`` and twice that
    after it was noted; it is only ever reported within ``max_age``.
    """

    def __init__(self, *, max_age: float, wall_clock: Callable[[], float]) -> None:
        self._max_age = max_age
        self._wall_clock = wall_clock
        self._current: dict[str, float] = {}
        self._previous: dict[str, float] = {}  # noted before _since
        self._since = wall_clock()

    def add(self, call: str, at: float | None = None) -> None:
        """Note ``call`` now (or at ``at``, a spool entry's creation time)."""
        now = self._age()
        self._previous.pop(call, None)
        self._current[call] = now if at is None else at

    def discard(self, call: str) -> bool:
        """Forget ``call``; whether it was noted (and still recent)."""
        oldest = self._age() - self._max_age
        at = self._current.pop(call, None)
        older = self._previous.pop(call, None)
        noted = older if at is None else at
        return noted is not None and noted >= oldest

    def __contains__(self, call: object) -> bool:
        if not isinstance(call, str):
            return False
        oldest = self._age() - self._max_age
        noted = self._current.get(call)
        if noted is None:
            noted = self._previous.get(call)
        return noted is not None and noted >= oldest

    def held(self) -> int:
        """Calls held, some perhaps aged out already (dropped with their generation). Not
        __len__: an empty one would be falsy, and ``ended or RecentCalls(...)`` is natural."""
        return len(self._current) + len(self._previous)

    def _age(self) -> float:
        """The time now, once the older generation is dropped if all of it has aged out."""
        now = self._wall_clock()
        if now - self._since >= self._max_age:
            # Everything in _current was noted after _since (or given an older time): kept one
            # more round, then dropped whole.
            self._previous, self._current = self._current, {}
            self._since = now
        return now
