"""The durable spool: every request is on disk before the dialplan hears ``QUEUED`` and stays
there until NoojeeContact has taken it or it is dead-lettered with its last error.

SQLite in WAL mode, owned by one thread. Operations from the event loop are queued to that
thread, which runs everything waiting in ONE transaction and commits once (group commit): under
a hangup burst a single fsync covers hundreds of requests, and the event loop never blocks on
the disk. Entries are claimed with a lease (``next_at`` moved past the time a request can take),
so a request in flight is not sent twice by this process, and after ``kill -9`` it is replayed
once the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeVar, cast

from agi_bridge.noojee import Action, RecordingRequest

T = TypeVar("T")

SPOOL_FILE: Final = "spool.sqlite3"
# How long another process (``agi-bridge spool ...`` next to a running server) waits for the
# write lock. Our transactions last milliseconds.
BUSY_TIMEOUT_MS: Final = 5000
# Below this much free disk the next commits may fail (SQLite needs room for WAL frames and
# the checkpoint); an entry is ~200 bytes, so 1 MiB still holds thousands of stops.
MIN_FREE_BYTES: Final = 1024 * 1024
# Bounds one group commit so a huge burst cannot hold the write lock for long.
MAX_BATCH: Final = 1000

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    agent TEXT,
    tag TEXT,
    call_uniqueid TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS pending_due ON pending (next_at);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    agent TEXT,
    tag TEXT,
    call_uniqueid TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    last_error TEXT NOT NULL
);
"""
_COLUMNS: Final = "id, action, target, agent, tag, call_uniqueid, created, attempts"


class SpoolError(Exception):
    """The spool could not be opened or written; the message says where and why."""


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    id: int
    request: RecordingRequest
    call_uniqueid: str
    created: float
    attempts: int
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class SpoolStats:
    pending: int
    dead: int
    oldest_pending: float | None  # creation time (epoch seconds) of the oldest pending entry


def _entry(row: tuple[object, ...]) -> SpoolEntry:
    id_, action, target, agent, tag, uniqueid, created, attempts, *rest = row
    request = RecordingRequest(
        action=cast(Action, action),
        exten_or_uniqueid=cast(str, target),
        agent=cast("str | None", agent),
        tag=cast("str | None", tag),
    )
    return SpoolEntry(
        id=cast(int, id_),
        request=request,
        call_uniqueid=cast(str, uniqueid),
        created=cast(float, created),
        attempts=cast(int, attempts),
        last_error=cast("str | None", rest[0]) if rest else None,
    )


_Job = tuple[Callable[[sqlite3.Connection], object], Future[object]]


