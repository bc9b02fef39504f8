"""The spool's SQLite side, and the process that writes it: the schema, every operation on
the spool (one module-level function each, ``op(db, *args)``, answering plain values: rows,
tuples, numbers), and the loop of the writer process the bridge starts (``python -I -S -c
... agi_bridge.spool_writer ...``: :data:`agi_bridge.spool.WRITER_COMMAND`).

Why a process of its own: on a disk that takes no write (``fsfreeze``, a dying disk, a
snapshot) the thread inside SQLite's write sleeps in the kernel, uninterruptibly, until the
disk is back, and a process with such a thread cannot end, not even on SIGKILL. With the
writes here, the bridge itself never touches the spool file: its stop gives up on the writer
after a bounded wait, names what the disk never took, and exits; the writer ends when the disk
thaws.

Imports sqlite3 and a few of the standard library's modules only (no logging, no settings, no
event loop, nothing of ours, not even typing): the writer starts in milliseconds, costs little
more memory than a bare Python, and it logs nothing: it answers the bridge, which logs. The
bridge's side is :mod:`agi_bridge.spool`, which makes entries of the rows.

Wire format, both ways on a Unix socket pair: a 4-byte big-endian length, then a marshal of
plain values. The bridge sends ``(op name, args)`` per job; the writer runs everything waiting
as one group commit and answers once per batch: ``(outcomes, lost, damaged)``, an outcome
being ``(value, SpoolError.wire() | None)`` per job, in order. Under load (jobs keep coming) a
batch also takes what arrives within :data:`GROUP_COMMIT_WINDOW` of its first job. The bridge
closing its end (a stop, or its death) tells the writer to finish what it holds and exit.
"""

from __future__ import annotations

import contextlib
import errno as os_errno
import marshal
import os
import select
import signal
import sqlite3
import struct
import time
from collections import deque

# The writer imports nothing else at run time (no typing, no dataclasses, no pathlib, nothing
# else of ours): it runs as ``python -I -S``, so a Python with sqlite3 is all its memory. Its
# types exist for mypy only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, Final, Literal, TypeVar

    from agi_bridge.spool import SettleReason

    Op = Callable[..., object]
    T = TypeVar("T", bound=Op)
    # A row as the operations answer it (see _COLUMNS): the bridge's side makes entries of it.
    Row = tuple[Any, ...]
    # A request's fields as the spool stores them: action, target, agent, tag, kind.
    Fields = tuple[str, str, str | None, str | None, str]
    # A SpoolError as it crosses the socket: message, sqlite_code, errno.
    WireError = tuple[str, int | None, int | None]
    Job = tuple[Op, tuple[object, ...]]
    # A job as the bridge sends it: the operation's name (a key of OPS), its arguments.
    Sent = tuple[str, tuple[object, ...]]
    Outcome = tuple[object, "SpoolError | None"]

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
# Under load (a job read less than this after the last batch's answer went out), a batch waits
# this long after its first job for more before it commits: the classic group commit
# (PostgreSQL's commit_delay, MySQL's binlog_group_commit_sync_delay). A commit (BEGIN
# IMMEDIATE, COMMIT, the WAL's fsync, the file's stat, the answer) costs several times the SQL
# in it: at ~1,400 async sessions/s this turned ~3,600 commits of 3.5 jobs into ~750 of 17 and
# took the writer's CPU per session from 0.12 to 0.08 ms. 3 ms is the most an async QUEUED or a
# write-ahead then waits extra: small against the budgets (1 s), the commit timeout (5 s) and
# the hold times under load (tens of ms at the 99th percentile). A job after a quiet spell is
# committed at once: light load never pays it.
GROUP_COMMIT_WINDOW: Final = 0.003
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
_UNIQUEID_PATTERN: Final = r"(?:.+-)?[0-9]+\.[0-9]+"
# The actions a request can have: vocabulary.ACTIONS' names (not imported: it would load
# dataclasses and typing into the writer; a test pins the two equal).
ACTIONS: Final = ("start", "stop")
# The columns every row of an entry starts with, in this order (spool.entry() reads them),
# then optionally last_error and the settle reason.
_COLUMNS: Final = "id, action, target, agent, tag, call_uniqueid, created, attempts, kind"

# The operations the writer runs, by name: a job names one (only these cross the socket).
OPS: Final[dict[str, Op]] = {}


def op(function: T) -> T:
    """Register ``function`` as an operation the writer runs."""
    OPS[function.__name__] = function
    return function


# The operations that put something new in the spool (a request, the readiness probe's
# write): refused once the file is no longer the one at its path, see _run_batch.
_NEW_ENTRIES: Final = frozenset({"add", "probe"})

