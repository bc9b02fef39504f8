"""The durable spool: every request is on disk before the dialplan hears ``QUEUED`` and stays
there until NoojeeContact has taken it or it is dead-lettered with its last error.

SQLite in WAL mode, written by a process of its own (:mod:`agi_bridge.spool_writer`, seen in
``ps`` as ``python -I -S -c ... agi_bridge.spool_writer ...``). Why a process: on a disk that
takes no write (``fsfreeze``, a snapshot, a dying disk) whatever writes sleeps in the kernel,
uninterruptibly, until the disk is back, and a process holding such a thread cannot end, not
even on SIGKILL. The bridge itself never touches the spool file, so its stop stays bounded:
it gives the writer :data:`~agi_bridge.app.SPOOL_FLUSH_TIMEOUT` to finish, names at ERROR what
the disk never took, kills the writer (which ends once the disk thaws, still holding the
data_dir lock: no new bridge can interleave with its last commit) and exits.

Operations from the event loop are sent to the writer, which runs everything waiting in ONE
transaction and commits once (group commit): under a hangup burst a single fsync covers
hundreds of requests, and the event loop never blocks on the disk (nor on the socket: what the
writer has not taken yet waits in memory). Entries are claimed with a lease (``next_at`` moved
past the time a request can take), so a request in flight is not sent twice by this process.
A stop is at least once: after ``kill -9`` it is replayed (the writer, seeing the bridge gone,
commits what it was sent and exits). A start is at most once: its entry is marked
``attempted`` in the same commit that claims it (or writes it ahead of its session's attempt),
before a byte is sent, and a start found so marked at the next start-up may have reached
NoojeeContact: it is settled as "unconfirmed", never resent.

The schema has a version (``PRAGMA user_version``, :data:`SCHEMA_VERSION`); opening an older
spool migrates it in one transaction, and a newer one is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, TypeVarTuple, cast

from agi_bridge import spool_writer as ops
from agi_bridge.logs import get_logger
from agi_bridge.spool_writer import (
    RECEIVE_BYTES,
    SCHEMA_VERSION,
    SPOOL_FILE,
    SpoolError,
    frame,
    full,
    unframe,
)
from agi_bridge.vocabulary import Action, RecordingRequest, TargetKind

__all__ = [
    "MIN_FREE_BYTES",
    "SALVAGE",
    "SCHEMA_VERSION",
    "SPOOL_FILE",
    "STALLED_AFTER",
    "SettleReason",
    "Spool",
    "SpoolAdmin",
    "SpoolEntry",
    "SpoolError",
    "SpoolStats",
    "damage",
]

T = TypeVar("T")
Args = TypeVarTuple("Args")

log = get_logger("agi_bridge.spool")

# Below this much free disk the next commits may fail (SQLite needs room for WAL frames and
# the checkpoint); an entry is ~200 bytes, so 1 MiB still holds thousands of stops.
MIN_FREE_BYTES: Final = 1024 * 1024
# A batch commits in milliseconds, a busy disk's fsync takes well under a second: a job still
# unanswered after this is held by the disk (frozen by fsfreeze or a snapshot, or dying).
STALLED_AFTER: Final = 2.0
# The writer, as ``ps`` shows it; its arguments follow (socket fd, spool file, fsync).
# Isolated (-I: no environment variables, no user site) and without the site module (-S):
# it imports only the standard library and its own module, which it finds where the bridge
# found it, in every install (editable, a venv, the image), with nothing else of that
# directory's (no .pth file run, the standard library first). Its module is imported, not run
# as a script: the script would be compiled at every start, and the compiler's memory stays
# with the process (1 MB, against the cached bytecode's).
_PACKAGES: Final = os.path.dirname(os.path.dirname(ops.__file__))
WRITER_COMMAND: Final = (
    sys.executable,
    "-I",
    "-S",
    "-c",
    f"import sys; sys.path.append({_PACKAGES!r}); from agi_bridge.spool_writer import main; "
    "sys.exit(main(sys.argv))",
)

# What the operator does about a damaged spool (the README's "Salvaging a damaged spool").
SALVAGE: Final = (
    "stop the bridge, move the file aside and copy what SQLite can still read into a new one "
    "with `sqlite3 spool.damaged .dump`, as the README says (salvaging a damaged spool)"
)


# Why an entry is in the dead letters.
# failed: NoojeeContact refused it, or it used up its attempts or its age;
# unconfirmed: a start that may have reached NoojeeContact without a confirmation;
# expired: a request by extension not delivered within its validity;
# cancelled: a request by extension superseded by its call's own stop (the call ended).
SettleReason = Literal["failed", "unconfirmed", "expired", "cancelled"]


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


def _entries(rows: list[ops.Row]) -> list[SpoolEntry]:
    """Entries from the writer's rows: its ``_COLUMNS``, then optionally last_error and the
    settle reason."""
    return [_entry(*row) for row in rows]


def _entry(
    id_: int,
    action: Action,
    target: str,
    agent: str | None,
    tag: str | None,
    uniqueid: str,
    created: float,
    attempts: int,
    kind: TargetKind,
    last_error: str | None = None,
    reason: SettleReason | None = None,
) -> SpoolEntry:
    request = RecordingRequest(action=action, target=target, agent=agent, tag=tag, kind=kind)
    return SpoolEntry(id_, request, uniqueid, created, attempts, last_error, reason)


def _fields(request: RecordingRequest) -> ops.Fields:
    """``request`` as the spool stores it (the reverse of :func:`_entry`'s request)."""
    return request.action, request.target, request.agent, request.tag, request.kind


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
        return ops.quick_check(connection)
    finally:
        connection.close()


@dataclass(slots=True)
class _Job:
    """A job sent to the writer: who waits for it, since when (monotonic), and the request
    it stores, named if it never reaches the disk."""

    future: asyncio.Future[Any]
    sent: float
    what: str | None


class _Writer:
    """The writer process and the bridge's end of its socket. Jobs go out at the end of the
    event loop's turn, in one write (what the socket does not take waits in ``_out``), answers
    come back one per batch, in the order of the jobs: the oldest unanswered job is the head of
    ``_waiting``."""

    def __init__(self, path: Path, *, fsync: bool, inherit: Sequence[int]) -> None:
        self.path = path
        self._sock, theirs = socket.socketpair()
        try:
            # The writer imports sqlite3 and a few standard modules: it is up in milliseconds.
            self._process = subprocess.Popen(
                [*WRITER_COMMAND, str(theirs.fileno()), str(path), "1" if fsync else "0"],
                pass_fds=(theirs.fileno(), *inherit),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except OSError as exc:
            self._sock.close()
            raise SpoolError(f"cannot start the spool's writer process: {exc}") from exc
        finally:
            theirs.close()
        self.pid = self._process.pid
        self._in = bytearray()
        self._out = bytearray()
        self._waiting: deque[_Job] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False  # the loop watches the socket for room (it was full)
        # What the writer reported (its file deleted or replaced; SQLite found it damaged),
        # and why it is gone if it ended while the bridge still needed it.
        self.lost: str | None = None
        self.damaged: str | None = None
        self.ended: str | None = None
        self.reserve_released = self._hello()
        self._sock.setblocking(False)

    def _hello(self) -> bool:
        """Wait for the writer's first answer: the spool is open (and whether the disk's
        reserve was given back for it), or why not."""
        while not (messages := unframe(self._in)):
            data = self._sock.recv(RECEIVE_BYTES)
            if not data:
                self._sock.close()
                status = self._process.wait()
                raise SpoolError(
                    f"the spool's writer process for {self.path} ended at start (exit status "
                    f"{status}): its error is above"
                )
            self._in += data
        kind, detail = cast("tuple[str, Any]", messages[0])
        if kind == "failed":
            self._sock.close()
            self._process.wait()
            raise SpoolError.unwire(detail)
        return cast(bool, detail)

    # --- the event loop's side --------------------------------------------------------------

    def submit(
        self, loop: asyncio.AbstractEventLoop, name: str, args: tuple[object, ...], what: str | None
    ) -> asyncio.Future[Any]:
        future = loop.create_future()
        if self.ended is not None:
            future.set_exception(SpoolError(self.ended))
            return future
        if self._loop is not loop:
            self._attach(loop)
        self._waiting.append(_Job(future, time.monotonic(), what))
        if not self._out and not self._writing:
            loop.call_soon(self._send)
        self._out += frame((name, args))
        return future

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._detach()
        loop.add_reader(self._sock.fileno(), self._readable)
        self._loop = loop
        if self._out:
            loop.add_writer(self._sock.fileno(), self._send)
            self._writing = True

    def _detach(self) -> None:
        loop, self._loop = self._loop, None
        self._writing = False
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._sock.fileno())
            loop.remove_writer(self._sock.fileno())

    def _send(self) -> None:
        """Send what is waiting in one write: the jobs of one turn of the event loop wake the
        writer once, and make one batch. What the socket does not take now goes when the loop
        says it can (the writer stuck on a frozen disk: it waits here, in memory)."""
        if self._loop is None:
            return  # closed meanwhile: close() sent it
        try:
            sent = self._sock.send(self._out) if self._out else 0  # settle() may have sent it
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = len(self._out)  # the writer is gone: its end of file fails every waiter
        del self._out[:sent]
        if bool(self._out) != self._writing:
            self._writing = not self._writing
            if self._writing:
                self._loop.add_writer(self._sock.fileno(), self._send)
            else:
                self._loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        try:
            data = self._sock.recv(RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._gone()
            return
        self._in += data
        self._answered()

    def _answered(self) -> None:
        """Hand every complete answer's outcomes to their waiters, in order."""
        for message in unframe(self._in):
            outcomes, lost, damaged = cast(
                "tuple[list[tuple[object, ops.WireError | None]], str | None, str | None]",
                message,
            )
            self._note(lost, damaged)
            for value, error in outcomes:
                future = self._waiting.popleft().future
                # Done: the waiter was cancelled; the write itself stands (see Spool._acall).
                # RuntimeError: its loop is closed (a close() after it), nobody waits.
                if not future.done():
                    with contextlib.suppress(RuntimeError):
                        if error is None:
                            future.set_result(value)
                        else:
                            future.set_exception(SpoolError.unwire(error))

    def _note(self, lost: str | None, damaged: str | None) -> None:
        """Say once (ERROR, then /readyz) what the writer found wrong with the file."""
        if lost is not None and self.lost is None:
            self.lost = lost
            log.error("spool.file.lost", path=str(self.path), problem=lost)
        if damaged is not None and self.damaged is None:
            self.damaged = damaged
            log.error("spool.file.damaged", path=str(self.path), problem=damaged, help=SALVAGE)

    def _gone(self) -> None:
        """The writer ended while the bridge runs (killed, out of memory): every waiter and
        every later call fails, /readyz says so."""
        self._detach()
        status = self._process.poll()
        self.ended = (
            f"the spool's writer process (pid {self.pid}) ended unexpectedly"
            f"{'' if status is None else f' (exit status {status})'}: nothing more is "
            "queued. Restart the bridge: what is pending stays in the spool"
        )
        log.error("spool.writer.ended", path=str(self.path), pid=self.pid, problem=self.ended)
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        while self._waiting:
            future = self._waiting.popleft().future
            if not future.done():
                with contextlib.suppress(RuntimeError):
                    future.set_exception(SpoolError(self.ended or "the spool is closed"))

    def stalled(self) -> float | None:
        """Seconds the oldest unanswered job has waited, if that is longer than SQLite ever
        takes on a working disk (a frozen or dying one): None otherwise."""
        if not self._waiting:
            return None
        waited = time.monotonic() - self._waiting[0].sent
        return waited if waited > STALLED_AFTER else None

    # --- closing ----------------------------------------------------------------------------

    def close(self, timeout: float | None) -> bool:
        """Send what is left, tell the writer to finish (end of file) and wait for its
        answers and its exit, ``timeout`` seconds at most (blocking: the stop's last step, the
        loop has nothing left to do). When it gives up: ERROR naming every request not known
        to be on disk, then SIGKILL (the writer ends when the disk is back). False then."""
        self._detach()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            finished = self._finish(deadline)
        finally:
            self._sock.close()
        if not finished:
            self._report_unwritten()
            self._process.kill()
        self._fail_waiting()
        return finished

    def _finish(self, deadline: float | None) -> bool:
        try:
            if self.ended is None:
                self._drain(deadline)
            self._process.wait(_left(deadline))
        except (TimeoutError, subprocess.TimeoutExpired):
            return False
        return True

    def _drain(self, deadline: float | None) -> None:
        """Send what is left, close the sending side, take answers until the writer's end
        of file (it closes its end only when it exits)."""
        with contextlib.suppress(ConnectionError):  # gone: the wait for its exit reaps it
            self._send_all(deadline)
            self._sock.shutdown(socket.SHUT_WR)
            while self._receive(deadline):
                pass

    def _send_all(self, deadline: float | None) -> None:
        """Send everything waiting, blocking (until ``deadline``)."""
        self._sock.settimeout(_left(deadline))
        self._sock.sendall(self._out)
        self._out.clear()

    def _receive(self, deadline: float | None) -> bool:
        """Read answers once, blocking (until ``deadline``), and hand them out; False at the
        writer's end of file."""
        self._sock.settimeout(_left(deadline))
        data = self._sock.recv(RECEIVE_BYTES)
        self._in += data
        self._answered()
        return bool(data)

    def settle(self) -> None:
        """Return once every job sent so far is answered: an operator's call (in this
        process, on a connection of its own) sees every write the bridge asked for before it,
        as when both went through one queue."""
        loop = self._loop
        if loop is not None and loop.is_running() and not _running(loop):
            asyncio.run_coroutine_threadsafe(self._all_answered(), loop).result()
            return
        if self.ended is not None:
            return
        # The loop's own thread (or no loop running): nothing else reads the socket while
        # this blocks, so it takes the answers itself.
        try:
            self._send_all(None)
            while self._waiting:
                if not self._receive(None):
                    self._gone()
        except ConnectionError:
            self._gone()
        finally:
            self._sock.setblocking(False)

    async def _all_answered(self) -> None:
        waiting = [job.future for job in self._waiting]
        if waiting:
            await asyncio.wait(waiting)

    def _report_unwritten(self) -> None:
        unwritten = [job.what for job in self._waiting if job.what is not None]
        stalled = self.stalled()
        log.error(
            "spool.unwritten",
            path=str(self.path),
            writer=self.pid,
            stalled_for=None if stalled is None else round(stalled, 1),
            count=len(unwritten),
            requests=unwritten,
            help="the disk took no write: these may not be in the spool; once it is back, "
            "`agi-bridge spool list` shows what is, `agi-bridge send` sends what is not. The "
            f"writer process (pid {self.pid}) is killed: it ends only then, and holds the "
            "data_dir lock until it does",
        )


def _running(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread is running ``loop``."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (None: no deadline); TimeoutError once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


class Spool:
    """Durable queue of NoojeeContact requests. ``open()`` before use, ``close()`` after."""

    def __init__(
        self, directory: Path, *, fsync: bool = True, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = directory / SPOOL_FILE
        self._fsync = fsync
        self._clock = clock
        self._opened = False
        # The bridge's writes: the writer process (open() with create, the default).
        self._writer: _Writer | None = None
        # The operator's blocking calls (:class:`SpoolAdmin`) run in the calling process, on a
        # connection of their own: opened by open(create=False) (the CLI), else at first use.
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        # While the disk takes no write (full): entries claimed without writing their lease,
        # held here until then (id -> epoch seconds), and entries settled (delivered, a stop
        # NoojeeContact no longer knows, or one it refused for good) whose record the disk
        # refused: id -> that write (its operation's name and its arguments after the id),
        # written by a later claim (see _unless_full).
        self._held: dict[int, float] = {}
        self._settled: dict[int, tuple[str, tuple[object, ...]]] = {}

    @property
    def lost(self) -> str | None:
        """Why the file the writer writes is no longer the one at ``path`` (deleted or
        replaced under us), once it noticed: from then on every operation fails with it."""
        return None if self._writer is None else self._writer.lost

    @property
    def damaged(self) -> str | None:
        """What SQLite found wrong with the file (a corrupt page), at open or since."""
        return None if self._writer is None else self._writer.damaged

    # --- lifecycle ------------------------------------------------------------------------

    def open(self, *, create: bool = True, inherit: Sequence[int] = ()) -> None:
        """Create the directory and the database, fail loudly if either is not writable, and
        start the writer process; it keeps the file descriptors ``inherit`` open (the
        data_dir lock: held until the writer is gone). ``create=False`` (the operator's
        commands): the spool must exist already, so a mistyped data directory is an error
        instead of an empty spool that shows nothing; no writer, only :attr:`admin`."""
        if self._opened:
            raise SpoolError(f"the spool at {self.path} is already open")
        if not create:
            if not self.path.is_file():
                raise SpoolError(
                    f"no spool at {self.path}: check data_dir (the bridge creates the spool "
                    "when it first starts)"
                )
            self._db = ops.connect(str(self.path), fsync=self._fsync, migrate=False)
        else:
            self._writer = _Writer(self.path, fsync=self._fsync, inherit=inherit)
            if self._writer.reserve_released:
                log.warning(
                    "spool.reserve.released",
                    path=ops.reserve_path(str(self.path)),
                    help="the spool's disk is full: free space on it (the reserve is set "
                    "aside again at the next start)",
                )
        self._opened = True

    def close(self, timeout: float | None = None) -> bool:
        """Finish every queued write, then close the database; give up waiting for that
        after ``timeout`` seconds, naming at ERROR every request not known to be on disk then
        (a frozen or dead disk), and kill the writer (it ends when the disk is back). False
        when it gave up."""
        closed = True
        if self._writer is not None:
            closed = self._writer.close(timeout)
            self._writer = None
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        self._opened = False
        return closed

    def stalled(self) -> float | None:
        """Seconds the oldest write in hand has waited, if that is longer than SQLite ever
        takes on a working disk (a frozen or dying one): None otherwise."""
        return None if self._writer is None else self._writer.stalled()

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid while the spool is open for the bridge."""
        return None if self._writer is None else self._writer.pid

    def _acall(
        self,
        op: Callable[[sqlite3.Connection, *Args], T],
        *args: *Args,
        what: str | None = None,
    ) -> asyncio.Future[T]:
        """Send ``op(db, *args)`` to the writer (storing the request ``what``, if any); the
        returned future completes once it is committed. Cancelling the waiter does not undo
        the write: a stop stored for a session cut short by shutdown is still delivered, and
        a delivery made is still recorded (not sent again)."""
        loop = asyncio.get_running_loop()
        if self._writer is None:
            raise SpoolError("the spool is not open")
        stalled = self._writer.stalled()
        if what is not None and stalled is not None:
            # Not queued behind a write the disk holds: the caller hears FAILED now, not in 5 s.
            future: asyncio.Future[T] = loop.create_future()
            future.set_exception(SpoolError(f"the disk took no write for {stalled:.0f} s"))
            return future
        return self._writer.submit(loop, op.__name__, tuple(args), what)

    def _scall(self, op: Callable[[sqlite3.Connection, *Args], T], *args: *Args) -> T:
        """Run ``op(db, *args)`` in this process and commit (the operator's blocking calls),
        after every write sent to the writer before it."""
        if not self._opened:
            raise SpoolError("the spool is not open")
        if self._writer is not None:
            self._writer.settle()
        with self._db_lock:
            if self._db is None:
                self._db = ops.connect(str(self.path), fsync=self._fsync, migrate=False)
            [(value, error)] = ops.execute(self._db, [(op, tuple(args))])
        if error is not None:
            raise error
        return cast(T, value)

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
        what = f"{request.action} {request.target} agent={request.agent} call={call_uniqueid}"
        return self._acall(
            ops.add, _fields(request), call_uniqueid, self._clock(), lease, attempted, what=what
        )

    async def release_leases(self) -> int:
        """Make every pending entry due now. Called once when the bridge starts: no attempt of
        this process is in flight yet, so leases left by a process that was killed are stale,
        and waiting them out would only delay the replay."""
        return await self._acall(ops.release_leases, self._clock())

    async def settle_interrupted(self, error: str) -> list[SpoolEntry]:
        """Settle as unconfirmed every start marked attempted, and return them. Called once
        when the bridge starts, before anything is sent: such a start was on its way when the
        last process ended (killed, or stopped before its answer came) and may have reached
        NoojeeContact, so it must not be sent again."""
        return _entries(await self._acall(ops.settle_interrupted, error, self._clock()))

    async def by_extension(self) -> list[SpoolEntry]:
        """The pending requests by extension, oldest first."""
        return _entries(await self._acall(ops.by_extension))

    def cancel_by_extension(self, call_uniqueid: str, error: str) -> asyncio.Future[list[int]]:
        """Settle as cancelled what is still queued by extension for call ``call_uniqueid``
        and not on its way (a start being sent is settled by its attempt); return their ids."""
        return self._acall(ops.cancel_by_extension, call_uniqueid, error, self._clock())

    def remove(self, entry_id: int) -> asyncio.Future[None]:
        """Delete an entry that left (delivered, or a stop NoojeeContact no longer knows).
        Callers need not wait for the future: a crash before the commit only means one harmless
        redelivery. On a disk that takes no write the entry is forgotten in memory (never
        claimed again by this process) and deleted once it can."""
        return self._unless_full(ops.remove, entry_id, settles=True)

    def _unless_full(
        self,
        op: Callable[[sqlite3.Connection, int, *Args], None],
        entry_id: int,
        *args: *Args,
        settles: bool,
    ) -> asyncio.Future[None]:
        """Send ``op(db, entry_id, *args)``, except that its failure for want of room (a full
        disk) is not the caller's: what it decided stands, only its record waits. A write that
        ``settles`` the entry is held in memory (the entry is never claimed again by this
        process, nor expired as idle) and written by a later claim; a failed attempt's count
        is simply not written, and the entry is tried again once its lease ends.

        A restart forgets what memory holds, and that is accepted: on a disk still full, a
        settled entry is pending again and its next attempt settles it again (a stop may be
        sent once more, as stops are at least once; a request by extension past its age is not
        sent); a start is marked attempted on disk before it is sent, and
        ``settle_interrupted`` settles it as ever."""
        write = self._acall(op, entry_id, *args)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle(write: asyncio.Future[None]) -> None:
            error = write.exception()
            if error is not None and full(error):
                log.warning(
                    "spool.write.deferred", id=entry_id, write=op.__name__, error=str(error)
                )
                if settles:
                    self._settled[entry_id] = (op.__name__, args)
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
        stops are claimed: a stop sent twice is harmless, a start is not (it waits). What the
        full disk did not take of earlier settlements is written first, once it can be."""
        now = self._clock()
        settled = [(name, i, args) for i, (name, args) in self._settled.items()]
        if settled:
            with contextlib.suppress(SpoolError):  # the disk still full: at the next claim
                await self._acall(ops.record_settled, settled)
                for _, entry_id, _ in settled:
                    del self._settled[entry_id]
        try:
            entries = _entries(await self._acall(ops.claim, now, limit, lease))
        except SpoolError as exc:
            if not full(exc):
                raise
            entries = await self._claim_held(now, limit, lease)
        return [entry for entry in entries if entry.id not in self._settled]

    async def _claim_held(self, now: float, limit: int, lease: float) -> list[SpoolEntry]:
        """Due stops, leased in memory: claiming writes nothing."""
        self._held = {i: until for i, until in self._held.items() if until > now}
        skip = self._held.keys() | self._settled.keys()
        due = _entries(await self._acall(ops.due_stops, now, limit + len(skip)))
        entries = [entry for entry in due if entry.id not in skip][:limit]
        for entry in entries:
            self._held[entry.id] = now + lease
        return entries

    async def next_due(self) -> float | None:
        """When the earliest pending entry becomes due (epoch seconds), None when empty."""
        return await self._acall(ops.next_due)

    async def where(
        self, entry_id: int
    ) -> tuple[Literal["pending", "dead"], str | None, SettleReason | None] | None:
        """Which table holds entry ``entry_id``, its last error and (dead letters) why it was
        settled; None when neither does (delivered, or purged by the operator). A settlement
        the full disk has not taken yet counts as written: a repeat hears what was decided."""
        held = self._settled.get(entry_id)
        if held is not None:
            name, args = held
            if name == ops.move_to_dead.__name__:
                error, reason = args[0], args[1]
                return "dead", cast(str, error), cast(SettleReason, reason)
            return None  # removed: the repeat cache knows why
        return await self._acall(ops.where, entry_id)

    def reschedule(self, entry_id: int, error: str, *, retry_at: float) -> asyncio.Future[None]:
        """Count a failed attempt and set when to try again (for a start: one that certainly
        never reached NoojeeContact, so it may be sent again). On a full disk: uncounted,
        tried again when its lease ends (a start stays marked attempted: never resent)."""
        return self._unless_full(ops.reschedule, entry_id, error, retry_at, settles=False)

    def expire_if_idle(self, entry_id: int, error: str) -> asyncio.Future[bool]:
        """Settle pending entry ``entry_id`` as expired unless it is on its way (leased to an
        attempt, or a start marked attempted): True when it did. In one job, so that the worker
        cannot claim it between the look and the move."""
        now = self._clock()
        on_its_way = self._held.get(entry_id, 0.0) > now or entry_id in self._settled
        if on_its_way:  # a full disk's claims and settlements are held in memory
            settled: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            settled.set_result(False)
            return settled
        return self._acall(ops.expire_if_idle, entry_id, error, now)

    def dead_letter(
        self,
        entry_id: int,
        error: str,
        *,
        attempted: bool = True,
        reason: SettleReason = "failed",
    ) -> asyncio.Future[None]:
        """Move an entry to the dead letters with ``error`` and ``reason``; ``attempted``
        counts this try. On a disk that takes no write (full) the move is held in memory and
        written once it can (the entry is settled: never claimed again by this process)."""
        now = self._clock()
        return self._unless_full(
            ops.move_to_dead, entry_id, error, reason, int(attempted), now, settles=True
        )

    async def stats(self) -> SpoolStats:
        return SpoolStats(*await self._acall(ops.stats))

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
            await self._acall(ops.probe, self._clock())
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
    delivery path's calls are futures and coroutines, these return once committed."""

    def __init__(self, spool: Spool) -> None:
        self._call = spool._scall
        self._clock = spool._clock

    def list(self, table: Literal["pending", "dead"]) -> list[SpoolEntry]:
        return _entries(self._call(ops.listing, table))

    def stats(self) -> SpoolStats:
        return SpoolStats(*self._call(ops.stats))

    def retry_dead(
        self, ids: Iterable[int] | None = None, *, force: bool = False
    ) -> tuple[int, ...]:
        """Move dead letters (all, or ``ids``) back to pending with a fresh attempt count and
        a fresh age, and return their ids. They keep their ids, so a following ``purge`` by id
        finds them. Without ``force``, an unconfirmed start (resending it may add a recording
        leg) or any request by extension (whatever made it a dead letter, it would act on
        whatever call the extension is on now) is refused: :class:`SpoolError` naming them and
        why."""
        selected = None if ids is None else list(ids)
        return self._call(ops.retry_dead, selected, force, self._clock())

    def purge(self, table: Literal["pending", "dead"], ids: Iterable[int] | None = None) -> int:
        """Delete entries for good (all of ``table``, or ``ids``)."""
        return self._call(ops.purge, table, None if ids is None else list(ids))
