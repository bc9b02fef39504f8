"""The spool's SQLite side, and the process that writes it: the schema, every operation on
the spool (one module-level function each, ``op(db, *args)``), and the loop of the writer
process the bridge starts (``python -m agi_bridge.spool_writer``).

Why a process of its own: on a disk that takes no write (``fsfreeze``, a dying disk, a
snapshot) the thread inside SQLite's write sleeps in the kernel, uninterruptibly, until the
disk is back, and a process with such a thread cannot end, not even on SIGKILL. With the
writes here, the bridge itself never touches the spool file: its stop gives up on the writer
after a bounded wait, names what the disk never took, and exits; the writer ends when the disk
thaws.

Imports sqlite3 and the vocabulary only (no logging, no settings, no event loop): the writer
starts in milliseconds, and it logs nothing: it answers the bridge, which logs. The bridge's
side is :mod:`agi_bridge.spool`.

Wire format, both ways on a Unix socket pair: a 4-byte big-endian length, then a pickle. The
bridge sends ``(op name, args)`` per job; the writer runs everything waiting as one group
commit and answers once per batch: ``(outcomes, lost, damaged)``, an outcome being
``(value, SpoolError | None)`` per job, in order. The bridge closing its end (a stop, or its
death) tells the writer to finish what it holds and exit.
"""

from __future__ import annotations

import contextlib
import errno as os_errno
import os
import pickle
import re
import signal
import socket
import sqlite3
import struct
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeVar, cast

from agi_bridge.vocabulary import Action, RecordingRequest, TargetKind

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
# Bounds one group commit so a huge burst cannot hold the write lock for long.
MAX_BATCH: Final = 1000
# One read from the socket: a burst's worth of jobs (~150 bytes each), or a batch's answer.
RECEIVE_BYTES: Final = 256 * 1024

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

T = TypeVar("T")
Op = Callable[..., object]
# The operations the writer runs, by name: a job names one (only these cross the socket).
OPS: Final[dict[str, Op]] = {}


def op(function: T) -> T:
    """Register ``function`` as an operation the writer runs."""
    OPS[cast(Op, function).__name__] = cast(Op, function)
    return function


# The operations that put something new in the spool (a request, the readiness probe's
# write): refused once the file is no longer the one at its path, see _run_batch.
_NEW_ENTRIES: Final = frozenset({"add", "probe"})

# SQLite's answers that mean the file itself is damaged.
DAMAGE_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class SpoolError(Exception):
    """The spool could not be opened or written; the message says where and why.
    ``sqlite_code`` and ``errno``: SQLite's or the OS's answer underneath, if any (attributes,
    not a ``__cause__``: they cross from the writer process in a pickle, which keeps no cause).
    """

    def __init__(
        self, message: str, *, sqlite_code: int | None = None, errno: int | None = None
    ) -> None:
        super().__init__(message)
        self.sqlite_code = sqlite_code
        self.errno = errno


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    id: int
    request: RecordingRequest
    call_uniqueid: str
    created: float
    attempts: int
    last_error: str | None = None
    reason: SettleReason | None = None  # dead letters only

    def __reduce__(self) -> tuple[type[SpoolEntry], tuple[object, ...]]:
        # Pickled as its fields (claims answer hundreds): see RecordingRequest.__reduce__.
        return SpoolEntry, (
            self.id,
            self.request,
            self.call_uniqueid,
            self.created,
            self.attempts,
            self.last_error,
            self.reason,
        )


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


def _entries(
    db: sqlite3.Connection, query: str, params: tuple[object, ...] = ()
) -> list[SpoolEntry]:
    return [_entry(row) for row in db.execute(query, params)]


def failure(error: Exception) -> SpoolError:
    """``error`` as the SpoolError its caller gets, with SQLite's or the OS's code."""
    if isinstance(error, SpoolError):
        return error
    return SpoolError(
        f"spool {error.__class__.__name__}: {error}",
        sqlite_code=error.sqlite_errorcode if isinstance(error, sqlite3.Error) else None,
        errno=error.errno if isinstance(error, OSError) else None,
    )


