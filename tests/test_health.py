"""The operator's listener: /metrics moves with sessions, /healthz, /readyz and its reasons."""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from agi_bridge.app import Bridge
from agi_bridge.testing.simulator import FailureMode, NoojeeSimulator
from tests.bridge_helpers import call, make_settings, running_bridge, running_simulator


@pytest.fixture
async def simulator(server_ssl_context: ssl.SSLContext) -> AsyncIterator[NoojeeSimulator]:
    async with running_simulator(server_ssl_context) as simulator:
        yield simulator


def _url(bridge: Bridge, path: str) -> str:
    assert bridge.health is not None
    return f"http://127.0.0.1:{bridge.health.port}{path}"


async def _get(bridge: Bridge, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(_url(bridge, path))


def _sample(text: str, name: str) -> float:
    """The value of one exact series line in Prometheus text, 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_sessions_and_noojee_round_trips(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """After sessions, /metrics shows them by route and status, with hold time and round trips."""
    settings = make_settings(simulator, ca_file, tmp_path, metrics_listen="127.0.0.1:0")
    async with running_bridge(settings) as bridge:
        before = (await _get(bridge, "/metrics")).text
        await call(bridge, "Fred")
        await call(bridge, "Pebbles", uniqueid="3.3")
        await call(bridge, script="recording/nope")
        response = await _get(bridge, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    stopped = 'agi_bridge_sessions_total{route="recording/stop",status="STOPPED"}'
    assert _sample(before, stopped) == 0
    assert _sample(text, stopped) == 1
    assert _sample(text, 'agi_bridge_sessions_total{route="recording/stop",status="FAILED"}') == 1
    assert _sample(text, 'agi_bridge_sessions_total{route="unknown",status="REJECTED"}') == 1
    assert _sample(text, 'agi_bridge_hold_seconds_count{route="recording/stop"}') == 2
    assert _sample(text, 'agi_bridge_noojee_request_seconds_count{kind="ok"}') == 1
    assert _sample(text, 'agi_bridge_noojee_errors_total{kind="api_error"}') == 1
    assert _sample(text, "agi_bridge_spool_dead") == 1
    assert _sample(text, "agi_bridge_spool_pending") == 0
    assert "agi_bridge_connections_open" in text


async def test_healthz_and_unknown_paths(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """/healthz answers while the process lives; other paths are 404, other methods 405."""
    settings = make_settings(simulator, ca_file, tmp_path, metrics_listen="127.0.0.1:0")
    async with running_bridge(settings) as bridge:
        health = await _get(bridge, "/healthz")
        missing = await _get(bridge, "/admin")
        async with httpx.AsyncClient() as client:
            posted = await client.post(_url(bridge, "/metrics"))
    assert (health.status_code, health.text) == (200, "ok\n")
    assert missing.status_code == 404
    assert posted.status_code == 405


async def test_readyz_turns_unready_while_noojee_fails(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """/readyz is 503 with the reason after a failed NoojeeContact request, 200 once one works."""
    settings = make_settings(simulator, ca_file, tmp_path, metrics_listen="127.0.0.1:0")
    async with running_bridge(settings) as bridge:
        ready = await _get(bridge, "/readyz")
        simulator.set_failure(FailureMode.HTTP_503)
        await call(bridge, "Fred")
        unready = await _get(bridge, "/readyz")
        simulator.set_failure(FailureMode.NONE)
        await simulator.wait_for(1, predicate=lambda r: r.answered_code == 0)
        await call(bridge, "Fred", uniqueid="4.4")
        again = await _get(bridge, "/readyz")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    assert unready.status_code == 503
    assert "last NoojeeContact request failed" in unready.text
    assert again.status_code == 200


@contextlib.contextmanager
def _small_filesystem(path: Path) -> Iterator[None]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> None:
    """Leave less than 512 KiB free on the filesystem of ``path``."""
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    (path / "filler").write_bytes(b"\0" * (free - 256 * 1024))


@pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root to mount a small filesystem")
async def test_readyz_turns_unready_when_the_spool_disk_is_full(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """When the spool's disk is (nearly) full, /readyz says so (503) instead of taking stops
    it may not be able to keep; freeing space makes it ready again."""
    data = tmp_path / "data"
    with _small_filesystem(data):
        settings = make_settings(simulator, ca_file, data, metrics_listen="127.0.0.1:0")
        async with running_bridge(settings) as bridge:
            ready = await _get(bridge, "/readyz")
            _fill(data)
            unready = await _get(bridge, "/readyz")
            (data / "filler").unlink()
            again = await _get(bridge, "/readyz")
    assert ready.status_code == 200
    assert unready.status_code == 503
    assert f"spool {data / 'spool.sqlite3'} is not writable" in unready.text
    assert "KiB free on its disk" in unready.text
    assert again.status_code == 200


def _fill_up(path: Path) -> None:
    """Fill the filesystem of ``path`` to the last byte it takes."""
    with (path / "filler").open("ab", buffering=0) as filler:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):  # ENOSPC: on to smaller writes
                while True:
                    filler.write(b"\0" * size)


@pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root to mount a small filesystem")
async def test_a_full_spool_disk_answers_failed_never_queued(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """NoojeeContact down and the spool's disk full: stops are FAILED ("could not queue"),
    never QUEUED, so QUEUED always means on disk; freeing space makes them queue again."""
    data = tmp_path / "data"
    simulator.set_failure(FailureMode.REFUSE)
    with _small_filesystem(data):
        settings = make_settings(simulator, ca_file, data, stop_mode="async")
        async with running_bridge(settings) as bridge:
            _fill_up(data)
            full = [await call(bridge, "Fred", uniqueid=f"6.{n}") for n in range(40)]
            (data / "filler").unlink()
            freed = await call(bridge, "Fred", uniqueid="6.99")
            stats = await bridge.spool.stats()
    statuses = [r.variables["NOOJEE_STATUS"] for r in full]
    assert "FAILED" in statuses
    assert set(statuses) <= {"QUEUED", "FAILED"}
    for result in full:
        if result.variables["NOOJEE_STATUS"] == "FAILED":
            assert "could not queue: spool not writable" in result.variables["NOOJEE_MESSAGE"]
    assert freed.variables["NOOJEE_STATUS"] == "QUEUED"
    assert stats.pending == statuses.count("QUEUED") + 1
