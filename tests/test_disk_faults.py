"""The spool's disk on an operator's worst day: full, or with a corrupt page. Each case runs on
a small filesystem of its own that the test mounts (a tmpfs, root only): skipped elsewhere
with a message, never faked."""

from __future__ import annotations

import errno
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agi_bridge.app import Bridge
from agi_bridge.testing.simulator import FailureMode, NoojeeSimulator
from tests.bridge_helpers import call, make_settings, running_bridge, running_simulator

STOP_PATH = "/servicemanager/rest/CallManagementAPI/stop"
# Room for the spool and its WAL with a few dozen entries; the filler takes the rest.
SMALL_DISK = "2m"
FILL_CHUNK = 64 * 1024


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
        for i in range(queued):
            result = await call(bridge, "Fred", "by=uniqueid", "mode=async", uniqueid=f"1800.{i}")
            assert result.variables["NOOJEE_STATUS"] == "QUEUED"
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


async def _readiness(bridge: Bridge) -> list[str]:
    return await bridge.readiness()