# --- opening --------------------------------------------------------------------------------


def connect(path: Path, *, fsync: bool, migrate: bool) -> sqlite3.Connection:
    """Open the spool at ``path`` (creating the directory and the tables, or migrating an
    older schema when ``migrate``); SpoolError naming the path when it cannot."""
    connection: sqlite3.Connection | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA journal_mode = WAL")
        # FULL fsyncs the WAL at every commit: a stop survives a power cut, not only a
        # crash. NORMAL survives kill -9 but may lose the last commits on power loss.
        connection.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
        # Only the bridge migrates, under its data_dir lock: an operator's command run while
        # the previous release (no lock, no "attempted" marks) still serves would let it
        # go on writing a spool whose starts the new one then trusts.
        _upgrade(connection, path, migrate=migrate)
    except (OSError, sqlite3.Error, SpoolError) as exc:
        # Close what was opened: a connection left to the garbage collector is a leaked
        # file descriptor (a ResourceWarning on Python 3.13+).
        if connection is not None:
            connection.close()
        if isinstance(exc, SpoolError):
            raise
        cause = failure(exc)
        raise SpoolError(
            f"cannot open the spool at {path}: {exc}",
            sqlite_code=cause.sqlite_code,
            errno=cause.errno,
        ) from exc
    return connection


def open_for_writing(path: Path, *, fsync: bool) -> tuple[sqlite3.Connection, bool]:
    """The writer's connection, and whether the disk's reserve had to be given back for it
    (a full disk); the reserve is set aside again when there is room."""
    released = False
    try:
        connection = connect(path, fsync=fsync, migrate=True)
    except SpoolError as exc:
        if not (_no_room(exc) and _release_reserve(path)):
            raise
        released = True
        connection = connect(path, fsync=fsync, migrate=True)
    _keep_reserve(path)
    return connection, released


def _keep_reserve(path: Path) -> None:
    """Set RESERVE_BYTES aside on the spool's disk, if there is room (else next time)."""
    reserve = path.with_name(RESERVE_FILE)
    if reserve.is_file():
        return
    try:
        with reserve.open("wb") as handle:
            handle.write(bytes(RESERVE_BYTES))
    except OSError:
        reserve.unlink(missing_ok=True)  # a partial reserve only takes room


def _release_reserve(path: Path) -> bool:
    """Give the reserve back to the disk; whether there was one."""
    reserve = path.with_name(RESERVE_FILE)
    if not reserve.is_file():
        return False
    reserve.unlink()
    return True


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


def _no_room(error: SpoolError) -> bool:
    """Opening failed for want of room on the disk: what :func:`full` says, or no room for
    the WAL's index (SQLite) or for the file itself (the OS)."""
    return (
        error.errno == os_errno.ENOSPC
        or full(error)
        or error.sqlite_code == sqlite3.SQLITE_IOERR_SHMSIZE
    )


def full(error: BaseException) -> bool:
    """The disk took no write for want of room (SQLITE_FULL), and nothing worse."""
    return isinstance(error, SpoolError) and error.sqlite_code == sqlite3.SQLITE_FULL


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode), None when there is none."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


@op
def move_to_dead(
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


@op
def stats(db: sqlite3.Connection) -> SpoolStats:
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


# --- the operations: each one job, run inside the batch's transaction ---------------------


@op
def add(
    db: sqlite3.Connection,
    request: RecordingRequest,
    call_uniqueid: str,
    now: float,
    lease: float,
    attempted: bool,
) -> int:
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


@op
def release_leases(db: sqlite3.Connection, now: float) -> int:
    return db.execute("UPDATE pending SET next_at = ? WHERE next_at > ?", (now, now)).rowcount


@op
def settle_interrupted(db: sqlite3.Connection, error: str, now: float) -> list[SpoolEntry]:
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM pending WHERE attempted = 1 ORDER BY id"  # noqa: S608
    ).fetchall()
    for row in rows:
        move_to_dead(db, cast(int, row[0]), error, "unconfirmed", 0, now)
    return [_entry(row) for row in rows]


