"""The durable spool: SQLite in WAL mode, leases, dead letters, and surviving kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agi_bridge import spool_writer
from agi_bridge.spool import SPOOL_FILE, WRITER_COMMAND, Spool, SpoolError
from agi_bridge.spool_writer import unframe
from agi_bridge.vocabulary import ACTIONS, RecordingRequest

STOP = RecordingRequest("stop", "410", agent="Fred")
START = RecordingRequest("start", "1795811316.1", agent=None, tag="CRM-42")


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def spool(tmp_path: Path, clock: FakeClock) -> Iterator[Spool]:
    spool = Spool(tmp_path / "data", fsync=False, clock=clock)
    spool.open()
    yield spool
    spool.close()


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_add_then_claim(spool: Spool, clock: FakeClock) -> None:
    """An added request comes back from claim_due with everything it was stored with."""
    first = await spool.add(STOP, call_uniqueid="1.1")
    second = await spool.add(START, call_uniqueid="1.2")
    assert second > first
    entries = await spool.claim_due(limit=10, lease=30)
    assert [(e.id, e.request, e.call_uniqueid) for e in entries] == [
        (first, STOP, "1.1"),
        (second, START, "1.2"),
    ]
    assert all(e.created == clock.now and e.attempts == 0 for e in entries)
    assert all(e.last_error is None for e in entries)


async def test_claim_respects_limit_and_order(spool: Spool) -> None:
    """claim_due returns at most ``limit`` entries, oldest first; the rest stay due."""
    ids = [await spool.add(STOP, call_uniqueid=f"1.{n}") for n in range(5)]
    assert [e.id for e in await spool.claim_due(limit=2, lease=30)] == ids[:2]
    assert [e.id for e in await spool.claim_due(limit=10, lease=30)] == ids[2:]


async def test_add_lease_delays_the_first_claim(spool: Spool, clock: FakeClock) -> None:
    """An entry added with a lease is not due until that lease has passed."""
    entry_id = await spool.add(STOP, call_uniqueid="1.1", lease=5)
    assert await spool.next_due() == clock.now + 5
    assert await spool.claim_due(limit=10, lease=30) == []
    clock.now += 5
    assert [e.id for e in await spool.claim_due(limit=10, lease=30)] == [entry_id]


async def test_claimed_entry_not_claimed_again_before_lease_ends(
    spool: Spool, clock: FakeClock
) -> None:
    """A claimed entry is leased: invisible to claim_due until the lease runs out, then due."""
    entry_id = await spool.add(STOP, call_uniqueid="1.1")
    assert [e.id for e in await spool.claim_due(limit=10, lease=30)] == [entry_id]
    assert await spool.claim_due(limit=10, lease=30) == []
    clock.now += 29.9
    assert await spool.claim_due(limit=10, lease=30) == []
    assert await spool.next_due() == pytest.approx(clock.now + 0.1)
    clock.now += 0.1
    assert [e.id for e in await spool.claim_due(limit=10, lease=30)] == [entry_id]


async def test_delivered_removes(spool: Spool, clock: FakeClock) -> None:
    """A delivered entry is gone for good: never claimed again, not counted."""
    entry_id = await spool.add(STOP, call_uniqueid="1.1")
    kept = await spool.add(STOP, call_uniqueid="1.2")  # a stop: its lease runs out, it comes back
    await spool.claim_due(limit=10, lease=1)
    await spool.remove(entry_id)
    clock.now += 10
    assert [e.id for e in await spool.claim_due(limit=10, lease=1)] == [kept]
    assert (await spool.stats()).pending == 1


async def test_failed_counts_attempt_and_sets_retry_time(spool: Spool, clock: FakeClock) -> None:
    """failed() increments attempts, keeps the error and makes the entry due at retry_at."""
    entry_id = await spool.add(STOP, call_uniqueid="1.1")
    await spool.claim_due(limit=10, lease=30)
    await spool.reschedule(entry_id, "HTTP 503", retry_at=clock.now + 2)
    assert await spool.next_due() == clock.now + 2
    assert await spool.claim_due(limit=10, lease=30) == []
    clock.now += 2
    await spool.reschedule(entry_id, "timeout", retry_at=clock.now)
    (entry,) = await spool.claim_due(limit=10, lease=30)
    assert (entry.id, entry.attempts, entry.last_error) == (entry_id, 2, "timeout")


async def test_dead_letter_moves_with_error_and_attempts(spool: Spool, clock: FakeClock) -> None:
    """dead_letter moves the entry to the dead table with its last error and attempt count."""
    entry_id = await spool.add(STOP, call_uniqueid="1.1")
    other = await spool.add(START, call_uniqueid="1.2")
    await spool.reschedule(entry_id, "HTTP 503", retry_at=clock.now)
    await spool.dead_letter(entry_id, "Permission denied")
    await spool.dead_letter(other, "too old", attempted=False)
    assert spool.admin.list("pending") == []
    dead = {e.id: e for e in spool.admin.list("dead")}
    assert dead[entry_id].request == STOP
    assert dead[entry_id].call_uniqueid == "1.1"
    assert (dead[entry_id].attempts, dead[entry_id].last_error) == (2, "Permission denied")
    assert (dead[other].attempts, dead[other].last_error) == (0, "too old")
    assert await spool.claim_due(limit=10, lease=30) == []
    stats = await spool.stats()
    assert (stats.pending, stats.dead) == (0, 2)


async def test_retry_dead_moves_back(spool: Spool, clock: FakeClock) -> None:
    """retry_dead puts dead letters back as fresh pending entries, due now, under their ids."""
    ids = [await spool.add(STOP, call_uniqueid=f"1.{n}") for n in range(3)]
    for entry_id in ids:
        await spool.reschedule(entry_id, "HTTP 500", retry_at=clock.now)
        await spool.dead_letter(entry_id, "HTTP 500")
    clock.now += 100
    assert spool.admin.retry_dead([ids[1]]) == (ids[1],)
    assert [e.call_uniqueid for e in spool.admin.list("dead")] == ["1.0", "1.2"]
    (entry,) = await spool.claim_due(limit=10, lease=30)
    assert entry.request == STOP
    assert entry.call_uniqueid == "1.1"
    assert entry.id == ids[1]  # `spool purge ID` after `spool retry ID` finds it
    assert entry.attempts == 0  # a fresh start: the bounded retries begin again
    assert entry.created == clock.now  # and so does the maximum age
    assert entry.last_error == "HTTP 500"  # the operator can still see why it died
    assert spool.admin.retry_dead() == (ids[0], ids[2])
    assert spool.admin.list("dead") == []
    assert [e.id for e in spool.admin.list("pending")] == ids


async def test_retry_or_purge_of_an_unknown_id_changes_nothing(
    spool: Spool, clock: FakeClock
) -> None:
    """An id that is not in the table is an error naming it; the other ids are not touched."""
    ids = [await spool.add(STOP, call_uniqueid=f"1.{n}") for n in range(2)]
    await spool.dead_letter(ids[1], "HTTP 500")
    with pytest.raises(SpoolError, match=rf"^no dead letter with id {ids[0]}, 999: "):
        spool.admin.retry_dead([ids[1], ids[0], 999])
    with pytest.raises(SpoolError, match=rf"^no pending entry with id {ids[1]}: "):
        spool.admin.purge("pending", [ids[0], ids[1]])
    assert [e.id for e in spool.admin.list("pending")] == [ids[0]]
    assert [e.id for e in spool.admin.list("dead")] == [ids[1]]


async def test_purge(spool: Spool, clock: FakeClock) -> None:
    """purge deletes the named entries, or the whole table, and says how many."""
    ids = [await spool.add(STOP, call_uniqueid=f"1.{n}") for n in range(4)]
    await spool.dead_letter(ids[3], "dead")
    assert spool.admin.purge("pending", [ids[0], ids[2]]) == 2
    assert [e.id for e in spool.admin.list("pending")] == [ids[1]]
    assert spool.admin.purge("dead") == 1
    assert spool.admin.list("dead") == []
    assert spool.admin.purge("pending") == 1
    assert spool.admin.stats().pending == 0


async def test_stats(spool: Spool, clock: FakeClock) -> None:
    """stats counts pending and dead entries and gives the oldest pending creation time."""
    empty = await spool.stats()
    assert (empty.pending, empty.dead, empty.oldest_pending) == (0, 0, None)
    first_created = clock.now
    first = await spool.add(STOP, call_uniqueid="1.1")
    clock.now += 60
    await spool.add(STOP, call_uniqueid="1.2")
    dead = await spool.add(STOP, call_uniqueid="1.3")
    await spool.dead_letter(dead, "x")
    stats = await spool.stats()
    assert (stats.pending, stats.dead, stats.oldest_pending) == (2, 1, first_created)
    await spool.remove(first)
    assert (await spool.stats()).oldest_pending == first_created + 60
    assert spool.admin.stats() == await spool.stats()


async def test_no_problems_on_a_healthy_spool(spool: Spool) -> None:
    """problems() is empty on an open spool with room on its disk."""
    assert await spool.problems() == []


async def test_closed_spool_reports_a_problem(tmp_path: Path) -> None:
    """problems() on a spool that cannot write says so with its path."""
    spool = Spool(tmp_path)
    [problem] = await spool.problems()
    assert problem.startswith(f"spool {tmp_path / 'spool.sqlite3'} is not writable")


async def test_persists_across_close_and_reopen(tmp_path: Path, clock: FakeClock) -> None:
    """Pending entries, dead letters and attempt counts survive close() and a new Spool."""
    first = Spool(tmp_path, clock=clock)
    first.open()
    kept = await first.add(START, call_uniqueid="1.1")
    dead = await first.add(STOP, call_uniqueid="1.2")
    await first.reschedule(kept, "HTTP 503", retry_at=clock.now)
    await first.dead_letter(dead, "Permission denied")
    first.close()

    second = Spool(tmp_path, clock=clock)
    second.open()
    try:
        (entry,) = await second.claim_due(limit=10, lease=30)
        assert (entry.id, entry.request, entry.attempts, entry.last_error) == (
            kept,
            START,
            1,
            "HTTP 503",
        )
        assert [(e.id, e.last_error) for e in second.admin.list("dead")] == [
            (dead, "Permission denied")
        ]
        # ids are never reused, so a dead letter and a new entry cannot be confused
        assert await second.add(STOP, call_uniqueid="1.3") > dead
    finally:
        second.close()


def test_survives_sigkill_right_after_add(tmp_path: Path) -> None:
    """Every add() that returned is on disk even if the process is killed at once (kill -9)."""
    count = 50
    result = run_python(
        """
        import asyncio, os, signal, sys
        from pathlib import Path
        from agi_bridge.spool import Spool
        from agi_bridge.vocabulary import RecordingRequest

        async def main() -> None:
            spool = Spool(Path(sys.argv[1]))
            spool.open()
            await asyncio.gather(*(
                spool.add(RecordingRequest("stop", str(n), agent="Fred"), call_uniqueid=f"1.{n}")
                for n in range(int(sys.argv[2]))
            ))
            print("done", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no flush

        asyncio.run(main())
        """,
        str(tmp_path),
        str(count),
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout == "done\n"
    spool = Spool(tmp_path)
    spool.open()
    try:
        entries = spool.admin.list("pending")
    finally:
        spool.close()
    assert sorted(int(e.request.target) for e in entries) == list(range(count))
    assert all(e.request.agent == "Fred" for e in entries)


async def test_an_operators_call_sees_every_write_asked_for_before_it(spool: Spool) -> None:
    """spool.admin, on the event loop's thread or another, sees the writes sent before it even
    when nobody waited for them (a stop written ahead at shutdown, then listed)."""
    spool.add(STOP, call_uniqueid="1.1")  # not awaited
    assert [e.call_uniqueid for e in spool.admin.list("pending")] == ["1.1"]
    spool.add(STOP, call_uniqueid="1.2")
    pending = await asyncio.to_thread(spool.admin.list, "pending")
    assert [e.call_uniqueid for e in pending] == ["1.1", "1.2"]


def test_the_writer_ends_when_the_bridge_is_killed(tmp_path: Path) -> None:
    """kill -9 of the bridge: its writer process reads end of file, commits what it was sent
    and exits, leaving no orphan behind."""
    result = run_python(
        """
        import asyncio, os, signal, sys
        from pathlib import Path
        from agi_bridge.spool import Spool
        from agi_bridge.vocabulary import RecordingRequest

        async def main() -> None:
            spool = Spool(Path(sys.argv[1]))
            spool.open()
            await spool.add(RecordingRequest("stop", "1", agent="Fred"), call_uniqueid="1.1")
            print(spool.writer_pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """,
        str(tmp_path),
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    writer = int(result.stdout)
    try:
        pidfd = os.pidfd_open(writer)
    except ProcessLookupError:
        return  # gone and reaped already
    try:
        assert select.select([pidfd], [], [], 10)[0] == [pidfd], f"writer {writer} still runs"
    finally:
        os.close(pidfd)


def test_the_writer_imports_only_the_standard_library(tmp_path: Path) -> None:
    """The writer process, run as the bridge runs it, loads nothing of ours but its module and
    none of typing, dataclasses, pathlib, pickle or socket: its memory is a bare Python's with
    sqlite3."""
    ours, theirs = socket.socketpair()
    arguments = (str(theirs.fileno()), str(tmp_path / SPOOL_FILE), "0")
    with ours, theirs:
        process = subprocess.Popen(
            [sys.executable, "-X", "importtime", *WRITER_COMMAND[1:], *arguments],
            pass_fds=(theirs.fileno(),),
            stderr=subprocess.PIPE,
            text=True,
        )
        theirs.close()
        assert unframe(bytearray(ours.recv(1024))) == [("ready", False)]
        ours.shutdown(socket.SHUT_WR)  # the bridge's stop: the writer exits
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "sqlite3" in imported  # the trace is there: the check below can fail
    heavy = {"typing", "dataclasses", "pathlib", "pickle", "inspect", "re", "socket"}
    ours = {"agi_bridge", "agi_bridge.spool_writer"}
    assert {m for m in imported if m in heavy or m.startswith("agi_bridge")} == ours


def test_the_writer_knows_every_action() -> None:
    """The writer's actions (it does not import the vocabulary) are the vocabulary's."""
    assert set(spool_writer.ACTIONS) == set(ACTIONS)


async def test_a_writer_that_dies_fails_its_waiters_and_every_later_call(spool: Spool) -> None:
    """The writer process killed under a running bridge: what waits for it and every later
    call fail with SpoolError saying so, and problems() reports it (/readyz not ready)."""
    await spool.add(STOP, call_uniqueid="1.1")
    assert spool.writer_pid is not None
    os.kill(spool.writer_pid, signal.SIGKILL)
    # Sent to a writer that will never read it (a SIGKILLed process runs no more code).
    with pytest.raises(SpoolError, match=r"writer process \(pid \d+\) ended unexpectedly"):
        await asyncio.wait_for(spool.add(STOP, call_uniqueid="1.2"), timeout=10)
    with pytest.raises(SpoolError, match="ended unexpectedly"):
        await spool.stats()
    [problem] = await spool.problems()
    assert problem.startswith(f"spool {spool.path} is not writable: ")
    assert "ended unexpectedly" in problem


async def test_second_process_reads_while_open(tmp_path: Path, clock: FakeClock) -> None:
    """Another process (the CLI next to a running bridge) reads the spool while it is open."""
    spool = Spool(tmp_path, clock=clock)
    spool.open()
    try:
        await spool.add(STOP, call_uniqueid="1.1")
        await spool.add(START, call_uniqueid="1.2")
        # Hold a read transaction open on this side too, as a busy server would.
        reader = sqlite3.connect(tmp_path / SPOOL_FILE)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM pending").fetchone() == (2,)
            result = await asyncio.to_thread(
                run_python,
                """
                import sqlite3, sys
                from pathlib import Path
                from agi_bridge.spool import Spool
                spool = Spool(Path(sys.argv[1]))
                spool.open()
                admin = spool.admin
                print(admin.stats().pending, [e.call_uniqueid for e in admin.list("pending")])
                spool.close()
                db = sqlite3.connect(Path(sys.argv[1]) / "spool.sqlite3")
                print(db.execute("PRAGMA journal_mode").fetchone()[0])
                db.close()
                """,
                str(tmp_path),
            )
        finally:
            reader.close()
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["2 ['1.1', '1.2']", "wal"]
        # and this process carries on writing afterwards
        await spool.add(STOP, call_uniqueid="1.3")
        assert (await spool.stats()).pending == 3
    finally:
        spool.close()


def test_unwritable_directory_is_a_spool_error(tmp_path: Path) -> None:
    """A data directory that cannot be created fails open() with the path in the message."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the data directory should be")
    spool = Spool(blocker / "data")
    with pytest.raises(SpoolError) as caught:
        spool.open()
    assert str(blocker / "data" / SPOOL_FILE) in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_a_spool_error(tmp_path: Path) -> None:
    """A data directory without write permission fails open() with the path in the message."""
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        spool = Spool(directory)
        with pytest.raises(SpoolError, match=str(directory)):
            spool.open()
    finally:
        directory.chmod(0o700)


def test_use_before_open_is_a_spool_error(tmp_path: Path) -> None:
    """Calls on a spool that is not open fail with SpoolError rather than hanging."""
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError, match="not open"):
        spool.admin.list("pending")
    spool.open()
    spool.close()
    with pytest.raises(SpoolError, match="not open"):
        spool.admin.stats()


