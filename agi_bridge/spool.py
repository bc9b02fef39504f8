"""The durable spool: every request is on disk before the dialplan hears ``QUEUED`` and stays
there until NoojeeContact has taken it or it is dead-lettered with its last error.

SQLite in WAL mode, owned by one thread. Operations from the event loop are queued to that
thread, which runs everything waiting in ONE transaction and commits once (group commit): under
a hangup burst a single fsync covers hundreds of requests, and the event loop never blocks on
the disk. Entries are claimed with a lease (``next_at`` moved past the time a request can take),
so a request in flight is not sent twice by this process. A stop is at least once: after
``kill -9`` it is replayed. A start is at most once: its entry is marked ``attempted`` in the
same commit that claims it (or writes it ahead of its session's attempt), before a byte is
sent, and a start found so marked at the next start-up may have reached NoojeeContact: it is
settled as "unconfirmed", never resent.

The schema has a version (``PRAGMA user_version``, :data:`SCHEMA_VERSION`); opening an older
spool migrates it in one transaction, and a newer one is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

from agi_bridge.logs import get_logger
from agi_bridge.vocabulary import Action, RecordingRequest, TargetKind

T = TypeVar("T")

log = get_logger("agi_bridge.spool")

SPOOL_FILE: Final = "spool.sqlite3"
# Room kept on the spool's disk for opening the spool when the disk has filled up: SQLite
# must size the WAL's shared-memory file (32 KiB) and replay the WAL, and a bridge that cannot
# open its spool cannot start or deliver what is queued. Released only then; 512 KiB also
# leaves the first few dozen commits room to land.
RESERVE_FILE: Final = "spool.reserve"
RESERVE_BYTES: Final = 512 * 1024
# How long another process (``agi-bridge spool ...`` next to a running server) waits for the
# write lock. Our transactions last milliseconds.
BUSY_TIMEOUT_MS: Final = 5000
# Below this much free disk the next commits may fail (SQLite needs room for WAL frames and
# the checkpoint); an entry is ~200 bytes, so 1 MiB still holds thousands of stops.
MIN_FREE_BYTES: Final = 1024 * 1024
# A batch commits in milliseconds, a busy disk's fsync takes well under a second: one still
# running after this is held by the disk (frozen by fsfreeze or a snapshot, or dying).
STALLED_AFTER: Final = 2.0
# Bounds one group commit so a huge burst cannot hold the write lock for long.
MAX_BATCH: Final = 1000

# 0: the release before versions (no target kind, no attempted mark, no settle reason).
# 1: pending.kind and pending.attempted, dead.kind and dead.reason.
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = (
    """CREATE TABLE pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    agent TEXT,
    tag TEXT,
    call_uniqueid TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    kind TEXT NOT NULL DEFAULT 'extension',
    -- 1: a start that may be on its way to NoojeeContact (claimed, or written ahead of its
    -- session's attempt); never claimed again, and settled unconfirmed if found at start-up.
    attempted INTEGER NOT NULL DEFAULT 0
)""",
    "CREATE INDEX pending_due ON pending (next_at)",
    # One row, rewritten by the readiness probe: a real write, not a no-op that would succeed
    # on a filesystem that no longer takes any.
    "CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL)",
    """CREATE TABLE dead (
    id INTEGER PRIMARY KEY,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    agent TEXT,
    tag TEXT,
    call_uniqueid TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    last_error TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'extension',
    reason TEXT NOT NULL DEFAULT 'failed'
)""",
)
# From version 0. The old spool did not record target kinds: inferred from the target's shape
# (a uniqueid or linkedid looks like "1733100000.42"; anything else may be an extension, the
# safe reading). A start it had claimed or written ahead (next_at moved past its creation, or
# an attempt counted) may have been sent: marked attempted, so it is never resent.
_MIGRATE_FROM_0: Final = (
    "ALTER TABLE pending ADD COLUMN kind TEXT NOT NULL DEFAULT 'extension'",
    "ALTER TABLE pending ADD COLUMN attempted INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE dead ADD COLUMN kind TEXT NOT NULL DEFAULT 'extension'",
    "ALTER TABLE dead ADD COLUMN reason TEXT NOT NULL DEFAULT 'failed'",
    "UPDATE pending SET attempted = 1 "
    "WHERE action = 'start' AND (attempts > 0 OR next_at > created)",
    # The previous release resent starts after timeouts before giving up on them: any of its
    # dead starts may have been applied, so `spool retry` treats them as unconfirmed.
    "UPDATE dead SET reason = 'unconfirmed' WHERE action = 'start'",
)
# An Asterisk uniqueid or linkedid: epoch seconds, a dot, a counter ("1733100000.42"), after
# the system name and a dash when asterisk.conf sets systemname ("pbx1-1733100000.42").
_UNIQUEID_RE: Final = re.compile(r"(?:.+-)?[0-9]+\.[0-9]+")
_COLUMNS: Final = "id, action, target, agent, tag, call_uniqueid, created, attempts, kind"

# Why an entry is in the dead letters.
# failed: NoojeeContact refused it, or it used up its attempts or its age;
# unconfirmed: a start that may have reached NoojeeContact without a confirmation;
# expired: a request by extension not delivered within its validity;
# cancelled: a request by extension superseded by its call's own stop (the call ended).
SettleReason = Literal["failed", "unconfirmed", "expired", "cancelled"]


# What the operator does about a damaged spool (the README's "Salvaging a damaged spool").
SALVAGE: Final = (
    "stop the bridge, move the file aside and copy what SQLite can still read into a new one "
    "with `sqlite3 spool.damaged .dump`, as the README says (salvaging a damaged spool)"
)
# SQLite's answers that mean the file itself is damaged.
_DAMAGE_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


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
    reason: SettleReason | None = None  # dead letters only


@dataclass(frozen=True, slots=True)
class SpoolStats:
    pending: int
    dead: int  # dead letters that need an operator: refused for good, or unconfirmed starts
    oldest_pending: float | None  # creation time (epoch seconds) of the oldest pending entry


def _entry(row: tuple[object, ...]) -> SpoolEntry:
    """An entry from ``_COLUMNS``, then optionally last_error and the settle reason."""
    id_, action, target, agent, tag, uniqueid, created, attempts, kind, *rest = row
    request = RecordingRequest(
        action=cast(Action, action),
        target=cast(str, target),
        agent=cast("str | None", agent),
        tag=cast("str | None", tag),
        kind=cast(TargetKind, kind),
    )
    return SpoolEntry(
        id=cast(int, id_),
        request=request,
        call_uniqueid=cast(str, uniqueid),
        created=cast(float, created),
        attempts=cast(int, attempts),
        last_error=cast("str | None", rest[0]) if rest else None,
        reason=cast("SettleReason | None", rest[1]) if len(rest) > 1 else None,
    )


def _upgrade(db: sqlite3.Connection, path: Path, *, migrate: bool) -> None:
    """Create the tables, or migrate an older spool to :data:`SCHEMA_VERSION` (unless not
    ``migrate``: then an older spool is an error), in one transaction (another process opening
    the spool at the same time waits, then sees it done)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        _migrate(db, path, migrate=migrate)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _migrate(db: sqlite3.Connection, path: Path, *, migrate: bool) -> None:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise SpoolError(
            f"the spool at {path} has schema version {version}, written by a newer "
            f"agi-bridge (this one reads up to {SCHEMA_VERSION}): run the newer release, "
            "or move the spool aside"
        )
    if version == SCHEMA_VERSION:
        return
    legacy = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'pending'").fetchone()
    if legacy and not migrate:
        raise SpoolError(
            f"the spool at {path} was written by the previous release: start this one's "
            "bridge once (restart the service): it migrates the spool under its data_dir "
            "lock, while the previous release may still be writing it now"
        )
    for statement in _MIGRATE_FROM_0 if legacy else _SCHEMA:
        db.execute(statement)
    if legacy:
        for table in ("pending", "dead"):
            rows = db.execute(f"SELECT id, target FROM {table}").fetchall()  # noqa: S608
            db.executemany(
                f"UPDATE {table} SET kind = ? WHERE id = ?",  # noqa: S608
                [(_legacy_kind(target), id_) for id_, target in rows],
            )
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _legacy_kind(target: str) -> TargetKind:
    """An entry's kind when the spool did not record it: a call only if shaped like one."""
    return "uniqueid" if _UNIQUEID_RE.fullmatch(target) else "extension"