# SQLite's answers that mean the file itself is damaged.
DAMAGE_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class SpoolError(Exception):
    """The spool could not be opened or written; the message says where and why.
    ``sqlite_code`` and ``errno``: SQLite's or the OS's answer underneath, if any (attributes,
    not a ``__cause__``: they cross from the writer process, see :meth:`wire`).
    """

    def __init__(
        self, message: str, *, sqlite_code: int | None = None, errno: int | None = None
    ) -> None:
        super().__init__(message)
        self.sqlite_code = sqlite_code
        self.errno = errno

    def wire(self) -> WireError:
        """The error as it crosses the socket (plain values: see :func:`frame`)."""
        return str(self), self.sqlite_code, self.errno

    @classmethod
    def unwire(cls, error: WireError) -> SpoolError:
        """The error :meth:`wire` sent."""
        message, sqlite_code, errno = error
        return cls(message, sqlite_code=sqlite_code, errno=errno)


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


def connect(path: str, *, fsync: bool, migrate: bool) -> sqlite3.Connection:
    """Open the spool at ``path`` (creating the directory and the tables, or migrating an
    older schema when ``migrate``); SpoolError naming the path when it cannot."""
    connection: sqlite3.Connection | None = None
    try:
        os.makedirs(os.path.dirname(path) or os.curdir, exist_ok=True)
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


def open_for_writing(path: str, *, fsync: bool) -> tuple[sqlite3.Connection, bool]:
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


def reserve_path(path: str) -> str:
    """Where the disk's reserve for the spool at ``path`` is kept."""
    return os.path.join(os.path.dirname(path), RESERVE_FILE)


def _keep_reserve(path: str) -> None:
    """Set RESERVE_BYTES aside on the spool's disk, if there is room (else next time)."""
    reserve = reserve_path(path)
    if os.path.isfile(reserve):
        return
    try:
        with open(reserve, "wb") as handle:
            handle.write(bytes(RESERVE_BYTES))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(reserve)  # a partial reserve only takes room


def _release_reserve(path: str) -> bool:
    """Give the reserve back to the disk; whether there was one."""
    reserve = reserve_path(path)
    if not os.path.isfile(reserve):
        return False
    os.unlink(reserve)
    return True


def _upgrade(db: sqlite3.Connection, path: str, *, migrate: bool) -> None:
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


def _migrate(db: sqlite3.Connection, path: str, *, migrate: bool) -> None:
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
        # Imported here: only this migration, once per old spool, needs regular expressions.
        import re

        uniqueid = re.compile(_UNIQUEID_PATTERN)
        for table in ("pending", "dead"):
            rows = db.execute(f"SELECT id, target FROM {table}").fetchall()  # noqa: S608
            # The kind an entry gets when the spool did not record it: a call only if
            # shaped like one.
            db.executemany(
                f"UPDATE {table} SET kind = ? WHERE id = ?",  # noqa: S608
                [
                    ("uniqueid" if uniqueid.fullmatch(target) else "extension", id_)
                    for id_, target in rows
                ],
            )
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def quick_check(connection: sqlite3.Connection) -> str | None:
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


def _identity(path: str) -> tuple[int, int] | None:
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
def stats(db: sqlite3.Connection) -> tuple[int, int, float | None]:
    """Pending entries, dead letters that need an operator, the oldest pending's creation."""
    pending, oldest = db.execute("SELECT count(*), min(created) FROM pending").fetchone()
    # Expired and cancelled requests by extension need nobody: what they asked for was either
    # superseded by their call's own stop or told to the agent, who may press again.
    (dead,) = db.execute(
        "SELECT count(*) FROM dead WHERE reason IN ('failed', 'unconfirmed')"
    ).fetchone()
    return pending, dead, oldest


def _rows(db: sqlite3.Connection, query: str, params: tuple[object, ...] = ()) -> list[Row]:
    """The rows of entries ``query`` selects (:data:`_COLUMNS` first). A row whose action
    this release does not know fails the job (its transaction rolled back: a claim leases
    nothing), as the bridge could not make a request of it."""
    rows = db.execute(query, params).fetchall()
    for row in rows:
        if row[1] not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {row[1]!r}")
    return rows


def _id_filter(ids: list[int] | None) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    return f" WHERE id IN ({', '.join('?' * len(ids))})", tuple(ids)


# --- the operations: each one job, run inside the batch's transaction ---------------------


@op
def add(
    db: sqlite3.Connection,
    request: Fields,
    call_uniqueid: str,
    now: float,
    lease: float,
    attempted: bool,
) -> int:
    action, target, agent, tag, kind = request
    # lastrowid, not INSERT ... RETURNING: that needs SQLite 3.35, and the Pythons of RHEL 8/9
    # (3.26, 3.34) or Debian bullseye (3.34) link an older one.
    cursor = db.execute(
        "INSERT INTO pending (action, target, agent, tag, call_uniqueid, created, next_at,"
        " kind, attempted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (action, target, agent, tag, call_uniqueid, now, now + lease, kind, int(attempted)),
    )
    entry_id = cursor.lastrowid
    assert entry_id is not None  # set by every INSERT that succeeded
    return entry_id