async def test_group_commit_many_concurrent_adds_all_durable(tmp_path: Path) -> None:
    """Hundreds of concurrent adds (committed in groups) all get distinct ids and all persist."""
    count = 500
    spool = Spool(tmp_path)  # fsync on: the production setting
    spool.open()
    try:
        ids = await asyncio.gather(*(spool.add(STOP, call_uniqueid=f"1.{n}") for n in range(count)))
    finally:
        spool.close()
    assert len(set(ids)) == count
    reopened = Spool(tmp_path)
    reopened.open()
    try:
        entries = reopened.admin.list("pending")
    finally:
        reopened.close()
    assert sorted(e.id for e in entries) == sorted(ids)
    assert {e.call_uniqueid for e in entries} == {f"1.{n}" for n in range(count)}


async def test_one_failing_write_does_not_sink_its_group(tmp_path: Path) -> None:
    """A write that fails inside a group commit fails alone; the others are committed."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    try:
        results = await asyncio.gather(
            *(spool.add(STOP, call_uniqueid=f"1.{n}") for n in range(50)),
            spool.add(STOP, call_uniqueid=None),  # type: ignore[arg-type]  # NOT NULL
            *(spool.add(STOP, call_uniqueid=f"2.{n}") for n in range(50)),
            return_exceptions=True,
        )
    finally:
        spool.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], SpoolError)
    assert "NOT NULL" in str(errors[0])
    spool.open()
    try:
        assert spool.admin.stats().pending == 100
    finally:
        spool.close()


async def test_corrupt_row_is_an_error_not_a_hang(spool: Spool) -> None:
    """A row the code cannot read fails that call with SpoolError; the spool keeps working."""
    await spool.add(STOP, call_uniqueid="1.1")
    db = sqlite3.connect(spool.path)
    try:
        with db:
            db.execute("UPDATE pending SET action = 'pause'")
    finally:
        db.close()
    with pytest.raises(SpoolError, match="action must be"):
        await asyncio.wait_for(spool.claim_due(limit=10, lease=30), timeout=10)
    # The lease of the failed claim was rolled back with it, and later calls are served.
    await asyncio.wait_for(spool.add(START, call_uniqueid="1.2"), timeout=10)
    assert (await spool.stats()).pending == 2


# --- schema 1: starts at most once, target kinds, settle reasons ------------------------------

FIXTURES = Path(__file__).parent / "fixtures"
EXT_STOP = RecordingRequest("stop", "410", agent="Fred", kind="extension")


async def test_a_claimed_start_is_never_claimed_again(spool: Spool, clock: FakeClock) -> None:
    """A start is marked attempted in the commit that claims it: its lease running out does
    not bring it back (a stop does come back)."""
    start = await spool.add(START, call_uniqueid="1.1")
    stop = await spool.add(STOP, call_uniqueid="1.2")
    assert [e.id for e in await spool.claim_due(limit=10, lease=1)] == [start, stop]
    clock.now += 10
    assert [e.id for e in await spool.claim_due(limit=10, lease=1)] == [stop]
    assert await spool.next_due() == clock.now + 1  # the start is not waited for either


async def test_a_start_that_certainly_never_left_may_be_claimed_again(
    spool: Spool, clock: FakeClock
) -> None:
    """failed() is for a failure before sending: it clears the attempted mark."""
    start = await spool.add(START, call_uniqueid="1.1")
    await spool.claim_due(limit=10, lease=30)
    await spool.reschedule(start, "cannot connect: Connection refused", retry_at=clock.now)
    assert [e.id for e in await spool.claim_due(limit=10, lease=30)] == [start]


async def test_starts_on_their_way_at_start_up_are_settled_unconfirmed(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A process that dies with a start claimed (or written ahead) leaves it attempted: the
    next one settles it unconfirmed and never sends it; stops are replayed."""
    first = Spool(tmp_path, fsync=False, clock=clock)
    first.open()
    claimed = await first.add(START, call_uniqueid="1.1")
    await first.claim_due(limit=10, lease=30)
    ahead = await first.add(START, call_uniqueid="1.2", lease=8, attempted=True)
    stop = await first.add(STOP, call_uniqueid="1.3", lease=8)
    first.close()  # as good as kill -9 here: nothing more was written

    second = Spool(tmp_path, fsync=False, clock=clock)
    second.open()
    try:
        settled = await second.settle_interrupted("on its way when the bridge stopped")
        assert [e.id for e in settled] == [claimed, ahead]
        await second.release_leases()
        assert [e.id for e in await second.claim_due(limit=10, lease=30)] == [stop]
        dead = second.admin.list("dead")
        assert [(e.id, e.reason) for e in dead] == [
            (claimed, "unconfirmed"),
            (ahead, "unconfirmed"),
        ]
        assert (await second.stats()).dead == 2  # they need a human: counted
    finally:
        second.close()