_Outcome = tuple[object, Exception | None]


@dataclass(slots=True)
class _Job:
    """One unit of work for the spool thread and where its outcome goes: an asyncio future of
    ``loop`` (the bridge) or a concurrent future (the CLI, ``loop`` None)."""

    work: Callable[[sqlite3.Connection], object]
    future: asyncio.Future[object] | Future[object]
    loop: asyncio.AbstractEventLoop | None
    what: str | None = None  # the request it stores, named if it never reaches the disk


def _resolve(outcomes: list[tuple[asyncio.Future[object], _Outcome]]) -> None:
    """Runs on the event loop: hand a committed batch's outcomes to their waiters."""
    for future, (value, error) in outcomes:
        if future.done():
            continue  # the waiter was cancelled; the write itself stands (see _acall)
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


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
        # Why the file the spool thread writes is no longer the one at ``path`` (deleted or
        # replaced under us), once it noticed: from then on every operation fails with it.
        self.lost: str | None = None
        # While the disk takes no write (full): entries claimed without writing their lease,
        # held here until then (id -> epoch seconds), and entries settled (delivered, or a
        # stop NoojeeContact no longer knows) whose deletion is still to be written.
        self._held: dict[int, float] = {}
        # What SQLite found wrong with the file (a corrupt page), at open or since.
        self.damaged: str | None = None
        # The batch the spool thread is running, and since when (monotonic): what a frozen
        # disk holds up.
        self._in_hand: list[_Job] = []
        self._busy_since: float | None = None
        self._settled: set[int] = set()

    # --- lifecycle ------------------------------------------------------------------------

    def open(self, *, create: bool = True) -> None:
        """Create the directory and the database, fail loudly if either is not writable.
        ``create=False`` (the operator's commands): the spool must exist already, so a mistyped
        data directory is an error instead of an empty spool that shows nothing."""
        if self._thread is not None:
            raise SpoolError(f"the spool at {self.path} is already open")
        if not create and not self.path.is_file():
            raise SpoolError(
                f"no spool at {self.path}: check data_dir (the bridge creates the spool when it "
                "first starts)"
            )
        try:
            connection = self._connect(migrate=create)
        except SpoolError as exc:
            if not (create and _no_room(exc) and self._release_reserve()):
                raise
            connection = self._connect(migrate=create)
        if create:
            self._keep_reserve()
        self._thread = threading.Thread(
            target=self._run, args=(connection,), name="agi-bridge-spool", daemon=True
        )
        self._thread.start()

    def _connect(self, *, migrate: bool) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA journal_mode = WAL")
            # FULL fsyncs the WAL at every commit: a stop survives a power cut, not only a
            # crash. NORMAL survives kill -9 but may lose the last commits on power loss.
            connection.execute(f"PRAGMA synchronous = {'FULL' if self._fsync else 'NORMAL'}")
            # Only the bridge migrates, under its data_dir lock: an operator's command run while
            # the previous release (no lock, no "attempted" marks) still serves would let it
            # go on writing a spool whose starts the new one then trusts.
            _upgrade(connection, self.path, migrate=migrate)
        except (OSError, sqlite3.Error, SpoolError) as exc:
            # Close what was opened: a connection left to the garbage collector is a leaked
            # file descriptor (a ResourceWarning on Python 3.13+).
            if connection is not None:
                connection.close()
            if isinstance(exc, SpoolError):
                raise
            raise SpoolError(f"cannot open the spool at {self.path}: {exc}") from exc
        return connection

    def _keep_reserve(self) -> None:
        """Set RESERVE_BYTES aside on the spool's disk, if there is room (else next time)."""
        reserve = self.path.with_name(RESERVE_FILE)
        if reserve.is_file():
            return
        try:
            with reserve.open("wb") as handle:
                handle.write(bytes(RESERVE_BYTES))
        except OSError:
            reserve.unlink(missing_ok=True)  # a partial reserve only takes room

    def _release_reserve(self) -> bool:
        """Give the reserve back to the disk; whether there was one."""
        reserve = self.path.with_name(RESERVE_FILE)
        if not reserve.is_file():
            return False
        reserve.unlink()
        log.warning(
            "spool.reserve.released",
            path=str(reserve),
            help="the spool's disk is full: free space on it (the reserve is set aside again "
            "at the next start)",
        )
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Finish every queued write, then close the database; give up waiting for that
        after ``timeout`` seconds (the thread goes on, and dies with the process), naming at
        ERROR every request not known to be on disk then (a frozen or dead disk). False when
        it gave up: the thread may still write once the disk is back."""
        closed = True
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._report_unwritten()
                closed = False
            self._thread = None
        return closed

    def _report_unwritten(self) -> None:
        unwritten = [job.what for job in self._in_hand if job.what is not None]
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._jobs.get_nowait()
                if job is not None and job.what is not None:
                    unwritten.append(job.what)
        stalled = self.stalled()
        log.error(
            "spool.unwritten",
            path=str(self.path),
            stalled_for=None if stalled is None else round(stalled, 1),
            count=len(unwritten),
            requests=unwritten,
            help="the disk took no write: these may not be in the spool; once it is back, "
            "`agi-bridge spool list` shows what is, `agi-bridge send` sends what is not. The "
            "process itself ends only then: the kernel holds the thread that writes",
        )

    def stalled(self) -> float | None:
        """Seconds the batch in hand has been running, if that is longer than SQLite ever
        takes on a working disk (a frozen or dying one): None otherwise."""
        since = self._busy_since
        if since is None:
            return None
        running = time.monotonic() - since
        return running if running > STALLED_AFTER else None

    def _run(self, connection: sqlite3.Connection) -> None:
        opened = _identity(self.path)
        self._damage(_damage(connection))
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
            self._in_hand, self._busy_since = batch, time.monotonic()
            self._run_batch(connection, batch, opened)
            self._in_hand, self._busy_since = [], None
        connection.close()

    def _check_file(self, opened: tuple[int, int] | None) -> SpoolError | None:
        """The spool file deleted or replaced under the bridge: writes would go to a file
        nobody will read again, so every operation fails from then on. One stat per batch
        (microseconds); the worker's idle poll makes it one at least every second."""
        if self.lost is None and _identity(self.path) != opened:
            self.lost = (
                f"the spool file {self.path} was deleted or replaced while the bridge ran: "
                "nothing more is queued into it. Restart the bridge (it starts a new spool); "
                "what was pending in the old file went with it"
            )
            log.error("spool.file.lost", path=str(self.path), problem=self.lost)
        return None if self.lost is None else SpoolError(self.lost)

    def _damage(self, problem: str | None) -> None:
        """Say once (ERROR, then /readyz) that SQLite found the file damaged."""
        if problem is not None and self.damaged is None:
            self.damaged = problem
            log.error("spool.file.damaged", path=str(self.path), problem=problem, help=SALVAGE)

    def _run_batch(
        self, connection: sqlite3.Connection, batch: list[_Job], opened: tuple[int, int] | None
    ) -> None:
        lost = self._check_file(opened)
        outcomes = (
            Spool._execute(connection, batch) if lost is None else [(None, lost)] * len(batch)
        )
        for _, error in outcomes:
            if isinstance(error, sqlite3.Error) and error.sqlite_errorcode in _DAMAGE_CODES:
                self._damage(str(error))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[object], _Outcome]]]
        by_loop = {}
        for job, (value, error) in zip(batch, outcomes, strict=True):
            if error is not None and not isinstance(error, SpoolError):
                cause = error
                error = SpoolError(f"spool {error.__class__.__name__}: {error}")
                error.__cause__ = cause  # tells a full disk (_full) from the rest
            if job.loop is None:
                future = cast("Future[object]", job.future)
                if future.set_running_or_notify_cancel():
                    if error is None:
                        future.set_result(value)
                    else:
                        future.set_exception(error)
            else:
                by_loop.setdefault(job.loop, []).append(
                    (cast("asyncio.Future[object]", job.future), (value, error))
                )
        # One wake-up of the event loop per batch, not one per job: under a burst that is the
        # difference between one self-pipe write and hundreds.
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, items)

    @staticmethod
    def _execute(connection: sqlite3.Connection, batch: list[_Job]) -> list[_Outcome]:
        """Run the batch in one transaction, one commit. A job that fails is retried alone
        after the others, so one bad job never takes the rest of its batch down."""
        outcomes: list[_Outcome] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                outcomes = [(job.work(connection), None) for job in batch]
            # Any exception, not only sqlite3.Error (e.g. ValueError from a row whose action
            # is not start/stop): uncaught, it would end this thread and every later call
            # would wait forever.
            except Exception:  # noqa: BLE001 (the slow path below tells each job's caller)
                connection.execute("ROLLBACK")
                return Spool._execute_one_by_one(connection, batch)
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            # The commit itself failed (disk full, I/O error): nothing of the batch is durable.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            return [(None, exc)] * len(batch)
        return outcomes

    @staticmethod
    def _execute_one_by_one(connection: sqlite3.Connection, batch: list[_Job]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        for job in batch:
            try:
                connection.execute("BEGIN IMMEDIATE")
                value = job.work(connection)
                connection.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001 (handed to the caller's future)
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
                outcomes.append((None, exc))
            else:
                outcomes.append((value, None))
        return outcomes

    def _submit(self, job: _Job) -> None:
        if self._thread is None:
            raise SpoolError("the spool is not open")
        self._jobs.put(job)

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> Future[T]:
        future: Future[object] = Future()
        self._submit(_Job(work, future, None))
        return cast("Future[T]", future)

    def _acall(
        self, work: Callable[[sqlite3.Connection], T], what: str | None = None
    ) -> asyncio.Future[T]:
        """Queue ``work`` (storing the request ``what``, if any); the returned future
        completes once it is committed. Cancelling the waiter does not undo the write: a stop
        stored for a session cut short by shutdown is still delivered, and a delivery made is
        still recorded (not sent again)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        stalled = self.stalled()
        if what is not None and stalled is not None:
            # Not queued behind a write the disk holds: the caller hears FAILED now, not in 5 s.
            future.set_exception(SpoolError(f"the disk took no write for {stalled:.0f} s"))
        else:
            self._submit(_Job(work, future, loop, what))
        return cast("asyncio.Future[T]", future)

    def _scall(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Synchronous use (the CLI)."""
        return self._call(work).result()

    # --- the delivery path ----------------------------------------------------------------

    def add(
        self,
        request: RecordingRequest,
        *,
        call_uniqueid: str,
        lease: float = 0.0,
        attempted: bool = False,
    ) -> asyncio.Future[int]:
        """Store ``request``; the future completes once it is committed. ``lease``: seconds
        before the worker may pick it up (the time the caller's own attempt may take).
        ``attempted``: a start whose attempt is already under way (never claimed again)."""
        now = self._clock()

        def work(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO pending (action, target, agent, tag, call_uniqueid, created, next_at,"
                " kind, attempted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request.action,
                    request.target,
                    request.agent,
                    request.tag,
                    call_uniqueid,
                    now,
                    now + lease,
                    request.kind,
                    int(attempted),
                ),
            )
            return cast(int, cursor.lastrowid)

        what = f"{request.action} {request.target} agent={request.agent}"
        return self._acall(work, f"{what} call={call_uniqueid}")

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

    async def settle_interrupted(self, error: str) -> list[SpoolEntry]:
        """Settle as unconfirmed every start marked attempted, and return them. Called once
        when the bridge starts, before anything is sent: such a start was on its way when the
        last process ended (killed, or stopped before its answer came) and may have reached
        NoojeeContact, so it must not be sent again."""

        def work(db: sqlite3.Connection) -> list[SpoolEntry]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM pending WHERE attempted = 1 ORDER BY id"  # noqa: S608
            ).fetchall()
            for row in rows:
                _move_to_dead(db, cast(int, row[0]), error, "unconfirmed", 0, self._clock())
            return [_entry(row) for row in rows]

        return await self._acall(work)

    async def by_extension(self) -> list[SpoolEntry]:
        """The pending requests by extension, oldest first."""
        return await self._acall(
            lambda db: [
                _entry(row)
                for row in db.execute(
                    f"SELECT {_COLUMNS} FROM pending WHERE kind = 'extension' ORDER BY id"  # noqa: S608
                )
            ]
        )

    def cancel_by_extension(self, call_uniqueid: str, error: str) -> asyncio.Future[list[int]]:
        """Settle as cancelled what is still queued by extension for call ``call_uniqueid``
        and not on its way (a start being sent is settled by its attempt); return their ids."""

        def work(db: sqlite3.Connection) -> list[int]:
            ids = [
                cast(int, row[0])
                for row in db.execute(
                    "SELECT id FROM pending WHERE call_uniqueid = ? AND kind = 'extension' "
                    "AND attempted = 0 ORDER BY id",
                    (call_uniqueid,),
                )
            ]
            for entry_id in ids:
                _move_to_dead(db, entry_id, error, "cancelled", 0, self._clock())
            return ids

        return self._acall(work)

    def delivered(self, entry_id: int) -> asyncio.Future[None]:
        """Forget a delivered entry. Callers need not wait for the future: a crash before the
        commit only means one harmless redelivery. On a disk that takes no write the entry is
        forgotten in memory (never claimed again by this process) and deleted once it can."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM pending WHERE id = ?", (entry_id,))
            # Cancelled while its attempt was on its way (cancel_by_extension): it was delivered
            # after all, and a repeat must hear that, not "cancelled".
            db.execute("DELETE FROM dead WHERE id = ? AND reason = 'cancelled'", (entry_id,))

        return self._unless_full(self._acall(work), entry_id, settled=True)

    def _unless_full(
        self, write: asyncio.Future[Any], entry_id: int, *, settled: bool
    ) -> asyncio.Future[None]:
        """``write``, except that its failure (a full disk) is not the caller's: what it would
        have recorded is retried later (a delivered entry is deleted by a later claim; a
        failed attempt is simply tried again once its lease ends)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle(write: asyncio.Future[Any]) -> None:
            error = write.exception()
            if error is not None and _full(error):
                log.warning("spool.write.deferred", id=entry_id, error=str(error))
                if settled:
                    self._settled.add(entry_id)
                error = None
            if done.done():
                return  # the waiter was cancelled
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        write.add_done_callback(settle)
        return done

    async def claim_due(self, *, limit: int, lease: float) -> list[SpoolEntry]:
        """Up to ``limit`` entries whose time has come, oldest first, leased for ``lease`` s.

        On a disk that takes no write (full), the leases are held in memory instead and only
        stops are claimed: a stop sent twice is harmless, a start is not (it waits)."""
        now = self._clock()
        settled = tuple(self._settled)
        if settled:
            with contextlib.suppress(SpoolError):
                await self._acall(
                    lambda db: db.executemany(
                        "DELETE FROM pending WHERE id = ?", [(i,) for i in settled]
                    )
                )
                self._settled.difference_update(settled)
        try:
            entries = await self._claim_written(now, limit, lease)
        except SpoolError as exc:
            if not _full(exc):
                raise
            entries = await self._claim_held(now, limit, lease)
        return [entry for entry in entries if entry.id not in self._settled]

    async def _claim_held(self, now: float, limit: int, lease: float) -> list[SpoolEntry]:
        """Due stops, leased in memory: claiming writes nothing."""
        self._held = {i: until for i, until in self._held.items() if until > now}
        skip = self._held.keys() | self._settled
        rows = await self._acall(
            lambda db: db.execute(
                f"SELECT {_COLUMNS}, last_error FROM pending "  # noqa: S608
                "WHERE next_at <= ? AND action = 'stop' AND attempted = 0 ORDER BY id LIMIT ?",
                (now, limit + len(skip)),
            ).fetchall()
        )
        entries = [_entry(row) for row in rows if row[0] not in skip][:limit]
        for entry in entries:
            self._held[entry.id] = now + lease
        return entries

    async def _claim_written(self, now: float, limit: int, lease: float) -> list[SpoolEntry]:

        def work(db: sqlite3.Connection) -> list[SpoolEntry]:
            rows = db.execute(
                f"SELECT {_COLUMNS}, last_error FROM pending "  # noqa: S608
                "WHERE next_at <= ? AND attempted = 0 ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
            # A start is marked attempted in this very commit, before it is sent (at most once).
            db.executemany(
                "UPDATE pending SET next_at = ?, attempted = (action = 'start') WHERE id = ?",
                [(now + lease, r[0]) for r in rows],
            )
            return [_entry(row) for row in rows]

        return await self._acall(work)

    async def next_due(self) -> float | None:
        """When the earliest pending entry becomes due (epoch seconds), None when empty."""
        row = await self._acall(
            lambda db: db.execute("SELECT min(next_at) FROM pending WHERE attempted = 0").fetchone()
        )
        return cast("float | None", row[0])

    async def where(
        self, entry_id: int
    ) -> tuple[Literal["pending", "dead"], str | None, SettleReason | None] | None:
        """Which table holds entry ``entry_id``, its last error and (dead letters) why it was
        settled; None when neither does (delivered, or purged by the operator)."""

        def work(
            db: sqlite3.Connection,
        ) -> tuple[Literal["pending", "dead"], str | None, SettleReason | None] | None:
            row = db.execute("SELECT last_error FROM pending WHERE id = ?", (entry_id,)).fetchone()
            if row is not None:
                return "pending", cast("str | None", row[0]), None
            row = db.execute(
                "SELECT last_error, reason FROM dead WHERE id = ?", (entry_id,)
            ).fetchone()
            if row is not None:
                return "dead", cast(str, row[0]), cast(SettleReason, row[1])
            return None

        return await self._acall(work)

    def failed(self, entry_id: int, error: str, *, retry_at: float) -> asyncio.Future[None]:
        """Count a failed attempt and set when to try again (for a start: one that certainly
        never reached NoojeeContact, so it may be sent again). On a full disk: uncounted,
        tried again when its lease ends (a start stays marked attempted: never resent)."""
        write = self._acall(
            lambda db: db.execute(
                "UPDATE pending SET attempts = attempts + 1, last_error = ?, next_at = ?, "
                "attempted = 0 WHERE id = ?",
                (error, retry_at, entry_id),
            )
        )
        return self._unless_full(write, entry_id, settled=False)

    def expire_if_idle(self, entry_id: int, error: str) -> asyncio.Future[bool]:
        """Settle pending entry ``entry_id`` as expired unless it is on its way (leased to an
        attempt, or a start marked attempted): True when it did. In one job, so that the worker
        cannot claim it between the look and the move."""
        now = self._clock()
        on_its_way = self._held.get(entry_id, 0.0) > now or entry_id in self._settled
        if on_its_way:  # a full disk's claims and deliveries are held in memory
            settled: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            settled.set_result(False)
            return settled

        def work(db: sqlite3.Connection) -> bool:
            idle = db.execute(
                "SELECT 1 FROM pending WHERE id = ? AND attempted = 0 AND next_at <= ?",
                (entry_id, now),
            ).fetchone()
            if idle is not None:
                _move_to_dead(db, entry_id, error, "expired", 0, now)
            return idle is not None

        return self._acall(work)

    def dead_letter(
        self,
        entry_id: int,
        error: str,
        *,
        attempted: bool = True,
        reason: SettleReason = "failed",
    ) -> asyncio.Future[None]:
        """Move an entry to the dead letters with ``error`` and ``reason``; ``attempted``
        counts this try."""
        now = self._clock()
        return self._acall(
            lambda db: _move_to_dead(db, entry_id, error, reason, int(attempted), now)
        )

    async def stats(self) -> SpoolStats:
        return await self._acall(_stats)

    async def problems(self) -> list[str]:
        """Why the spool could not keep a request now (for /readyz); empty when it can."""
        problems = []
        if self.damaged is not None:
            problems.append(f"spool {self.path} is damaged ({self.damaged}): {SALVAGE}")
        stalled = self.stalled()
        if stalled is not None:
            # No probe write: it would wait behind the stuck one.
            return [
                *problems,
                f"spool {self.path}: the disk has completed no write for {stalled:.0f} s "
                "(frozen, or failing)",
            ]
        try:
            now = self._clock()
            await self._acall(
                lambda db: db.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (now,))
            )
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

    @property
    def admin(self) -> SpoolAdmin:
        """The operator's blocking face of this open spool (the CLI, tests)."""
        return SpoolAdmin(self)


class SpoolAdmin:
    """What an operator does to a spool, one blocking call each (``agi-bridge spool``): the
    delivery path's calls are futures and coroutines, these wait for their commit."""

    def __init__(self, spool: Spool) -> None:
        self._call = spool._scall
        self._clock = spool._clock

    def list(self, table: Literal["pending", "dead"]) -> list[SpoolEntry]:
        reason = "reason" if table == "dead" else "NULL"
        return self._call(
            lambda db: [
                _entry(row)
                for row in db.execute(
                    f"SELECT {_COLUMNS}, last_error, {reason} FROM {table} ORDER BY id"  # noqa: S608
                )
            ]
        )

    def stats(self) -> SpoolStats:
        return self._call(_stats)

    def retry_dead(
        self, ids: Iterable[int] | None = None, *, force: bool = False
    ) -> tuple[int, ...]:
        """Move dead letters (all, or ``ids``) back to pending with a fresh attempt count and
        a fresh age, and return their ids. They keep their ids, so a following ``purge`` by id
        finds them. Without ``force``, an unconfirmed start (resending it may add a recording
        leg) or any request by extension (whatever made it a dead letter, it would act on
        whatever call the extension is on now) is refused: :class:`SpoolError` naming them and
        why."""
        now = self._clock()
        selected = None if ids is None else list(ids)

        def work(db: sqlite3.Connection) -> tuple[int, ...]:
            moved = _existing(db, "dead", selected)
            where, params = _id_filter(selected)
            if not force:
                risky = db.execute(
                    f"SELECT id, reason FROM dead{where}{' AND' if where else ' WHERE'} "  # noqa: S608
                    "(reason = 'unconfirmed' OR kind = 'extension') ORDER BY id",
                    params,
                ).fetchall()
                if risky:
                    raise SpoolError(_refusal(risky))
            # ``where`` holds only ``?`` placeholders: no value is formatted into the SQL.
            # The id is copied too: pending's AUTOINCREMENT never hands out an id twice, so
            # the one a dead letter took from pending cannot be in use there.
            columns = "id, action, target, agent, tag, call_uniqueid, kind"
            copy = f"INSERT INTO pending ({columns}, created, next_at, last_error) SELECT {columns}"
            db.execute(f"{copy}, ?, ?, last_error FROM dead{where}", (now, now, *params))
            db.execute(f"DELETE FROM dead{where}", params)  # noqa: S608
            return moved

        return self._call(work)

    def purge(self, table: Literal["pending", "dead"], ids: Iterable[int] | None = None) -> int:
        """Delete entries for good (all of ``table``, or ``ids``)."""
        selected = None if ids is None else list(ids)

        def work(db: sqlite3.Connection) -> int:
            _existing(db, table, selected)
            where, params = _id_filter(selected)
            return db.execute(f"DELETE FROM {table}{where}", params).rowcount  # noqa: S608

        return self._call(work)


def damage(path: Path) -> str | None:
    """What SQLite's quick check finds wrong with the spool at ``path`` (read only), None when
    nothing (or when there is no spool there)."""
    if not path.is_file():
        return None
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        return _damage(connection)
    finally:
        connection.close()


def _damage(connection: sqlite3.Connection) -> str | None:
    """SQLite's quick check (every page and row, no index contents): its first finding."""
    try:
        rows = connection.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as exc:
        return str(exc)
    lines = [line for row in rows for line in str(row[0]).splitlines()]
    if lines == ["ok"]:
        return None
    findings = [line for line in lines if not line.startswith("***")]
    more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
    return f"{findings[0] if findings else lines[0]}{more}"


def _no_room(error: BaseException) -> bool:
    """Opening failed for want of room on the disk: what :func:`_full` says, or no room for
    the WAL's index (SQLite) or for the file itself (the OS)."""
    cause = error.__cause__
    if isinstance(cause, OSError):
        return cause.errno == errno.ENOSPC
    return _full(error) or (
        isinstance(cause, sqlite3.Error) and cause.sqlite_errorcode == sqlite3.SQLITE_IOERR_SHMSIZE
    )


def _full(error: BaseException) -> bool:
    """The disk took no write for want of room (SQLITE_FULL), and nothing worse."""
    cause = error.__cause__
    return isinstance(cause, sqlite3.Error) and cause.sqlite_errorcode == sqlite3.SQLITE_FULL


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode), None when there is none."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _move_to_dead(
    db: sqlite3.Connection,
    entry_id: int,
    error: str,
    reason: SettleReason,
    attempted: int,
    now: float,
) -> None:
    db.execute(
        f"INSERT OR REPLACE INTO dead ({_COLUMNS}, failed_at, last_error, reason) "  # noqa: S608
        f"SELECT {_COLUMNS.replace('attempts', 'attempts + ?')}, ?, ?, ? "
        "FROM pending WHERE id = ?",
        (attempted, now, error, reason, entry_id),
    )
    db.execute("DELETE FROM pending WHERE id = ?", (entry_id,))