class Spool:
    """Durable queue of NoojeeContact requests. ``open()`` before use, ``close()`` after."""

    def __init__(
        self, directory: Path, *, fsync: bool = True, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = directory / SPOOL_FILE
        self._fsync = fsync
        self._clock = clock
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory and the database, fail loudly if either is not writable."""
        if self._thread is not None:
            raise SpoolError(f"the spool at {self.path} is already open")
        connection: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA journal_mode = WAL")
            # FULL fsyncs the WAL at every commit: a stop survives a power cut, not only a
            # crash. NORMAL survives kill -9 but may lose the last commits on power loss.
            connection.execute(f"PRAGMA synchronous = {'FULL' if self._fsync else 'NORMAL'}")
            connection.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            # Fix: close what was opened (it leaked, a ResourceWarning on Python 3.13+).
            if connection is not None:
                connection.close()
            raise SpoolError(f"cannot open the spool at {self.path}: {exc}") from exc
        self._thread = threading.Thread(
            target=self._run, args=(connection,), name="agi-bridge-spool", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Finish every queued write, then close the database."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _run(self, connection: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            self._run_batch(connection, batch)
        connection.close()

    @staticmethod
    def _run_batch(connection: sqlite3.Connection, batch: list[_Job]) -> None:
        # A caller cancelled while waiting (its session or the worker was cancelled) no longer
        # wants the work; every other future becomes RUNNING here, so it can no longer be
        # cancelled between the commit and set_result.
        batch = [job for job in batch if job[1].set_running_or_notify_cancel()]
        if not batch:
            return
        results: list[tuple[Future[object], object, Exception | None]] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for work, future in batch:
                connection.execute("SAVEPOINT job")
                try:
                    value = work(connection)
                # Fix: any exception, not only sqlite3.Error (e.g. ValueError from a row whose
                # action is not start/stop). Uncaught, it ended this thread: every later call
                # waited forever on a future nobody would complete.
                except Exception as exc:  # noqa: BLE001 (handed to the caller's future)
                    connection.execute("ROLLBACK TO job")
                    results.append((future, None, exc))
                else:
                    results.append((future, value, None))
                connection.execute("RELEASE job")
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            # The commit itself failed (disk full, I/O error): nothing of the batch is durable.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            results = [(future, None, exc) for _, future in batch]
        for future, value, error in results:
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(SpoolError(f"spool {error.__class__.__name__}: {error}"))

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> Future[T]:
        if self._thread is None:
            raise SpoolError("the spool is not open")
        future: Future[object] = Future()
        self._jobs.put((work, future))
        return cast("Future[T]", future)

    async def _acall(self, work: Callable[[sqlite3.Connection], T]) -> T:
        # Shielded: a caller cancelled mid-write (shutdown) must not undo the write; a stop
        # stored for a session that was cut short is still delivered, and a delivery already
        # made is still recorded, so it is not sent again after the restart.
        return await asyncio.shield(asyncio.wrap_future(self._call(work)))

    def _scall(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Synchronous use (the CLI)."""
        return self._call(work).result()

    # --- the delivery path ----------------------------------------------------------------

    async def add(
        self, request: RecordingRequest, *, call_uniqueid: str, lease: float = 0.0
    ) -> int:
        """Store ``request``; returns once it is committed. ``lease``: seconds before the worker
        may pick it up (the time the caller's own attempt may take)."""
        now = self._clock()

        def work(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO pending (action, target, agent, tag, call_uniqueid, created, next_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    request.action,
                    request.exten_or_uniqueid,
                    request.agent,
                    request.tag,
                    call_uniqueid,
                    now,
                    now + lease,
                ),
            )
            return cast(int, cursor.lastrowid)

        return await self._acall(work)

    async def release_leases(self) -> int:
        """Make every pending entry due now. Called once when the bridge starts: no attempt of
        this process is in flight yet, so leases left by a process that was killed are stale,
        and waiting them out would only delay the replay."""
        now = self._clock()
        return await self._acall(
            lambda db: (
                db.execute("UPDATE pending SET next_at = ? WHERE next_at > ?", (now, now)).rowcount
            )
        )

    def delivered(self, entry_id: int) -> Future[None]:
        """Forget a delivered entry. Returns a future: callers need not wait for it (a crash
        before the commit only means one harmless redelivery)."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM pending WHERE id = ?", (entry_id,))

        return self._call(work)

    async def claim_due(self, *, limit: int, lease: float) -> list[SpoolEntry]:
        """Up to ``limit`` entries whose time has come, oldest first, leased for ``lease`` s."""
        now = self._clock()

        def work(db: sqlite3.Connection) -> list[SpoolEntry]:
            rows = db.execute(
                f"SELECT {_COLUMNS}, last_error FROM pending WHERE next_at <= ? "  # noqa: S608
                "ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE pending SET next_at = ? WHERE id = ?", [(now + lease, r[0]) for r in rows]
            )
            return [_entry(row) for row in rows]

        return await self._acall(work)

    async def next_due(self) -> float | None:
        """When the earliest pending entry becomes due (epoch seconds), None when empty."""
        row = await self._acall(
            lambda db: db.execute("SELECT min(next_at) FROM pending").fetchone()
        )
        return cast("float | None", row[0])

    async def failed(self, entry_id: int, error: str, *, retry_at: float) -> None:
        """Count a failed attempt and set when to try again."""
        await self._acall(
            lambda db: db.execute(
                "UPDATE pending SET attempts = attempts + 1, last_error = ?, next_at = ? "
                "WHERE id = ?",
                (error, retry_at, entry_id),
            )
        )

    async def dead_letter(self, entry_id: int, error: str, *, attempted: bool = True) -> None:
        """Move an entry to the dead letters with ``error``; ``attempted`` counts this try."""
        now = self._clock()

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT OR REPLACE INTO dead ({_COLUMNS}, failed_at, last_error) "  # noqa: S608
                f"SELECT {_COLUMNS.replace('attempts', 'attempts + ?')}, ?, ? "
                "FROM pending WHERE id = ?",
                (int(attempted), now, error, entry_id),
            )
            db.execute("DELETE FROM pending WHERE id = ?", (entry_id,))

        await self._acall(work)

    async def stats(self) -> SpoolStats:
        return await self._acall(_stats)

    async def problems(self) -> list[str]:
        """Why the spool could not keep a request now (for /readyz); empty when it can."""
        problems = []
        try:
            await self._acall(lambda db: db.execute("DELETE FROM pending WHERE id = -1"))
        except SpoolError as exc:
            problems.append(f"spool {self.path} is not writable: {exc}")
        try:
            stat = os.statvfs(self.path.parent)
        except OSError as exc:
            problems.append(f"spool directory {self.path.parent}: {exc.strerror}")
        else:
            free = stat.f_bavail * stat.f_frsize
            if free < MIN_FREE_BYTES:
                problems.append(
                    f"spool {self.path} is not writable: {free // 1024} KiB free on its disk"
                )
        return problems

    # --- the operator's view (CLI) --------------------------------------------------------

    def list(self, table: Literal["pending", "dead"]) -> list[SpoolEntry]:
        return self._scall(
            lambda db: [
                _entry(row)
                for row in db.execute(
                    f"SELECT {_COLUMNS}, last_error FROM {table} ORDER BY id"  # noqa: S608
                )
            ]
        )

    def sync_stats(self) -> SpoolStats:
        return self._scall(_stats)

    def retry_dead(self, ids: Iterable[int] | None = None) -> int:
        """Move dead letters (all, or ``ids``) back to pending with a fresh attempt count."""
        now = self._clock()
        selected = None if ids is None else list(ids)

        def work(db: sqlite3.Connection) -> int:
            where, params = _id_filter(selected)
            # ``where`` holds only ``?`` placeholders: no value is formatted into the SQL.
            columns = "action, target, agent, tag, call_uniqueid"
            copy = f"INSERT INTO pending ({columns}, created, next_at, last_error) SELECT {columns}"
            cursor = db.execute(f"{copy}, ?, ?, last_error FROM dead{where}", (now, now, *params))
            db.execute(f"DELETE FROM dead{where}", params)  # noqa: S608
            return cursor.rowcount

        return self._scall(work)

    def purge(self, table: Literal["pending", "dead"], ids: Iterable[int] | None = None) -> int:
        """Delete entries for good (all of ``table``, or ``ids``)."""
        selected = None if ids is None else list(ids)

        def work(db: sqlite3.Connection) -> int:
            where, params = _id_filter(selected)
            return db.execute(f"DELETE FROM {table}{where}", params).rowcount  # noqa: S608

        return self._scall(work)


def _stats(db: sqlite3.Connection) -> SpoolStats:
    pending, oldest = db.execute("SELECT count(*), min(created) FROM pending").fetchone()
    (dead,) = db.execute("SELECT count(*) FROM dead").fetchone()
    return SpoolStats(pending=pending, dead=dead, oldest_pending=oldest)


def _id_filter(ids: list[int] | None) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    return f" WHERE id IN ({', '.join('?' * len(ids))})", tuple(ids)