async def test_the_calls_own_stop_cancels_what_it_queued_by_extension(
    spool: Spool, clock: FakeClock
) -> None:
    """cancel_by_extension settles that call's requests by extension (not other calls', not
    by uniqueid, not a start on its way); expired/cancelled need nobody (not counted)."""
    mine = await spool.add(EXT_STOP, call_uniqueid="1.1")
    other_call = await spool.add(EXT_STOP, call_uniqueid="1.2")
    by_id = await spool.add(STOP, call_uniqueid="1.1")
    assert await spool.cancel_by_extension("1.1", "cancelled") == [mine]
    assert [e.id for e in await spool.claim_due(limit=10, lease=30)] == [other_call, by_id]
    assert [(e.id, e.reason, e.request.kind) for e in spool.admin.list("dead")] == [
        (mine, "cancelled", "extension")
    ]
    assert (await spool.stats()).dead == 0


async def test_retry_refuses_unconfirmed_and_expired_by_extension_without_force(
    spool: Spool, clock: FakeClock
) -> None:
    """retry of an unconfirmed start or an expired request by extension is refused, saying
    why, and changes nothing; --force moves it back with a fresh age and no attempted mark."""
    start = await spool.add(START, call_uniqueid="1.1")
    await spool.claim_due(limit=10, lease=30)
    await spool.dead_letter(start, "read timeout", reason="unconfirmed")
    late = await spool.add(EXT_STOP, call_uniqueid="1.2")
    await spool.dead_letter(late, "expired", reason="expired")
    refused = await spool.add(STOP, call_uniqueid="1.3")
    await spool.dead_letter(refused, "Permission denied")
    with pytest.raises(SpoolError) as caught:
        await asyncio.to_thread(spool.admin.retry_dead)
    assert f"{start}: unconfirmed start" in str(caught.value)
    assert f"{late}: expired request by extension" in str(caught.value)
    assert "--force" in str(caught.value)
    assert len(spool.admin.list("dead")) == 3
    assert await asyncio.to_thread(spool.admin.retry_dead, [refused]) == (refused,)
    clock.now += 100
    assert await asyncio.to_thread(spool.admin.retry_dead, force=True) == (start, late)
    assert [e.id for e in await spool.claim_due(limit=10, lease=30)] == [start, late, refused]
    assert {e.created for e in spool.admin.list("pending")} >= {clock.now}