_WHY_NOT_RETRIED: Final[dict[str, str]] = {
    "unconfirmed": "unconfirmed start (it may have reached NoojeeContact: sent again, it may "
    "add a second recording leg)",
    "expired": "expired request by extension (sent now, it acts on whatever call that "
    "extension is on now, perhaps another customer's)",
    "cancelled": "cancelled request by extension (its call had ended; sent now, it acts on "
    "whatever call that extension is on now)",
    "failed": "request by extension refused by NoojeeContact (sent now, it acts on whatever "
    "call that extension is on now, not the one it was made in)",
}


def _refusal(rows: list[tuple[int, str]]) -> str:
    lines = [f"  {id_}: {_WHY_NOT_RETRIED[reason]}" for id_, reason in rows]
    return "\n".join(
        [
            "not retried, nothing changed; check NoojeeContact first, then retry with --force "
            "if the request must still be sent:",
            *lines,
        ]
    )


def _existing(
    db: sqlite3.Connection, table: Literal["pending", "dead"], ids: list[int] | None
) -> tuple[int, ...]:
    """The ids of ``table`` among ``ids`` (every id when None). An id that is not there is a
    mistake (a typo, or the wrong table): :class:`SpoolError` naming it, and nothing is changed."""
    where, params = _id_filter(ids)
    query = f"SELECT id FROM {table}{where} ORDER BY id"  # noqa: S608 (placeholders only)
    found = tuple(row[0] for row in db.execute(query, params))
    missing = sorted(set(ids or ()) - set(found))
    if missing:
        listing = "spool list --dead" if table == "dead" else "spool list"
        raise SpoolError(
            f"no {'dead letter' if table == 'dead' else 'pending entry'} with id "
            f"{', '.join(map(str, missing))}: `agi-bridge {listing}` shows them"
        )
    return found


def _stats(db: sqlite3.Connection) -> SpoolStats:
    pending, oldest = db.execute("SELECT count(*), min(created) FROM pending").fetchone()
    # Expired and cancelled requests by extension need nobody: what they asked for was either
    # superseded by their call's own stop or told to the agent, who may press again.
    (dead,) = db.execute(
        "SELECT count(*) FROM dead WHERE reason IN ('failed', 'unconfirmed')"
    ).fetchone()
    return SpoolStats(pending=pending, dead=dead, oldest_pending=oldest)


def _id_filter(ids: list[int] | None) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    return f" WHERE id IN ({', '.join('?' * len(ids))})", tuple(ids)