@op
def release_leases(db: sqlite3.Connection, now: float) -> int:
    return db.execute("UPDATE pending SET next_at = ? WHERE next_at > ?", (now, now)).rowcount


@op
def settle_interrupted(db: sqlite3.Connection, error: str, now: float) -> list[Row]:
    rows = _rows(db, f"SELECT {_COLUMNS} FROM pending WHERE attempted = 1 ORDER BY id")  # noqa: S608
    for row in rows:
        move_to_dead(db, row[0], error, "unconfirmed", 0, now)
    return rows


@op
def by_extension(db: sqlite3.Connection) -> list[Row]:
    query = f"SELECT {_COLUMNS} FROM pending WHERE kind = 'extension' ORDER BY id"  # noqa: S608
    return _rows(db, query)


@op
def cancel_by_extension(
    db: sqlite3.Connection, call_uniqueid: str, error: str, now: float
) -> list[int]:
    ids: list[int] = [
        row[0]
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
def record_settled(
    db: sqlite3.Connection, writes: list[tuple[str, int, tuple[object, ...]]]
) -> None:
    """The writes that settled entries while the disk took none, each the name of its
    operation (``remove``, ``move_to_dead``), the entry's id and the rest of its arguments."""
    for name, entry_id, args in writes:
        OPS[name](db, entry_id, *args)


@op
def due_stops(db: sqlite3.Connection, now: float, limit: int) -> list[Row]:
    """Due stops, claimed by nobody on disk: what a full disk's claim leases in memory."""
    return _rows(
        db,
        f"SELECT {_COLUMNS}, last_error FROM pending "  # noqa: S608
        "WHERE next_at <= ? AND action = 'stop' AND attempted = 0 ORDER BY id LIMIT ?",
        (now, limit),
    )


@op
def claim(db: sqlite3.Connection, now: float, limit: int, lease: float) -> list[Row]:
    rows = _rows(
        db,
        f"SELECT {_COLUMNS}, last_error FROM pending "  # noqa: S608
        "WHERE next_at <= ? AND attempted = 0 ORDER BY id LIMIT ?",
        (now, limit),
    )
    # A start is marked attempted in this very commit, before it is sent (at most once).
    db.executemany(
        "UPDATE pending SET next_at = ?, attempted = (action = 'start') WHERE id = ?",
        [(now + lease, r[0]) for r in rows],
    )
    return rows


@op
def next_due(db: sqlite3.Connection) -> float | None:
    (due,) = db.execute("SELECT min(next_at) FROM pending WHERE attempted = 0").fetchone()
    return due  # type: ignore[no-any-return]  # (a REAL or NULL)


@op
def where(
    db: sqlite3.Connection, entry_id: int
) -> tuple[Literal["pending", "dead"], str | None, SettleReason | None] | None:
    row = db.execute("SELECT last_error FROM pending WHERE id = ?", (entry_id,)).fetchone()
    if row is not None:
        return "pending", row[0], None
    row = db.execute("SELECT last_error, reason FROM dead WHERE id = ?", (entry_id,)).fetchone()
    if row is not None:
        return "dead", row[0], row[1]
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
def listing(db: sqlite3.Connection, table: Literal["pending", "dead"]) -> list[Row]:
    reason = "reason" if table == "dead" else "NULL"
    query = f"SELECT {_COLUMNS}, last_error, {reason} FROM {table} ORDER BY id"  # noqa: S608
    return _rows(db, query)


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
        _rollback(connection)
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
            _rollback(connection)
            outcomes.append((None, failure(exc)))
        else:
            outcomes.append((value, None))
    return outcomes


def _rollback(connection: sqlite3.Connection) -> None:
    """Roll back what a failed job or commit left, if anything: SQLite may have ended the
    transaction itself (as after SQLITE_FULL)."""
    with contextlib.suppress(sqlite3.Error):
        connection.execute("ROLLBACK")


# --- the wire -------------------------------------------------------------------------------

_LENGTH: Final = struct.Struct(">I")


def frame(message: Any) -> bytes:  # any value marshal takes
    """``message`` as it goes on the socket: its marshal's length, then the marshal (plain
    values only; both ends are the same interpreter, which is all marshal's format needs)."""
    payload = marshal.dumps(message)
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
        messages.append(marshal.loads(buffer[start + _LENGTH.size : end]))  # noqa: S302 (the other end's)
        start = end
    del buffer[:start]
    return messages


# --- the writer process ---------------------------------------------------------------------


class _State:
    """What the writer found wrong, sent with every answer."""

    __slots__ = ("damaged", "lost", "opened", "path")

    def __init__(self, path: str, damaged: str | None) -> None:
        self.path = path
        self.opened = _identity(path)  # the file it writes (device, inode)
        self.lost: str | None = None
        self.damaged = damaged


def serve(
    sock: int,
    connection: sqlite3.Connection,
    path: str,
    *,
    window: float = GROUP_COMMIT_WINDOW,
) -> None:
    """Run every job the bridge sends on the socket ``sock`` (a file descriptor: the socket
    module would cost the writer half a megabyte), in batches, until it closes its end; then
    finish what is left and close the database. ``window``: see :data:`GROUP_COMMIT_WINDOW`."""
    state = _State(path, damaged=quick_check(connection))
    readable = select.poll()
    readable.register(sock, select.POLLIN)
    buffer = bytearray()
    jobs: deque[Sent] = deque()
    reading = True
    answered = float("-inf")  # when the last batch's answer went out: none yet
    while True:
        # Jobs left over from a full batch were read before its commit: they waited already.
        waited = bool(jobs)
        if reading:
            reading = _receive(sock, readable, buffer, jobs, wait=not jobs)
        if not jobs:
            break  # the bridge closed its end, and everything it sent is answered
        first = time.monotonic()  # (the first job of the batch was read just now)
        if reading and not waited and first - answered < window:
            reading = _gather(sock, readable, buffer, jobs, first + window)
        batch = [jobs.popleft() for _ in range(min(len(jobs), MAX_BATCH))]
        outcomes = [
            (value, None if error is None else error.wire())
            for value, error in _run_batch(connection, batch, state)
        ]
        # The bridge gone (killed): what it sent is still committed, nobody to tell.
        with contextlib.suppress(OSError):
            _send(sock, frame((outcomes, state.lost, state.damaged)))
        answered = time.monotonic()
    connection.close()


def _receive(
    sock: int,
    readable: select.poll,
    buffer: bytearray,
    jobs: deque[Sent],
    *,
    wait: bool,
) -> bool:
    """Add to ``jobs`` what the bridge sent: with ``wait``, block until there is one, then
    take whatever else is there already (the group commit's batch; ``readable`` polls
    ``sock``). False once the bridge closed its end."""
    while True:
        if not wait and not readable.poll(0):
            return True
        read = _read(sock, buffer, jobs)
        if read is None:
            return False
        if jobs and read < RECEIVE_BYTES:
            return True  # a short read took all that was waiting: no second call to say so
        if jobs:
            wait = False


def _gather(
    sock: int,
    readable: select.poll,
    buffer: bytearray,
    jobs: deque[Sent],
    deadline: float,
) -> bool:
    """Add to ``jobs`` what the bridge sends until the monotonic ``deadline`` or
    :data:`MAX_BATCH` jobs: the group commit window. False once the bridge closed its end
    (then the batch is committed at once: a stop, or a bridge leaving a frozen disk, does not
    wait out the window)."""
    while len(jobs) < MAX_BATCH:
        left = deadline - time.monotonic()
        # poll() rounds its milliseconds up: the window never ends early into a busy loop.
        if left <= 0 or not readable.poll(left * 1000):
            return True
        if _read(sock, buffer, jobs) is None:
            return False
    return True


def _read(sock: int, buffer: bytearray, jobs: deque[Sent]) -> int | None:
    """One read from ``sock``: the complete jobs it ends go to ``jobs``. How many bytes it
    took, or None once the bridge closed its end."""
    try:
        data = os.read(sock, RECEIVE_BYTES)
    except ConnectionError:
        return None
    if not data:
        return None
    buffer += data
    jobs.extend(unframe(buffer))  # type: ignore[arg-type]  # (name, args): the bridge's
    return len(data)


def _send(sock: int, data: bytes) -> None:
    """Write all of ``data`` to ``sock`` (a write may take only part of it)."""
    left = memoryview(data)
    while left:
        left = left[os.write(sock, left) :]


def _run_batch(connection: sqlite3.Connection, batch: list[Sent], state: _State) -> list[Outcome]:
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
    """``main([..., FD, PATH, FSYNC])`` (spool.WRITER_COMMAND): FD is the writer's end of the
    socket pair. Answers ``("ready", reserve released)`` or ``("failed", SpoolError.wire())``
    first."""
    # Ctrl-C in a terminal reaches the whole process group: the bridge stops, and tells the
    # writer when (by closing its end); the writer must not die first with its batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, path, fsync = int(argv[1]), argv[2], argv[3] == "1"
    try:
        connection, released = open_for_writing(path, fsync=fsync)
    except SpoolError as exc:
        _send(fd, frame(("failed", exc.wire())))
        return 1
    _send(fd, frame(("ready", released)))
    serve(fd, connection, path)
    return 0