@op
def by_extension(db: sqlite3.Connection) -> list[SpoolEntry]:
    query = f"SELECT {_COLUMNS} FROM pending WHERE kind = 'extension' ORDER BY id"  # noqa: S608
    return _entries(db, query)


@op
def cancel_by_extension(
    db: sqlite3.Connection, call_uniqueid: str, error: str, now: float
) -> list[int]:
    ids = [
        cast(int, row[0])
        for row in db.execute(
            "SELECT id FROM pending WHERE call_uniqueid = ? AND kind = 'extension' "
            "AND attempted = 0 ORDER BY id",
            (call_uniqueid,),
        )
    ]
    for entry_id in ids:
        move_to_dead(db, entry_id, error, "cancelled", 0, now)
    return ids


@op
def remove(db: sqlite3.Connection, entry_id: int) -> None:
    db.execute("DELETE FROM pending WHERE id = ?", (entry_id,))
    # Cancelled while its attempt was on its way (cancel_by_extension): it was delivered
    # after all, and a repeat must hear that, not "cancelled".
    db.execute("DELETE FROM dead WHERE id = ? AND reason = 'cancelled'", (entry_id,))


@op
def forget(db: sqlite3.Connection, ids: tuple[int, ...]) -> None:
    """Delete pending entries settled while the disk took no write."""
    db.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in ids])


@op
def due_stops(db: sqlite3.Connection, now: float, limit: int) -> list[SpoolEntry]:
    """Due stops, claimed by nobody on disk: what a full disk's claim leases in memory."""
    return _entries(
        db,
        f"SELECT {_COLUMNS}, last_error FROM pending "  # noqa: S608
        "WHERE next_at <= ? AND action = 'stop' AND attempted = 0 ORDER BY id LIMIT ?",
        (now, limit),
    )


@op
def claim(db: sqlite3.Connection, now: float, limit: int, lease: float) -> list[SpoolEntry]:
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


@op
def next_due(db: sqlite3.Connection) -> float | None:
    row = db.execute("SELECT min(next_at) FROM pending WHERE attempted = 0").fetchone()
    return cast("float | None", row[0])


@op
def where(
    db: sqlite3.Connection, entry_id: int
) -> tuple[Literal["pending", "dead"], str | None, SettleReason | None] | None:
    row = db.execute("SELECT last_error FROM pending WHERE id = ?", (entry_id,)).fetchone()
    if row is not None:
        return "pending", cast("str | None", row[0]), None
    row = db.execute("SELECT last_error, reason FROM dead WHERE id = ?", (entry_id,)).fetchone()
    if row is not None:
        return "dead", cast(str, row[0]), cast(SettleReason, row[1])
    return None


@op
def reschedule(db: sqlite3.Connection, entry_id: int, error: str, retry_at: float) -> None:
    db.execute(
        "UPDATE pending SET attempts = attempts + 1, last_error = ?, next_at = ?, "
        "attempted = 0 WHERE id = ?",
        (error, retry_at, entry_id),
    )


@op
def expire_if_idle(db: sqlite3.Connection, entry_id: int, error: str, now: float) -> bool:
    idle = db.execute(
        "SELECT 1 FROM pending WHERE id = ? AND attempted = 0 AND next_at <= ?",
        (entry_id, now),
    ).fetchone()
    if idle is not None:
        move_to_dead(db, entry_id, error, "expired", 0, now)
    return idle is not None


@op
def probe(db: sqlite3.Connection, now: float) -> None:
    """The readiness probe's write: a real one, not a no-op that would succeed on a
    filesystem that no longer takes any."""
    db.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (now,))