async def test_retry_refuses_any_request_by_extension_without_force(spool: Spool) -> None:
    """A request by extension NoojeeContact refused (a bad certificate, a permission) is not
    sent again by a plain retry either: hours later it would act on the extension's next call."""
    refused = await spool.add(EXT_STOP, call_uniqueid="1.2")
    await spool.dead_letter(refused, "Permission denied")
    with pytest.raises(SpoolError) as caught:
        await asyncio.to_thread(spool.admin.retry_dead)
    assert f"{refused}: request by extension refused by NoojeeContact" in str(caught.value)
    assert [e.id for e in spool.admin.list("dead")] == [refused]
    assert await asyncio.to_thread(spool.admin.retry_dead, force=True) == (refused,)


async def test_a_dead_start_of_the_previous_release_is_unconfirmed(tmp_path: Path) -> None:
    """The previous release resent starts after timeouts before dead-lettering them: migrated,
    its dead starts are unconfirmed, and a plain retry refuses them."""
    path = tmp_path / SPOOL_FILE
    path.write_bytes((FIXTURES / "spool-v0.sqlite3").read_bytes())
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(dead)") if row[1] != "id"]
        copied = ", ".join(c if c != "action" else "'start'" for c in columns)
        db.execute(
            f"INSERT INTO dead ({', '.join(columns)}) SELECT {copied} FROM dead WHERE id = 6"  # noqa: S608 (the fixture's own column names)
        )
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    try:
        [start] = [e for e in spool.admin.list("dead") if e.request.action == "start"]
        assert start.reason == "unconfirmed"
        with pytest.raises(SpoolError, match=f"{start.id}: unconfirmed start"):
            spool.admin.retry_dead([start.id])
    finally:
        spool.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A spool written by a newer release is not touched: a clear error."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    spool.close()
    with contextlib.closing(sqlite3.connect(tmp_path / SPOOL_FILE)) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(SpoolError, match="schema version 99, written by a newer agi-bridge"):
        Spool(tmp_path, fsync=False).open()


