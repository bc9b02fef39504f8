"""The hash scheme of NoojeeContact's API ("01.1 Authentication - Hash method").

A ``timeStamp`` from ``POST <base>/Time`` plus ``hash = sha256(key + ":" + timeStamp)``; the
key itself never travels. One (timeStamp, hash) pair is shared by all concurrent requests.
Fetching a new pair is single-flight behind one :class:`asyncio.Lock` (the docs mention a limit
of 5 concurrent authentication attempts); callers that queued behind a failed fetch share its
result instead of hammering ``/Time`` one after another.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Final

from agi_bridge.noojee.classify import body_excerpt, classify_response, clean_line
from agi_bridge.vocabulary import MESSAGE_MAX_CHARS, NoojeeResult, ResultKind

__all__ = ["HASH_FRESH_WINDOW", "HASH_USED_LIFETIME", "HashAuth", "HashPair", "TimeFetch"]

# A fresh pair is valid for 10 s before its first use, then for 1 hour after it. We stop using
# a pair earlier than the server would reject it: 2 s covers the /Time round trip and the trip
# of the request that first uses it, 5 min covers clock-rate differences and long-running
# retries. Expiry is still handled reactively (one refresh and retry on "Expired TimeStamp").
HASH_FRESH_WINDOW: Final = 8.0
HASH_USED_LIFETIME: Final = 55 * 60.0
# An epoch in milliseconds has 13 digits; anything much longer is not a time stamp.
MAX_TIME_BODY_CHARS: Final = 32

# POST <base>/Time: (status, body, None), or (0, b"", the failure) when no answer came.
TimeFetch = Callable[[], Awaitable[tuple[int, bytes, NoojeeResult | None]]]


class HashPair:
    """A (timeStamp, hash) pair from ``/Time`` and when it was fetched and first used."""

    __slots__ = ("fetched_at", "first_used_at", "query")

    def __init__(self, query: str, fetched_at: float) -> None:
        self.query = query  # "&timeStamp=...&hash=..."
        self.fetched_at = fetched_at
        self.first_used_at: float | None = None

    def take(self, now: float) -> bool:
        """Mark the pair used at ``now`` if it is still safely valid; False if it is not."""
        first = self.first_used_at
        if first is None:
            if now - self.fetched_at >= HASH_FRESH_WINDOW:
                return False
            self.first_used_at = now
            return True
        return now - first < HASH_USED_LIFETIME


class HashAuth:
    """The pair every request of one client uses, and its single-flight renewal."""

    def __init__(self, *, key: str, fetch_time: TimeFetch, clock: Callable[[], float]) -> None:
        self._key: Final = key
        self._fetch_time: Final = fetch_time
        self._clock: Final = clock
        self._pair: HashPair | None = None
        self._lock: Final = asyncio.Lock()
        self._attempts = 0  # completed /Time fetches, successful or not
        self._failure: NoojeeResult | None = None  # result of the last fetch if it failed

    async def pair(self) -> HashPair | NoojeeResult:
        """A usable pair, fetching one (single-flight) when needed; or why there is none."""
        pair = self._pair
        if pair is not None and pair.take(self._clock()):
            return pair
        attempts = self._attempts
        async with self._lock:
            if self._attempts != attempts:
                # Somebody fetched while we queued: share their pair, or their failure.
                pair = self._pair
                if pair is not None and pair.take(self._clock()):
                    return pair
                if self._failure is not None:
                    return self._failure
            got = await self._fetch()
            self._attempts += 1
            if isinstance(got, NoojeeResult):
                self._pair, self._failure = None, got
                return got
            self._pair, self._failure = got, None
            got.take(self._clock())
            return got

    def expired(self, pair: HashPair) -> None:
        """The server refused ``pair`` as expired: the next request fetches a new one, unless
        somebody replaced it meanwhile."""
        if self._pair is pair:
            self._pair = None

    async def _fetch(self) -> HashPair | NoojeeResult:
        # Measured before the request: the server's 10 s start somewhere during it.
        fetched_at = self._clock()
        status, body, failure = await self._fetch_time()
        if failure is None and not 200 <= status < 300:
            failure = classify_response(status, body, secret=self._key)
        if failure is None:
            raw = body.strip()  # the docs: a bare long integer; tolerate surrounding whitespace
            text = raw.decode("ascii", "replace") if len(raw) <= MAX_TIME_BODY_CHARS else ""
            if not (text.isascii() and text.isdigit()):
                excerpt = body_excerpt(body, self._key) or "empty body"
                failure = NoojeeResult(
                    ResultKind.API_ERROR,
                    f"Time answered no epoch milliseconds: {excerpt}",
                    None,
                    status,
                )
            else:
                digest = hashlib.sha256(f"{self._key}:{text}".encode()).hexdigest()
                return HashPair(f"&timeStamp={text}&hash={digest}", fetched_at)
        message = clean_line(f"Time: {failure.message}", MESSAGE_MAX_CHARS)
        return NoojeeResult(
            failure.kind, message, failure.code, failure.http_status, failure.tls_verify_failed
        )
