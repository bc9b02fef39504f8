"""The spool's disk on an operator's worst day: full, with a corrupt page, or frozen. The full
and the frozen disk are small filesystems of their own that the tests mount (a tmpfs; an ext4
on a loop device, which fsfreeze needs), as root: skipped elsewhere with a message, never
faked."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from agi_bridge.app import Bridge
from agi_bridge.delivery.config import Connections
from agi_bridge.delivery.worker import IDLE_POLL
from agi_bridge.lock import LOCK_FILE, DataDirInUse, DataDirLock
from agi_bridge.spool import Spool, SpoolEntry
from agi_bridge.testing.fake_asterisk import Call, run_call
from agi_bridge.testing.simulator import FailureMode, NoojeeSimulator, ReceivedRequest
from agi_bridge.vocabulary import RecordingRequest
from tests.bridge_helpers import (
    API_KEY,
    call,
    make_settings,
    running_bridge,
    running_simulator,
)
from tests.test_robustness import _bridge_env, _line_with

STOP_PATH = "/servicemanager/rest/CallManagementAPI/stop"
# Room for the spool and its WAL with a few dozen entries; the filler takes the rest.
SMALL_DISK = "2m"
FILL_CHUNK = 64 * 1024
# ext4's smallest comfortable size with a journal: the spool needs a few pages of it.
FREEZABLE_DISK_BYTES = 32 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of SMALL_DISK mounted for this test alone."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (run ./scripts/test as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk refuses another byte; returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        # Big writes first, then single bytes up to the very last block.
        for size in (FILL_CHUNK, 1):
            with pytest.raises(OSError, match="No space left") as info:  # noqa: PT012
                while True:
                    os.write(fd, b"\0" * size)
            assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.fixture
async def simulator(server_ssl_context: ssl.SSLContext) -> AsyncIterator[NoojeeSimulator]:
    async with running_simulator(server_ssl_context) as simulator:
        yield simulator


async def test_queued_stops_are_delivered_while_the_disk_stays_full(
    small_disk: Path, simulator: NoojeeSimulator, ca_file: Path
) -> None:
    """Stops queued while NoojeeContact is down, then the disk fills up, then NoojeeContact
    comes back: every queued stop is delivered although no write reaches the disk, none twice;
    a new async stop is honestly FAILED meanwhile."""
    queued = 20
    settings = make_settings(simulator, ca_file, small_disk, spool_fsync=True)
    simulator.set_failure(FailureMode.HTTP_503)
    async with running_bridge(settings) as bridge:
        await _queue_stops(bridge, [f"1800.{i}" for i in range(queued)])
        fill(small_disk)
        refused = await call(bridge, "Fred", "by=uniqueid", "mode=async", uniqueid="1800.99")
        assert refused.variables["NOOJEE_STATUS"] == "FAILED"
        simulator.clear()
        simulator.set_failure(FailureMode.NONE)
        delivered = await simulator.wait_for(
            queued, timeout=30, predicate=lambda r: r.path == STOP_PATH and r.answered_code == 0
        )
        problems = await _readiness(bridge)
    targets = [r.params["extenOrUniqueId"] for r in delivered]
    assert sorted(targets) == sorted(f"1800.{i}" for i in range(queued))
    assert any("not writable" in p for p in problems), problems


async def test_a_bridge_restarted_on_a_full_disk_starts_and_delivers(
    small_disk: Path, simulator: NoojeeSimulator, ca_file: Path
) -> None:
    """Stops queued, the bridge stopped, the disk filled up, the bridge started again (systemd
    after a crash, an operator's restart): it opens its spool with the room it set aside and
    delivers every queued stop, instead of failing to start and failing every call."""
    queued = 5
    settings = make_settings(simulator, ca_file, small_disk, spool_fsync=True)
    simulator.set_failure(FailureMode.HTTP_503)
    async with running_bridge(settings) as bridge:
        await _queue_stops(bridge, [f"1810.{i}" for i in range(queued)])
    fill(small_disk)
    simulator.clear()
    simulator.set_failure(FailureMode.NONE)
    async with running_bridge(settings):
        delivered = await simulator.wait_for(
            queued, timeout=30, predicate=lambda r: r.path == STOP_PATH and r.answered_code == 0
        )
    targets = [r.params["extenOrUniqueId"] for r in delivered]
    assert sorted(targets) == sorted(f"1810.{i}" for i in range(queued))


# Idle polls the check below waits out: enough to tell a worker that polls from one that claims
# in a loop (thousands of claims a second).
POLLS_WAITED = 3


async def test_the_worker_polls_while_a_full_disk_holds_what_is_due_in_memory(
    small_disk: Path, simulator: NoojeeSimulator, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop delivered while the disk is full stays due on disk (its deletion waits in
    memory): the worker then looks at the spool once a poll, not in a loop for as long as the
    disk stays full."""
    timeouts = {"noojee_connect_timeout": 0.25, "noojee_timeout": 0.25}  # a 2 s lease
    simulator.set_failure(FailureMode.HTTP_503)
    async with running_bridge(make_settings(simulator, ca_file, small_disk, **timeouts)) as bridge:
        claims = _Claims(bridge.spool, monkeypatch)
        await _queue_stops(bridge, ["1830.1"])
        fill(small_disk)
        simulator.set_failure(FailureMode.NONE)
        await simulator.wait_for(
            1, timeout=30, predicate=lambda r: r.path == STOP_PATH and r.answered_code == 0
        )
        await claims.begun_after(time.time())  # the delivery recorded (in memory)
        before = claims.count
        await claims.begun_after(time.time() + POLLS_WAITED * IDLE_POLL)
        claimed = claims.count - before
    # One claim a poll, and as much again for claims woken early; a loop makes thousands.
    assert claimed <= 2 * (POLLS_WAITED + 1), claimed


# Leases the negative check below waits out: a refused stop whose dead letter the full disk
# did not take was claimed and sent again after each one.
LEASES_WAITED = 3


async def test_a_stop_refused_for_good_on_a_full_disk_is_sent_and_counted_once(
    small_disk: Path, simulator: NoojeeSimulator, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued stop NoojeeContact refuses for good (Pebbles may not stop) while the disk is
    full: sent once, counted and logged dead once over several leases, the worker unharmed;
    once the disk has room again it is in the dead letters, no longer pending."""
    timeouts = {"noojee_connect_timeout": 0.25, "noojee_timeout": 0.25}
    lease = Connections(connect_timeout=0.25, request_timeout=0.25).lease  # 2 s
    simulator.set_failure(FailureMode.HTTP_503)
    with structlog.testing.capture_logs() as logs:
        async with running_bridge(
            make_settings(simulator, ca_file, small_disk, **timeouts)
        ) as bridge:
            claims = _Claims(bridge.spool, monkeypatch)
            queued = await call(bridge, "Pebbles", "by=uniqueid", "mode=async", uniqueid="1820.1")
            assert queued.variables["NOOJEE_STATUS"] == "QUEUED"
            [entry] = bridge.spool.admin.list("pending")
            filler = fill(small_disk)
            simulator.set_failure(FailureMode.NONE)
            await simulator.wait_for(1, timeout=30, predicate=_refused)
            # The negative check, bounded: the worker claims again (at least once a poll)
            # until several leases have passed, and sends nothing more.
            await claims.begun_after(time.time() + LEASES_WAITED * lease)
            refused = [r for r in simulator.received if _refused(r)]
            filler.unlink()
            await claims.begun_after(time.time())  # the move to the dead letters written
            dead = bridge.spool.admin.list("dead")
            pending = bridge.spool.admin.list("pending")
            counted = bridge.metrics.registry.get_sample_value(
                "agi_bridge_spool_dead_letters_total"
            )
    assert len(refused) == 1
    assert counted == 1
    assert [e["id"] for e in logs if e["event"] == "spool.entry.dead"] == [entry.id]
    # The write the full disk did not take is named: the move to the dead letters.
    deferred = [(e["id"], e["write"]) for e in logs if e["event"] == "spool.write.deferred"]
    assert deferred == [(entry.id, "move_to_dead")]
    assert [e for e in logs if e["event"] == "spool.worker.error"] == []
    assert [(e.id, e.reason, e.last_error) for e in dead] == [
        (entry.id, "failed", "Permission denied")
    ]
    assert pending == []


async def test_a_settlement_the_full_disk_refused_is_held_until_it_has_room(
    small_disk: Path,
) -> None:
    """On a full disk a move to the dead letters (a request by extension expired) succeeds for
    its caller; the entry is neither claimed nor expired again meanwhile, and a repeat asking
    where it stands hears it settled; the first claim once the disk has room writes the move as
    it was decided."""
    why = "expired: by extension and not delivered within 60s, not sent"
    spool = Spool(small_disk, fsync=False)
    spool.open()
    try:
        stop = RecordingRequest("stop", "410", "Fred", kind="extension")
        entry = await spool.add(stop, call_uniqueid="1840.1")
        filler = fill(small_disk)
        await spool.dead_letter(entry, why, attempted=False, reason="expired")
        assert await spool.claim_due(limit=10, lease=60) == []
        assert await spool.expire_if_idle(entry, "expired again") is False
        assert await spool.where(entry) == ("dead", why, "expired")  # what a repeat hears
        filler.unlink()
        assert await spool.claim_due(limit=10, lease=60) == []
        dead = spool.admin.list("dead")
        pending = spool.admin.list("pending")
    finally:
        spool.close()
    assert [(e.id, e.reason, e.last_error, e.attempts) for e in dead] == [
        (entry, "expired", why, 0)
    ]
    assert pending == []


def _refused(request: ReceivedRequest) -> bool:
    """A stop NoojeeContact refused for good (its Code < 0: Pebbles may not stop)."""
    return request.path == STOP_PATH and request.answered_code == -1


class _Claims:
    """The worker's claims on ``spool``, seen as they end (a spy on its claim_due)."""

    def __init__(self, spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
        self._ended = asyncio.Condition()
        self._last_begun = 0.0  # when the last claim that ended began (epoch seconds)
        self.count = 0  # claims ended
        claim_due = spool.claim_due

        async def spy(*, limit: int, lease: float) -> list[SpoolEntry]:
            begun = time.time()
            try:
                return await claim_due(limit=limit, lease=lease)
            finally:
                async with self._ended:
                    self._last_begun = begun
                    self.count += 1
                    self._ended.notify_all()

        monkeypatch.setattr(spool, "claim_due", spy)

    async def begun_after(self, moment: float) -> None:
        """Wait until a claim begun at ``moment`` or later has ended (the worker claims at
        least every IDLE_POLL: the margin covers a loaded machine)."""
        async with asyncio.timeout(moment - time.time() + 10), self._ended:
            await self._ended.wait_for(lambda: self._last_begun >= moment)


async def _queue_stops(bridge: Bridge, uniqueids: list[str]) -> None:
    """One async stop per uniqueid, each QUEUED (NoojeeContact is down)."""
    for uniqueid in uniqueids:
        result = await call(bridge, "Fred", "by=uniqueid", "mode=async", uniqueid=uniqueid)
        assert result.variables["NOOJEE_STATUS"] == "QUEUED"


async def _readiness(bridge: Bridge) -> list[str]:
    return await bridge.readiness()


def _salvage(path: Path) -> None:
    """The README's salvage, word for word: move aside, dump what reads into a new file."""
    damaged = path.with_name("spool.damaged")
    path.rename(damaged)
    dump = subprocess.run(["sqlite3", str(damaged), ".dump"], capture_output=True, check=True)
    subprocess.run(["sqlite3", str(path)], input=dump.stdout, check=True)
    version = subprocess.run(
        ["sqlite3", str(damaged), "PRAGMA user_version"], capture_output=True, check=True
    ).stdout.decode()
    subprocess.run(["sqlite3", str(path), f"PRAGMA user_version = {version.strip()}"], check=True)


async def _damaged_spool(data_dir: Path, entries: int) -> Path:
    """A spool of ``entries`` stops whose index page is overwritten with garbage, as a bad
    sector or a torn write leaves it; the table itself is readable."""
    spool = Spool(data_dir, fsync=False)
    spool.open()
    for i in range(entries):
        stop = RecordingRequest("stop", f"1900.{i}", "Fred")
        await spool.add(stop, call_uniqueid=f"1900.{i}")
    spool.close()  # checkpoints the WAL into the file
    with sqlite3.connect(spool.path) as db:
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'pending_due'"
        ).fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    with spool.path.open("r+b") as handle:
        handle.seek((root - 1) * size + 100)
        handle.write(b"\xff" * (size - 200))
    return spool.path


async def test_a_damaged_spool_is_reported_and_the_readme_salvage_saves_it(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A corrupt page: check-config exits 1 naming the file and the salvage, /readyz reports
    it; the README's salvage (sqlite3 .dump into a new file) keeps every entry and the bridge
    is ready again on it."""
    entries = 50
    path = await _damaged_spool(tmp_path, entries)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGI_BRIDGE_")} | {
        "AGI_BRIDGE_NOOJEE_URL": simulator.base_url,
        "AGI_BRIDGE_NOOJEE_API_KEY": API_KEY,
        "AGI_BRIDGE_DATA_DIR": str(tmp_path),
    }
    checked = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agi_bridge",
        "check-config",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(checked.communicate(), timeout=30)
    assert checked.returncode == 1
    assert f"the spool {path} is damaged (" in err.decode()
    assert ".dump" in err.decode()
    settings = make_settings(simulator, ca_file, tmp_path)
    simulator.set_failure(FailureMode.HTTP_503)  # keep the entries queued
    async with running_bridge(settings) as bridge:
        problems = await bridge.readiness()
    assert any(f"spool {path} is damaged" in p for p in problems), problems

    if shutil.which("sqlite3") is None:
        pytest.skip("no sqlite3 command to try the README's salvage (apt install sqlite3)")
    await asyncio.to_thread(_salvage, path)
    async with running_bridge(settings) as bridge:
        problems = await bridge.readiness()
        stats = await bridge.spool.stats()
    assert not any("damaged" in p for p in problems), problems
    assert stats.pending == entries


@pytest.fixture
def freezable_disk(tmp_path: Path) -> Iterator[Path]:
    """A small ext4 on a loop device (fsfreeze needs a real filesystem), mounted for this
    test alone; thawed and unmounted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("a loop device and fsfreeze need root (run ./scripts/test as root)")
    missing = [tool for tool in ("mkfs.ext4", "fsfreeze") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing (apt install e2fsprogs util-linux)")
    image, mount = tmp_path / "ext4.img", tmp_path / "frozen"
    mount.mkdir()
    with image.open("wb") as handle:
        handle.truncate(FREEZABLE_DISK_BYTES)
    for command in (
        ["mkfs.ext4", "-q", "-F", str(image)],
        ["mount", "-o", "loop", str(image), str(mount)],
    ):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot make a loop ext4 here ({command[0]}): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["fsfreeze", "-u", str(mount)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_frozen_disk_fails_requests_fast_and_the_stop_names_what_it_could_not_write(
    freezable_disk: Path, simulator: NoojeeSimulator, ca_file: Path
) -> None:
    """fsfreeze under a running bridge: a stop is FAILED (5 s, the spool's commit timeout) and
    the next one at once; SIGTERM ends the process within its stop deadline WHILE the disk is
    still frozen (exit 1: a stop that could not flush), with an ERROR naming the request the
    disk never took; its writer process keeps the data_dir locked until the thaw ends it; a new
    bridge then finds what was committed and nothing else."""
    data_dir = freezable_disk / "data"
    env = _bridge_env(simulator, ca_file, data_dir) | {"AGI_BRIDGE_SHUTDOWN_GRACE": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agi_bridge",
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    # The bridge's exit, seen as it happens: process.wait() also waits for its stderr to
    # close, and the writer process (stuck on the frozen disk) still holds it.
    bridge_exit = os.pidfd_open(process.pid)
    writer_exit: int | None = None
    try:
        line = await asyncio.wait_for(_line_with(process, b"agi.server.listening"), timeout=30)
        port = int(json.loads(line)["listen"].rsplit(":", 1)[1])
        simulator.set_failure(FailureMode.HTTP_503)
        assert (await _async_stop(port, "2000.1")) == "QUEUED"
        await asyncio.to_thread(subprocess.run, ["fsfreeze", "-f", str(freezable_disk)], check=True)
        assert (await _async_stop(port, "2000.2")) == "FAILED"  # held 5 s by the stuck commit
        assert (await _async_stop(port, "2000.3")) == "FAILED"  # at once: the disk is stalled
        process.send_signal(signal.SIGTERM)
        # shutdown_grace 1 s + the spool's last flush 2 s, with a margin for a loaded box.
        async with asyncio.timeout(10):
            unwritten = await _line_with(process, b"spool.unwritten")
            await _exited(bridge_exit)
        event = json.loads(unwritten)
        assert event["level"] == "error"
        assert any("call=2000.2" in request for request in event["requests"]), event
        # The disk is still frozen: the writer cannot end (its SIGKILL waits for the thaw),
        # and the data_dir stays locked until it does, so no new bridge interleaves with a
        # commit it may still land.
        writer_exit = os.pidfd_open(event["writer"])
        assert not _lockable(data_dir / LOCK_FILE)
        # A bridge started now refuses at once, saying who holds the folder: it creates and
        # writes nothing before it has the lock (the frozen disk would hold it). In a thread:
        # were it held, the thaw below still runs.
        writer_holds = f"still locked by the spool writer process of agi-bridge pid {process.pid}"
        with pytest.raises(DataDirInUse, match=f"{writer_holds}, which has exited"):
            await asyncio.wait_for(asyncio.to_thread(DataDirLock(data_dir).acquire), timeout=10)
        await asyncio.to_thread(subprocess.run, ["fsfreeze", "-u", str(freezable_disk)], check=True)
        await asyncio.wait_for(_exited(writer_exit), timeout=10)
        assert _lockable(data_dir / LOCK_FILE)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 1
    finally:
        # Thawed whatever happened (a no-op once thawed): a thread or process held by the
        # frozen disk must not outlive the test.
        await asyncio.to_thread(
            subprocess.run, ["fsfreeze", "-u", str(freezable_disk)], capture_output=True
        )
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pidfd in (bridge_exit, writer_exit):
            if pidfd is not None:
                os.close(pidfd)
    # 2000.1 was committed before the freeze; 2000.2 only if the killed writer's commit landed
    # at the thaw (it was named unwritten either way); 2000.3 never reached the writer.
    async with running_bridge(make_settings(simulator, ca_file, data_dir)) as bridge:
        pending = {entry.call_uniqueid for entry in bridge.spool.admin.list("pending")}
        problems = await bridge.readiness()
    assert "2000.1" in pending
    assert pending <= {"2000.1", "2000.2"}, pending
    assert not any("spool" in problem for problem in problems), problems


async def _exited(pidfd: int) -> None:
    """Wait until the process behind ``pidfd`` has exited (its pidfd turns readable)."""
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)


def _lockable(path: Path) -> bool:
    """Whether another process could take the bridge's data_dir lock now (flock writes
    nothing: safe on a frozen disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


async def _async_stop(port: int, uniqueid: str) -> str:
    result = await run_call(
        Call(arguments=("Fred", "mode=async"), uniqueid=uniqueid, port=port), deadline=20
    )
    return result.variables.get("NOOJEE_STATUS", f"AGISTATUS={result.agistatus}")