async def test_a_spool_of_the_previous_release_is_migrated(tmp_path: Path) -> None:
    """tests/fixtures/spool-v0.sqlite3 (made by the release before schema versions, commit
    ef09d8d): migrated to schema 1 in place, kinds inferred from the targets' shape, a start it
    may have sent marked attempted, the dead letter kept as refused."""
    (tmp_path / SPOOL_FILE).write_bytes((FIXTURES / "spool-v0.sqlite3").read_bytes())
    spool = Spool(tmp_path, fsync=False, clock=lambda: 1_764_633_602.0)
    spool.open()
    try:
        pending = spool.admin.list("pending")
        assert [(e.id, e.request.action, e.request.kind) for e in pending] == [
            (1, "stop", "uniqueid"),
            (2, "stop", "extension"),
            (3, "start", "uniqueid"),
            (4, "start", "uniqueid"),
            (5, "start", "extension"),
        ]
        settled = await spool.settle_interrupted("on its way when the bridge stopped")
        assert [e.id for e in settled] == [4, 5]  # written ahead; sent once (no answer)
        [dead] = [e for e in spool.admin.list("dead") if e.id == 6]
        assert (dead.reason, dead.request.kind, dead.last_error) == (
            "failed",
            "extension",
            "Permission denied",
        )
    finally:
        spool.close()
    with contextlib.closing(sqlite3.connect(tmp_path / SPOOL_FILE)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (1,)
