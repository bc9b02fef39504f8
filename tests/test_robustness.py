"""Hostile and broken clients, limits, allow-list, restarts and signals: nothing lost, nothing
stuck, nobody in. Real sockets throughout; each hostile client runs beside a valid session that
must be unaffected."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import structlog

from agi_bridge.app import SPOOL_FLUSH_TIMEOUT, Bridge
from agi_bridge.protocol import MAX_ENVIRONMENT_BYTES, MAX_LINE_BYTES, Environment
from agi_bridge.server import AgiServer
from agi_bridge.spool import SPOOL_FILE, Spool
from agi_bridge.testing.fake_asterisk import Call, SessionResult, environment_block, run_call
from agi_bridge.testing.simulator import FailureMode, NoojeeSimulator
from agi_bridge.vocabulary import HandOff, Outcome, RecordingRequest
from tests.bridge_helpers import (
    API_KEY,
    call,
    make_settings,
    raw_http_server,
    running_bridge,
    running_simulator,
)

STOP_PATH = "/servicemanager/rest/CallManagementAPI/stop"
ENVIRONMENT_TIMEOUT = 0.5  # short, so the slow-client tests end quickly
SESSION_DEADLINE = 10.0  # a whole session against a process, generous for a loaded box


@pytest.fixture
async def simulator(server_ssl_context: ssl.SSLContext) -> AsyncIterator[NoojeeSimulator]:
    async with running_simulator(server_ssl_context) as simulator:
        yield simulator


@pytest.fixture
async def bridge(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> AsyncIterator[Bridge]:
    settings = make_settings(simulator, ca_file, tmp_path, environment_timeout=ENVIRONMENT_TIMEOUT)
    async with running_bridge(settings) as bridge:
        yield bridge


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes (bounded by the test timeout)."""
    return await reader.read()


async def _garbage(writer: asyncio.StreamWriter) -> None:
    writer.write(bytes(range(256)) * 4 + b"\n\n")


async def _no_blank_line(writer: asyncio.StreamWriter) -> None:
    writer.write(environment_block(Call()).rstrip(b"\n") + b"\n")
    writer.write_eof()