@op
def listing(db: sqlite3.Connection, table: Literal["pending", "dead"]) -> list[SpoolEntry]:
    reason = "reason" if table == "dead" else "NULL"
    query = f"SELECT {_COLUMNS}, last_error, {reason} FROM {table} ORDER BY id"  # noqa: S608
    return _entries(db, query)


@op
def retry_dead(
    db: sqlite3.Connection, selected: list[int] | None, force: bool, now: float
) -> tuple[int, ...]:
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


@op
def purge(
    db: sqlite3.Connection, table: Literal["pending", "dead"], selected: list[int] | None
) -> int:
    _existing(db, table, selected)
    where, params = _id_filter(selected)
    return db.execute(f"DELETE FROM {table}{where}", params).rowcount  # noqa: S608


# --- group commit ---------------------------------------------------------------------------

Job = tuple[Op, tuple[object, ...]]
Outcome = tuple[object, SpoolError | None]


def execute(connection: sqlite3.Connection, jobs: Sequence[Job]) -> list[Outcome]:
    """Run the jobs in one transaction, one commit. A job that fails is retried alone
    after the others, so one bad job never takes the rest of its batch down."""
    outcomes: list[Outcome] = []
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            outcomes = [(function(connection, *args), None) for function, args in jobs]
        # Any exception, not only sqlite3.Error (e.g. ValueError from a row whose action
        # is not start/stop): uncaught, it would end the writer and every later call
        # would fail.
        except Exception:  # noqa: BLE001 (the slow path below tells each job's caller)
            connection.execute("ROLLBACK")
            return _execute_one_by_one(connection, jobs)
        connection.execute("COMMIT")
    except sqlite3.Error as exc:
        # The commit itself failed (disk full, I/O error): nothing of the batch is durable.
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        # One error each: a raised exception collects its traceback, and a shared one would
        # collect all of its waiters'.
        return [(None, failure(exc)) for _ in jobs]
    return outcomes