async def _too_large(writer: asyncio.StreamWriter) -> None:
    line = b"agi_x: " + b"y" * 1000 + b"\n"
    writer.write(b"agi_network: yes\n" + line * (MAX_ENVIRONMENT_BYTES // len(line) + 2))


async def _endless_line(writer: asyncio.StreamWriter) -> None:
    writer.write(b"agi_network: " + b"z" * (MAX_LINE_BYTES + 10))


async def _early_eof(writer: asyncio.StreamWriter) -> None:
    writer.write(b"agi_network: yes\nagi_chan")
    writer.write_eof()


async def _silent(writer: asyncio.StreamWriter) -> None:
    """Sends nothing at all: only the environment deadline ends it."""


async def _slowloris(writer: asyncio.StreamWriter) -> None:
    """One byte at a time, never finishing within the deadline."""
    for byte in environment_block(Call()):
        writer.write(bytes([byte]))
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(0.05)  # the attack's pace, not synchronisation


HOSTILE: dict[str, Callable[[asyncio.StreamWriter], Awaitable[None]]] = {
    "garbage": _garbage,
    "no_blank_line": _no_blank_line,
    "too_large": _too_large,
    "endless_line": _endless_line,
    "early_eof": _early_eof,
    "silent": _silent,
    "slowloris": _slowloris,
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
async def test_hostile_client_is_closed_cleanly_and_others_are_served(
    bridge: Bridge, simulator: NoojeeSimulator, attack: str
) -> None:
    """Each kind of broken input ends in a closed connection and a protocol-error count; a
    valid session running at the same time is answered as usual."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.server.port)
    attacker = asyncio.create_task(HOSTILE[attack](writer))
    valid = await call(bridge, "Fred")
    answer = await _read_all(reader)  # returns only once the bridge closes the connection
    await attacker
    writer.close()
    assert valid.variables["NOOJEE_STATUS"] == "STOPPED"
    assert b"NOOJEE" not in answer  # no command was sent to an impostor
    assert bridge.metrics.protocol_errors._value.get() == 1
    assert [r.path for r in simulator.received] == [STOP_PATH]


TEN_KB = "x" * 10_000


@pytest.mark.parametrize(
    ("script", "arguments"),
    [
        ("recording/stop", (TEN_KB,)),  # the agent, the lone argument
        ("recording/stop", ("Fred", f"id={TEN_KB}")),
        ("recording/start", ("Fred", f"tag={TEN_KB}")),
    ],
)
async def test_a_10kb_value_is_rejected_with_a_status_before_closing(
    bridge: Bridge, simulator: NoojeeSimulator, script: str, arguments: tuple[str, ...]
) -> None:
    """A dialplan argument of 10 kB (agent, uniqueid, tag): the call hears REJECTED with the
    reason, nothing is sent to NoojeeContact, and the next call is served."""
    result = await call(bridge, *arguments, script=script)
    assert result.agistatus == "SUCCESS"
    assert result.variables["NOOJEE_STATUS"] == "REJECTED"
    assert "longer than 8192 bytes" in result.variables["NOOJEE_MESSAGE"]
    assert (await call(bridge, "Fred")).variables["NOOJEE_STATUS"] == "STOPPED"
    assert [r.path for r in simulator.received] == [STOP_PATH]


async def test_a_peer_flooding_a_busy_session_is_not_read_into_memory(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """While a session waits for NoojeeContact, its peer sends 32 MB: the bridge stops reading
    past MAX_UNREAD_BYTES (the peer's writes block in the kernel) instead of buffering them,
    and the session goes on (the stop is sent) before the flood ends it as a protocol error."""
    simulator.set_failure(FailureMode.SLOW, delay=2.5)
    settings = make_settings(simulator, ca_file, tmp_path, stop_budget=1.5)
    async with running_bridge(settings) as bridge:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.server.port)
        writer.write(environment_block(Call(arguments=("Fred",), port=bridge.server.port)))
        await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
        writer.write(b"x" * (32 << 20))
        # Unpaused, the bridge would take the 32 MB in well under a second.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(writer.drain(), timeout=0.5)
        # The session answers QUEUED at its budget, then reads the flood as the reply, fails
        # and closes: with bytes still unread, the kernel resets the connection.
        with contextlib.suppress(ConnectionResetError):
            await _read_all(reader)
        writer.transport.abort()
        sessions = bridge.metrics.registry.get_sample_value(
            "agi_bridge_sessions_total", {"route": "recording/stop", "status": "QUEUED"}
        )
        errors = bridge.metrics.protocol_errors._value.get()
    assert sessions == 1
    assert errors == 0  # the environment was fine: the flood fails the command's reply


async def test_clients_outside_the_allow_list_are_refused(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A peer not in allow_clients gets 'failure' and a closed socket; nothing is sent."""
    settings = make_settings(simulator, ca_file, tmp_path, allow_clients=["10.9.9.9/32"])
    async with running_bridge(settings) as bridge:
        result = await call(bridge, "Fred")
        refused = bridge.metrics.connections_refused.labels("not_allowed")._value.get()
    assert result.agistatus == "FAILURE"
    assert result.variables == {}
    assert refused == 1
    assert simulator.received == []


async def test_loopback_in_the_allow_list_is_served(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """An allow-list that names the Asterisk host lets its sessions in."""
    settings = make_settings(
        simulator, ca_file, tmp_path, allow_clients=["10.9.9.9/32", "127.0.0.0/8"]
    )
    async with running_bridge(settings) as bridge:
        result = await call(bridge, "Fred")
    assert result.variables["NOOJEE_STATUS"] == "STOPPED"


async def test_sessions_beyond_the_limit_are_refused_not_queued(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """With max_sessions busy, a further connection is refused at once (AGISTATUS=FAILURE)
    instead of waiting in an unbounded queue; the busy sessions still complete."""
    settings = make_settings(simulator, ca_file, tmp_path, max_sessions=2, stop_budget=5.0)
    simulator.set_failure(FailureMode.SLOW, delay=1.0)
    async with running_bridge(settings) as bridge:
        busy = [asyncio.create_task(call(bridge, "Fred", uniqueid=f"9.{n}")) for n in range(2)]
        await simulator.wait_for(2)  # both sessions are now waiting on NoojeeContact
        refused = await call(bridge, "Fred", uniqueid="9.9")
        done = await asyncio.gather(*busy)
    assert refused.agistatus == "FAILURE"
    assert [r.variables["NOOJEE_STATUS"] for r in done] == ["STOPPED", "STOPPED"]


async def test_idle_connections_make_room_for_a_real_call(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Every slot held by connections that sent nothing (environment_timeout is a minute): a
    real call is still served, the oldest idle connection hears 'failure' and is closed to
    make room, and the younger idle ones keep their slots."""
    slots = 3
    settings = make_settings(
        simulator, ca_file, tmp_path, max_sessions=slots, environment_timeout=60.0
    )
    async with running_bridge(settings) as bridge:
        idle = [await asyncio.open_connection("127.0.0.1", bridge.server.port) for _ in range(3)]
        # Connected first, so accepted first: their sessions hold every slot by the time the
        # call's connection is accepted (the loop runs the accepts and their tasks in order).
        result = await call(bridge, "Fred")
        assert result.variables.get("NOOJEE_STATUS") == "STOPPED", result
        oldest = await _read_all(idle[0][0])
        still_open = bridge.metrics.registry.get_sample_value("agi_bridge_connections_open")
        evicted = bridge.metrics.connections_refused.labels("idle_evicted")._value.get()
        for _, writer in idle:
            writer.close()
    assert oldest == b"failure\n"
    assert evicted == 1
    assert still_open == slots - 1  # the two younger idle ones; the call is over


async def test_a_session_that_hits_a_bug_is_logged_and_the_next_is_served(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception nobody expected in one session closes that connection, is logged as
    agi.session.crashed with its traceback, and the server goes on serving."""
    dispatch = AgiServer._dispatch
    sessions = 0

    async def buggy(
        self: AgiServer, environment: Environment, route: str, hand_off: HandOff
    ) -> Outcome | None:
        nonlocal sessions
        sessions += 1
        if sessions == 1:
            raise RuntimeError("a bug")
        return await dispatch(self, environment, route, hand_off)

    monkeypatch.setattr(AgiServer, "_dispatch", buggy)
    with structlog.testing.capture_logs() as logs:
        async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
            crashed = await call(bridge, "Fred", uniqueid="9.1")
            served = await call(bridge, "Fred", uniqueid="9.2")
    assert crashed.variables == {}
    assert served.variables["NOOJEE_STATUS"] == "STOPPED"
    [crash] = [entry for entry in logs if entry["event"] == "agi.session.crashed"]
    assert isinstance(crash["exc_info"], RuntimeError)
    assert sessions == 2


async def test_queued_stops_survive_a_restart(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Stops queued while NoojeeContact is down are delivered by the next bridge process that
    opens the same data directory."""
    settings = make_settings(simulator, ca_file, tmp_path)
    simulator.set_failure(FailureMode.REFUSE)
    async with running_bridge(settings) as bridge:
        results = [await call(bridge, "Fred", uniqueid=f"7.{n}") for n in range(5)]
    assert {r.variables["NOOJEE_STATUS"] for r in results} == {"QUEUED"}
    simulator.set_failure(FailureMode.NONE)
    async with running_bridge(settings):
        delivered = await simulator.wait_for(
            5, predicate=lambda r: r.path == STOP_PATH and r.answered_code == 0
        )
    assert len(delivered) == 5


# Asserted bound on the worst-case stop past shutdown_grace and the spool's last flush: the
# stop itself needs milliseconds there; one second absorbs a loaded CI machine, and stays far
# below the grace that spending the deadline once per step (sessions, drain, worker) cost.
STOP_MARGIN = 1.0


async def test_the_worst_case_stop_ends_within_one_shutdown_grace(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Sessions held, NoojeeContact hanging, a queue the worker cannot drain: stop() ends within
    shutdown_grace plus the spool's last flush, and every request stays in the spool."""
    grace = 2.0
    queue, sessions = 8, 3
    settings = make_settings(
        simulator,
        ca_file,
        tmp_path,
        shutdown_grace=grace,
        stop_budget=30,
        noojee_timeout=120,
        noojee_max_connections=queue + sessions,
    )
    spool = Spool(tmp_path)
    spool.open()
    await asyncio.gather(
        *(
            spool.add(RecordingRequest("stop", str(n), agent="Fred"), call_uniqueid=f"8.{n}")
            for n in range(queue)
        )
    )
    spool.close()
    simulator.set_failure(FailureMode.SLOW, delay=600)
    bridge = Bridge(settings)
    await bridge.start()
    try:
        held = [
            asyncio.create_task(call(bridge, "Fred", uniqueid=f"9.{n}")) for n in range(sessions)
        ]
        # Every connection slot busy with a request NoojeeContact never answers: the worker's
        # batch (the whole queue) and the held sessions' attempts.
        await simulator.wait_for(queue + sessions)
    finally:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await bridge.stop()
        elapsed = loop.time() - started
    await asyncio.gather(*held)
    assert elapsed < grace + SPOOL_FLUSH_TIMEOUT + STOP_MARGIN
    spool = Spool(tmp_path)
    spool.open(create=False)
    try:
        assert spool.admin.stats().pending == queue + sessions
    finally:
        spool.close()


# --- the real process and its signals ----------------------------------------------------


def _bridge_env(simulator: NoojeeSimulator, ca_file: Path, data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AGI_BRIDGE_LISTEN": "127.0.0.1:0",
        "AGI_BRIDGE_METRICS_LISTEN": "",
        "AGI_BRIDGE_NOOJEE_URL": simulator.base_url,
        "AGI_BRIDGE_NOOJEE_API_KEY": API_KEY,
        "AGI_BRIDGE_NOOJEE_CA_FILE": str(ca_file),
        "AGI_BRIDGE_DATA_DIR": str(data_dir),
        "AGI_BRIDGE_LOG_FORMAT": "json",
        "AGI_BRIDGE_STOP_BUDGET": "5",
    }


async def _start_process(
    simulator: NoojeeSimulator, ca_file: Path, data_dir: Path, **extra_env: str
) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agi_bridge",
        "serve",
        env=_bridge_env(simulator, ca_file, data_dir) | extra_env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    while line := await process.stderr.readline():
        if b"agi.server.listening" in line:
            port = int(line.split(b'"listen": "127.0.0.1:')[1].split(b'"')[0])
            return process, port
    raise AssertionError(f"the bridge did not start: exit {await process.wait()}")


@pytest.mark.parametrize("port", ["free", "taken"])
async def test_a_second_bridge_on_the_same_data_dir_exits_at_once_touching_nothing(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path, port: str
) -> None:
    """A second `serve` on a running bridge's data_dir, on a free port or on the first one's
    (it cannot bind): it exits 1 at once naming the folder and the running pid, without
    opening the spool: the stop the first bridge has in flight is not sent a second time."""
    # The first bridge's own attempt stays in flight for the whole test (its own retry after
    # a 5 s timeout would be a second request too, on a box slow to start the second one);
    # its stop need not wait for it.
    first, first_port = await _start_process(
        simulator,
        ca_file,
        tmp_path,
        AGI_BRIDGE_NOOJEE_TIMEOUT="120",
        AGI_BRIDGE_SHUTDOWN_GRACE="1",
    )
    try:
        simulator.set_failure(FailureMode.SLOW, delay=120)
        session = asyncio.create_task(_call_port(first_port))
        await simulator.wait_for(1)
        listen = "127.0.0.1:0" if port == "free" else f"127.0.0.1:{first_port}"
        second = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agi_bridge",
            "serve",
            env=_bridge_env(simulator, ca_file, tmp_path) | {"AGI_BRIDGE_LISTEN": listen},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        # Generous for a cold interpreter on a loaded box; the old bridge never exited.
        _, err = await asyncio.wait_for(second.communicate(), timeout=20)
        assert second.returncode == 1
        message = err.decode()
        assert f"data_dir {tmp_path} is in use by a running agi-bridge (pid {first.pid}" in message
        assert "Traceback" not in message
        assert (await session).variables["NOOJEE_STATUS"] == "QUEUED"
        assert len(simulator.received) == 1  # nobody sent the entry in flight again
    finally:
        first.send_signal(signal.SIGTERM)
        await first.wait()


def _delete_spool(data_dir: Path) -> Path:
    """``rm`` the spool file and its WAL, as a careless clean-up would; returns its path."""
    path = data_dir / SPOOL_FILE
    for name in (SPOOL_FILE, f"{SPOOL_FILE}-wal", f"{SPOOL_FILE}-shm"):
        (data_dir / name).unlink(missing_ok=True)
    return path


async def test_a_deleted_spool_is_noticed_by_the_idle_bridge_within_seconds(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """The spool file deleted under an idle bridge: an ERROR naming it comes within seconds
    (the worker looks at the spool every second), and a stop is then FAILED, not QUEUED into
    a file nobody will read."""
    process, port = await _start_process(simulator, ca_file, tmp_path)
    try:
        path = _delete_spool(tmp_path)
        line = await asyncio.wait_for(_line_with(process, b"spool.file.lost"), timeout=10)
        event = json.loads(line)
        assert event["level"] == "error"
        assert str(path) in event["problem"]
        result = await run_call(
            Call(arguments=("Fred", "mode=async"), port=port), deadline=SESSION_DEADLINE
        )
        assert result.variables["NOOJEE_STATUS"] == "FAILED"
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()


async def test_after_the_spool_is_deleted_nothing_is_acknowledged_into_it(
    bridge: Bridge, simulator: NoojeeSimulator, tmp_path: Path
) -> None:
    """Once the spool file is gone, /readyz says so naming it, an async stop is FAILED (never
    QUEUED into the deleted file), and a stop NoojeeContact confirms at once still works."""
    assert (await call(bridge, "Fred", "mode=async")).variables["NOOJEE_STATUS"] == "QUEUED"
    path = _delete_spool(tmp_path)
    problems = await bridge.readiness()
    assert any(f"the spool file {path} was deleted" in p for p in problems), problems
    after = await call(bridge, "Fred", "mode=async", uniqueid="2.2")
    assert after.variables["NOOJEE_STATUS"] == "FAILED"
    assert (await call(bridge, "Fred", uniqueid="3.3")).variables["NOOJEE_STATUS"] == "STOPPED"


async def test_stops_queued_before_the_spool_was_deleted_are_still_delivered(
    bridge: Bridge, simulator: NoojeeSimulator, tmp_path: Path
) -> None:
    """Stops QUEUED while NoojeeContact was down, then the spool file deleted: nothing new is
    queued into it (FAILED), but the stops it already held are delivered from the open file
    once NoojeeContact is back, the one copy of them left."""
    simulator.set_failure(FailureMode.HTTP_503)
    for uniqueid in ("1.1", "1.2"):
        result = await call(bridge, "Fred", "mode=async", "by=uniqueid", uniqueid=uniqueid)
        assert result.variables["NOOJEE_STATUS"] == "QUEUED"
    _delete_spool(tmp_path)
    after = await call(bridge, "Fred", "mode=async", "by=uniqueid", uniqueid="2.2")
    assert after.variables["NOOJEE_STATUS"] == "FAILED"
    assert bridge.spool.lost is not None
    simulator.clear()
    simulator.set_failure(FailureMode.NONE)
    await simulator.wait_for(2)
    assert sorted(r.params["extenOrUniqueId"] for r in simulator.received) == ["1.1", "1.2"]


async def test_sigterm_lets_the_session_in_flight_finish_then_exits_0(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """SIGTERM during a session: the session completes with STOPPED, the process exits 0."""
    process, port = await _start_process(simulator, ca_file, tmp_path)
    simulator.set_failure(FailureMode.SLOW, delay=0.5)
    session = asyncio.create_task(_call_port(port))
    await simulator.wait_for(1)
    process.send_signal(signal.SIGTERM)
    result = await session
    assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    assert result.variables["NOOJEE_STATUS"] == "STOPPED"


async def test_second_signal_exits_at_once_and_keeps_what_is_queued(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A second SIGTERM while a session is held exits immediately (status 130); the stop in
    flight is in the spool and is delivered by the next process."""
    process, port = await _start_process(simulator, ca_file, tmp_path)
    simulator.set_failure(FailureMode.SLOW, delay=30)
    session = asyncio.create_task(_call_port(port))
    await simulator.wait_for(1)
    assert await _signal_twice(process) == 130
    await session
    simulator.set_failure(FailureMode.NONE)
    simulator.clear()
    process, _ = await _start_process(simulator, ca_file, tmp_path)
    try:
        [replayed] = await simulator.wait_for(
            1, timeout=30, predicate=lambda r: r.path == STOP_PATH and r.answered_code == 0
        )
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()
    assert replayed.params["agentLoginName"] == "Fred"


async def test_second_signal_shortens_the_stop_and_every_session_gets_a_status(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Two SIGTERMs while 60 sessions wait for a NoojeeContact that does not answer: each
    session still hears QUEUED, the process exits 130 well before the grace or the budget
    (stop_budget 5 s, NoojeeContact 30 s) would end, and the next start delivers all 60."""
    sessions = 60
    process, port = await _start_process(simulator, ca_file, tmp_path)
    simulator.set_failure(FailureMode.SLOW, delay=30)
    calls = [
        asyncio.create_task(
            run_call(
                Call(arguments=("Fred", "by=uniqueid"), uniqueid=f"1700.{i}", port=port),
                deadline=40,
            )
        )
        for i in range(sessions)
    ]
    await simulator.wait_for(sessions, predicate=lambda r: r.path == STOP_PATH)
    # Generous against a loaded box; the budget alone would hold the sessions 5 s.
    assert await _signal_twice(process, within=4) == 130
    results = await asyncio.gather(*calls)
    assert [r.variables.get("NOOJEE_STATUS") for r in results] == ["QUEUED"] * sessions
    simulator.set_failure(FailureMode.NONE)
    simulator.clear()
    process, _ = await _start_process(simulator, ca_file, tmp_path)
    try:
        replayed = await simulator.wait_for(
            sessions,
            timeout=30,
            predicate=lambda r: r.path == STOP_PATH and r.answered_code == 0,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()
    assert {r.params["extenOrUniqueId"] for r in replayed} == {f"1700.{i}" for i in range(sessions)}


async def test_sighup_is_logged_and_changes_nothing(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """SIGHUP (a closed terminal, log rotation) while a session is held: one log line, the
    session still ends STOPPED, and the bridge keeps serving until SIGTERM (exit 0)."""
    process, port = await _start_process(simulator, ca_file, tmp_path)
    simulator.set_failure(FailureMode.SLOW, delay=0.5)
    session = asyncio.create_task(_call_port(port))
    await simulator.wait_for(1)
    process.send_signal(signal.SIGHUP)
    await _wait_for_line(process, b"agi.server.sighup_ignored")
    assert (await session).variables["NOOJEE_STATUS"] == "STOPPED"
    simulator.set_failure(FailureMode.NONE)
    assert (await _call_port(port)).variables["NOOJEE_STATUS"] == "STOPPED"
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), timeout=15) == 0


async def test_a_start_in_flight_at_a_second_signal_is_never_sent_again(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A start NoojeeContact received but has not answered when two SIGTERMs end the bridge:
    the next process settles it unconfirmed and never sends it (one start, one leg), while a
    stop queued after it is delivered."""
    process, port = await _start_process(simulator, ca_file, tmp_path)
    simulator.set_failure(FailureMode.SLOW, delay=30)
    start = Call(script="recording/start", arguments=("Fred", "by=uniqueid"), port=port)
    session = asyncio.create_task(run_call(start, deadline=40))
    await simulator.wait_for(1)
    assert await _signal_twice(process) == 130
    await session
    simulator.set_failure(FailureMode.NONE)
    process, port = await _start_process(simulator, ca_file, tmp_path)
    try:
        await _call_port(port)  # a stop, sent after the restart: the spool was looked at
        await simulator.wait_for(1, timeout=30, predicate=lambda r: r.path == STOP_PATH)
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()
    assert [r.path.rsplit("/", 1)[-1] for r in simulator.received] == ["start", "stop"]


async def _signal_twice(process: asyncio.subprocess.Process, within: float = 5) -> int:
    """SIGTERM, and a second one once the first is handled (two sent back to back may merge
    in the kernel); the exit status, which must come ``within`` seconds."""
    process.send_signal(signal.SIGTERM)
    await _wait_for_line(process, b"agi.server.stopping")
    process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), timeout=within)


async def _wait_for_line(process: asyncio.subprocess.Process, marker: bytes) -> None:
    await _line_with(process, marker)


async def _line_with(process: asyncio.subprocess.Process, marker: bytes) -> bytes:
    """The next line of the bridge's log that holds ``marker``."""
    assert process.stderr is not None
    while line := await process.stderr.readline():
        if marker in line:
            return line
    raise AssertionError(f"the bridge never logged {marker!r}")


async def _call_port(port: int) -> SessionResult:
    return await run_call(Call(arguments=("Fred",), port=port), deadline=40)


async def test_garbage_from_noojee_queues_and_the_worker_survives(
    ca_file: Path, tmp_path: Path, simulator: NoojeeSimulator
) -> None:
    """A proxy answering garbage instead of HTTP: the call gets QUEUED (not silence), and the
    spool worker, which met the same garbage, keeps running."""

    async with raw_http_server() as port:
        settings = make_settings(
            simulator, ca_file, tmp_path, noojee_url=f"http://127.0.0.1:{port}/servicemanager/rest"
        )
        async with running_bridge(settings) as bridge:
            queued = await call(bridge, "Fred", "mode=sync")
            async_queued = await call(bridge, "Fred", "mode=async", uniqueid="8.8")
            worker_alive = not _worker_dead(bridge)
            problems = await bridge.readiness()
    assert queued.variables["NOOJEE_STATUS"] == "QUEUED"
    assert async_queued.variables["NOOJEE_STATUS"] == "QUEUED"
    assert worker_alive
    assert not any("worker" in p for p in problems)


def _worker_dead(bridge: Bridge) -> bool:
    worker = bridge._worker
    return worker is None or worker.done()


@contextlib.asynccontextmanager
async def _busy_noojee(
    retry_after: str, busy: int, done: asyncio.Event
) -> AsyncIterator[tuple[int, list[float]]]:
    """An HTTP NoojeeContact whose first ``busy`` requests get 503 with ``Retry-After``, the
    next ``busy`` a success (then ``done`` is set); yields its port and the loop time of every
    request it received."""
    loop = asyncio.get_running_loop()
    seen: list[float] = []
    busy_answer = (
        f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {retry_after}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    body = b'{"Message":"Recording stopped","Code":0}'
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    writers: set[asyncio.StreamWriter] = set()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                seen.append(loop.time())
                writer.write(busy_answer if len(seen) <= busy else ok)
                await writer.drain()
                if len(seen) == 2 * busy:
                    done.set()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("retry_after", "retry_max_delay", "least_gap"),
    [
        ("1", 5.0, 1.0),  # honoured: nothing more before 1 s, though the backoff starts at 50 ms
        ("3600", 0.3, 0.3),  # bounded: an hour is cut to retry_max_delay
    ],
)
async def test_retry_after_is_honoured_and_bounded(
    simulator: NoojeeSimulator,
    ca_file: Path,
    tmp_path: Path,
    retry_after: str,
    retry_max_delay: float,
    least_gap: float,
) -> None:
    """Four queued stops meet 503 with Retry-After: the worker sends nothing more until the
    Retry-After (at most retry_max_delay) has passed, then delivers all four."""
    entries = 4
    delivered = asyncio.Event()
    async with _busy_noojee(retry_after, entries, delivered) as (port, seen):
        settings = make_settings(
            simulator,
            ca_file,
            tmp_path,
            noojee_url=f"http://127.0.0.1:{port}/servicemanager/rest",
            retry_max_delay=retry_max_delay,
        )
        async with running_bridge(settings) as bridge:
            for i in range(entries):
                result = await call(bridge, "Fred", "mode=async", uniqueid=f"1700.{i}")
                assert result.variables["NOOJEE_STATUS"] == "QUEUED"
            await delivered.wait()
    assert len(seen) == 2 * entries  # each sent once more, none twice
    assert seen[entries] - max(seen[:entries]) >= least_gap
    spool = Spool(tmp_path)
    spool.open(create=False)
    try:
        assert spool.admin.stats().pending == 0
    finally:
        spool.close()