def _execute_one_by_one(connection: sqlite3.Connection, jobs: Sequence[Job]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for function, args in jobs:
        try:
            connection.execute("BEGIN IMMEDIATE")
            value = function(connection, *args)
            connection.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 (handed to the caller)
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            outcomes.append((None, failure(exc)))
        else:
            outcomes.append((value, None))
    return outcomes


# --- the wire -------------------------------------------------------------------------------

_LENGTH: Final = struct.Struct(">I")


def frame(message: object) -> bytes:
    """``message`` as it goes on the socket: its pickle's length, then the pickle."""
    payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


def unframe(buffer: bytearray) -> list[object]:
    """Take every complete message off the front of ``buffer``."""
    messages: list[object] = []
    start = 0
    while len(buffer) - start >= _LENGTH.size:
        (size,) = _LENGTH.unpack_from(buffer, start)
        end = start + _LENGTH.size + size
        if end > len(buffer):
            break
        messages.append(pickle.loads(buffer[start + _LENGTH.size : end]))  # noqa: S301 (our parent's)
        start = end
    del buffer[:start]
    return messages


# --- the writer process ---------------------------------------------------------------------


@dataclass(slots=True)
class _State:
    """What the writer found wrong, sent with every answer."""

    path: Path
    opened: tuple[int, int] | None  # the file it writes (device, inode)
    lost: str | None = None
    damaged: str | None = None


def serve(sock: socket.socket, connection: sqlite3.Connection, path: Path) -> None:
    """Run every job the bridge sends, in batches, until it closes its end; then finish
    what is left and close the database."""
    state = _State(path, _identity(path), damaged=_damage(connection))
    buffer = bytearray()
    jobs: deque[tuple[str, tuple[object, ...]]] = deque()
    reading = True
    while True:
        if reading:
            reading = _receive(sock, buffer, jobs, wait=not jobs)
        if not jobs:
            break  # the bridge closed its end, and everything it sent is answered
        batch = [jobs.popleft() for _ in range(min(len(jobs), MAX_BATCH))]
        answer = (_run_batch(connection, batch, state), state.lost, state.damaged)
        # The bridge gone (killed): what it sent is still committed, nobody to tell.
        with contextlib.suppress(OSError):
            sock.sendall(frame(answer))
    connection.close()


def _receive(
    sock: socket.socket,
    buffer: bytearray,
    jobs: deque[tuple[str, tuple[object, ...]]],
    *,
    wait: bool,
) -> bool:
    """Add to ``jobs`` what the bridge sent: with ``wait``, block until there is one, then
    take whatever else is there already (the group commit's batch). False once the bridge
    closed its end."""
    flags = 0 if wait else socket.MSG_DONTWAIT
    while True:
        try:
            data = sock.recv(RECEIVE_BYTES, flags)
        except BlockingIOError:
            return True
        except ConnectionError:
            return False
        if not data:
            return False
        buffer += data
        jobs.extend(unframe(buffer))  # type: ignore[arg-type]  # (name, args): the bridge's
        if jobs and len(data) < RECEIVE_BYTES:
            return True  # a short read took all that was waiting: no second call to say so
        if jobs:
            flags = socket.MSG_DONTWAIT


def _run_batch(
    connection: sqlite3.Connection, batch: list[tuple[str, tuple[object, ...]]], state: _State
) -> list[Outcome]:
    # The spool file deleted or replaced under the bridge: a new entry would go to a file
    # nobody will read again, so nothing more is put in it (nor does the readiness probe
    # pass); what it holds already is still delivered from the open file, the one place it
    # is left. One stat per batch (microseconds); the delivery worker's idle poll makes it
    # one at least every second.
    if state.lost is None and _identity(state.path) != state.opened:
        state.lost = (
            f"the spool file {state.path} was deleted or replaced while the bridge ran: "
            "nothing more is queued into it, and what it held is still delivered from the "
            "open file. Restart the bridge (it starts a new spool) once "
            "agi_bridge_spool_pending is 0: what is still pending then is lost with the file"
        )
    if state.lost is not None:
        kept = [(OPS[name], args) for name, args in batch if name not in _NEW_ENTRIES]
        answers = iter(execute(connection, kept))
        # One SpoolError each: see execute().
        return [
            (None, SpoolError(state.lost)) if name in _NEW_ENTRIES else next(answers)
            for name, _ in batch
        ]
    outcomes = execute(connection, [(OPS[name], args) for name, args in batch])
    for _, error in outcomes:
        if state.damaged is None and error is not None and error.sqlite_code in DAMAGE_CODES:
            state.damaged = str(error)
    return outcomes


def main(argv: Sequence[str]) -> int:
    """``python -m agi_bridge.spool_writer FD PATH FSYNC``: FD is the writer's end of the
    socket pair. Answers ``("ready", reserve released)`` or ``("failed", SpoolError)`` first."""
    # Ctrl-C in a terminal reaches the whole process group: the bridge stops, and tells the
    # writer when (by closing its end); the writer must not die first with its batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, path, fsync = int(argv[1]), Path(argv[2]), argv[3] == "1"
    with socket.socket(fileno=fd) as sock:
        try:
            connection, released = open_for_writing(path, fsync=fsync)
        except SpoolError as exc:
            sock.sendall(frame(("failed", exc)))
            return 1
        sock.sendall(frame(("ready", released)))
        serve(sock, connection, path)
    return 0


if __name__ == "__main__":
    # Run as the module's real name, not as ``__main__``: the classes in the answers' pickles
    # must be the ones the bridge unpickles (agi_bridge.spool_writer.SpoolEntry...).
    from agi_bridge.spool_writer import main as run

    sys.exit(run(sys.argv))
