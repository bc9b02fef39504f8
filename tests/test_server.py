"""Fake Asterisk -> bridge -> NoojeeContact simulator, over real loopback sockets and real HTTPS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import sqlite3
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import structlog

from agi_bridge.app import Bridge
from agi_bridge.delivery import Delivery
from agi_bridge.delivery.config import DeliveryConfig
from agi_bridge.logs import configure_logging
from agi_bridge.metrics import Metrics
from agi_bridge.noojee import NoojeeClient
from agi_bridge.spool import SPOOL_FILE, Spool
from agi_bridge.testing.fake_asterisk import Call, environment_block
from agi_bridge.testing.simulator import FailureMode, NoojeeSimulator
from agi_bridge.vocabulary import RecordingRequest
from tests.bridge_helpers import API_KEY, call, make_settings, running_bridge, running_simulator

STOP_PATH = "/servicemanager/rest/CallManagementAPI/stop"
START_PATH = "/servicemanager/rest/CallManagementAPI/start"


@pytest.fixture
async def simulator(server_ssl_context: ssl.SSLContext) -> AsyncIterator[NoojeeSimulator]:
    async with running_simulator(server_ssl_context) as simulator:
        yield simulator


def _api(simulator: NoojeeSimulator) -> list[dict[str, str]]:
    """Parameters of every recording request the simulator received (not /Time)."""
    return [dict(r.params) for r in simulator.received if "CallManagementAPI" in r.path]


@pytest.mark.parametrize("auth", ["apikey", "hash"])
async def test_stop_by_extension_reaches_noojee_and_the_dialplan(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path, auth: str
) -> None:
    """AGI(agi://.../recording/stop,Fred) on PJSIP/410-... stops extension 410 as Fred."""
    settings = make_settings(simulator, ca_file, tmp_path, noojee_auth=auth)
    async with running_bridge(settings) as bridge:
        result = await call(bridge, "Fred", channel="PJSIP/410-00000001")
    assert result.variables == {"NOOJEE_STATUS": "STOPPED", "NOOJEE_MESSAGE": "Recording stopped"}
    assert result.agistatus == "SUCCESS"
    [request] = [r for r in simulator.received if r.path == STOP_PATH]
    assert request.method == "POST"
    assert request.body == b""
    assert request.params["extenOrUniqueId"] == "410"
    assert request.params["agentLoginName"] == "Fred"
    assert request.auth == auth
    if auth == "apikey":
        assert request.params["apiKey"] == API_KEY
        assert set(request.params) == {"extenOrUniqueId", "agentLoginName", "apiKey"}
    else:
        stamp = request.params["timeStamp"]
        expected = hashlib.sha256(f"{API_KEY}:{stamp}".encode()).hexdigest()
        assert request.params["hash"] == expected
        assert set(request.params) == {"extenOrUniqueId", "agentLoginName", "timeStamp", "hash"}
        assert API_KEY not in json.dumps([r.to_json() for r in simulator.received])


@pytest.mark.parametrize("auth", ["apikey", "hash"])
async def test_start_by_uniqueid_with_tag_from_the_query_string(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path, auth: str
) -> None:
    """recording/start?by=uniqueid with tag= sends the call's uniqueid and the tag, no agent."""
    settings = make_settings(simulator, ca_file, tmp_path, noojee_auth=auth)
    async with running_bridge(settings) as bridge:
        result = await call(
            bridge, "tag=Sale 42", script="recording/start?by=uniqueid", uniqueid="1795811871.7"
        )
    assert result.variables["NOOJEE_STATUS"] == "STARTED"
    [params] = _api(simulator)
    assert params["extenOrUniqueId"] == "1795811871.7"
    assert params["tag"] == "Sale 42"
    assert "agentLoginName" not in params
    assert [r.path for r in simulator.received if "CallManagementAPI" in r.path] == [START_PATH]


async def test_explicit_id_and_agents_map(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """by=id sends the given id; the agent comes from the extension -> agent map."""
    settings = make_settings(simulator, ca_file, tmp_path, agents={"410": "Wilma"})
    async with running_bridge(settings) as bridge:
        result = await call(bridge, "by=id", "id=1795811871.3", channel="PJSIP/410-0000000a")
    assert result.variables["NOOJEE_STATUS"] == "STOPPED"
    assert _api(simulator)[0]["extenOrUniqueId"] == "1795811871.3"
    assert _api(simulator)[0]["agentLoginName"] == "Wilma"


@pytest.mark.parametrize(
    ("script", "arguments", "reason"),
    [
        ("recording/pause", (), "unknown route"),
        ("", (), "unknown route"),
        ("recording/stop", ("colour=red",), "unknown parameter 'colour'"),
        ("recording/stop", (), "stop needs an agent"),
        ("recording/stop", ("Fred", "tag=x"), "tag is only accepted by recording/start"),
        ("recording/stop?by=channel", ("Fred",), "by='channel'"),
    ],
)
async def test_bad_requests_are_rejected_without_calling_noojee(
    simulator: NoojeeSimulator,
    ca_file: Path,
    tmp_path: Path,
    script: str,
    arguments: tuple[str, ...],
    reason: str,
) -> None:
    """Unknown routes and bad arguments end as REJECTED with the reason; nothing is sent."""
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        result = await call(bridge, *arguments, script=script)
    assert result.variables["NOOJEE_STATUS"] == "REJECTED"
    assert reason in result.variables["NOOJEE_MESSAGE"]
    assert _api(simulator) == []


async def test_permission_denied_is_failed_and_dead_lettered(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A NoojeeContact error (Code < 0) is FAILED, kept in the dead letters, never retried."""
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        result = await call(bridge, "Pebbles")
        await bridge.delivery.drain(5)
    assert result.variables == {"NOOJEE_STATUS": "FAILED", "NOOJEE_MESSAGE": "Permission denied"}
    spool = Spool(tmp_path)
    spool.open()
    try:
        [dead] = spool.admin.list("dead")
        assert spool.admin.list("pending") == []
    finally:
        spool.close()
    assert dead.last_error == "Permission denied"
    assert dead.request.agent == "Pebbles"
    assert len(_api(simulator)) == 1


@pytest.mark.parametrize(
    "mode", [FailureMode.HTTP_500, FailureMode.HTTP_503, FailureMode.REFUSE, FailureMode.RESET]
)
async def test_transient_failures_queue_then_deliver_when_noojee_is_back(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path, mode: FailureMode
) -> None:
    """5xx, refused and reset answer QUEUED; the stop arrives once NoojeeContact is back."""
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        simulator.set_failure(mode)
        result = await call(bridge, "Fred")
        assert result.variables["NOOJEE_STATUS"] == "QUEUED"
        simulator.set_failure(FailureMode.NONE)
        delivered = await simulator.wait_for(
            1, predicate=lambda r: r.path == STOP_PATH and r.answered_code == 0
        )
    assert delivered[0].params["agentLoginName"] == "Fred"


async def test_html_404_is_a_permanent_failure(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A wrong base URL (HTML 404) is FAILED with the status in the message, not retried."""
    simulator.set_failure(FailureMode.HTML_404)
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        result = await call(bridge, "Fred")
    assert result.variables["NOOJEE_STATUS"] == "FAILED"
    assert "404" in result.variables["NOOJEE_MESSAGE"]


async def test_slow_noojee_holds_the_call_only_for_the_budget(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """NoojeeContact slower than the budget: QUEUED within the budget; the late answer settles
    the spool entry, so the stop is sent exactly once."""
    budget = 0.3
    settings = make_settings(simulator, ca_file, tmp_path, stop_budget=budget)
    simulator.set_failure(FailureMode.SLOW, delay=1.0)
    async with running_bridge(settings) as bridge:
        result = await call(bridge, "Fred")
        simulator.set_failure(FailureMode.NONE)
        await bridge.delivery.drain(5)
        stats = await bridge.spool.stats()
    assert result.variables["NOOJEE_STATUS"] == "QUEUED"
    assert "did not answer within 0.3s" in result.variables["NOOJEE_MESSAGE"]
    # The bound the product promises: the budget plus a few round trips on loopback.
    assert result.hold < budget + 0.25
    assert stats.pending == 0
    assert len(_api(simulator)) == 1


@contextlib.asynccontextmanager
async def _stop_in_flight(
    bridge: Bridge, simulator: NoojeeSimulator
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A fake Asterisk session whose stop has reached NoojeeContact: its reader and writer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.server.port)
    try:
        writer.write(environment_block(Call(arguments=("Fred",))))
        await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
        yield reader, writer
    finally:
        writer.close()


async def test_a_stop_waits_for_the_answer_a_late_attempt_handed_off(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """The bridge stops while a sync attempt outlives its budget: at the budget's end the
    session is answered QUEUED by a task of its own (the attempt goes on in the session's),
    and stop() waits for that answer to end, after the attempt is over and settled."""
    settings = make_settings(simulator, ca_file, tmp_path, stop_budget=0.2, shutdown_grace=30)
    simulator.set_failure(FailureMode.SLOW, delay=0.5)
    bridge = Bridge(settings)
    await bridge.start()
    with structlog.testing.capture_logs() as logs:
        async with _stop_in_flight(bridge, simulator) as (reader, writer):
            stopping = asyncio.create_task(bridge.stop())
            command = await asyncio.wait_for(reader.readline(), timeout=10)
            await bridge.delivery.drain(10)  # the late attempt, and the record of its answer
            # stop() must still wait for Asterisk's reply to the handed-off answer; with
            # nothing else left to wait for, a second is ample for it to have ended otherwise.
            done, _ = await asyncio.wait((stopping,), timeout=1.0)
            assert not done
            writer.write(b"200 result=1\n")
            await asyncio.wait_for(stopping, timeout=10)
    assert command.startswith(b"SET VARIABLE ")
    assert b"QUEUED" in command
    [finished] = [entry for entry in logs if entry["event"] == "agi.session.finished"]
    assert (finished["status"], finished["variables_set"]) == ("QUEUED", True)
    spool = Spool(tmp_path)
    spool.open(create=False)
    try:
        assert spool.admin.stats().pending == 0  # the late answer settled the entry
    finally:
        spool.close()
    assert len(_api(simulator)) == 1


async def test_the_server_stop_leaves_an_attempt_that_outlived_its_answer_to_drain(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """The listener stops while a sync attempt is under way; the budget ends, the session is
    answered and over: the listener's stop returns then, and leaves the attempt (which
    NoojeeContact holds for a minute) to the delivery's drain."""
    settings = make_settings(
        simulator, ca_file, tmp_path, stop_budget=0.5, noojee_timeout=60, shutdown_grace=60
    )
    simulator.set_failure(FailureMode.SLOW, delay=60)
    async with running_bridge(settings) as bridge:
        async with _stop_in_flight(bridge, simulator) as (reader, writer):
            stopping = asyncio.create_task(bridge.server.stop(60))
            command = await asyncio.wait_for(reader.readline(), timeout=10)
            writer.write(b"200 result=1\n")
            await asyncio.wait_for(stopping, timeout=10)  # not the attempt's minute
        bridge.hurry()  # the attempt is cancelled and stays queued: the bridge stops at once
    assert b"QUEUED" in command


async def test_a_session_answered_at_a_second_signal_logs_as_itself(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A second signal answers a session waiting for NoojeeContact from the signal handler,
    outside the session's task: the session still hears QUEUED at once, and its log line still
    names its call."""
    settings = make_settings(simulator, ca_file, tmp_path, stop_budget=30)
    simulator.set_failure(FailureMode.SLOW, delay=30)
    with _json_logs() as stream:
        async with running_bridge(settings) as bridge:
            session = asyncio.create_task(call(bridge, "Fred", uniqueid="7.1"))
            await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
            bridge.hurry()
            result = await session
    assert result.variables["NOOJEE_STATUS"] == "QUEUED"
    assert result.hold < 10  # the budget (30 s) did not run out
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    [finished] = [event for event in events if event["event"] == "agi.session.finished"]
    assert (finished["status"], finished["uniqueid"]) == ("QUEUED", "7.1")


def _spool_inserts(data_dir: Path) -> int:
    """How many entries were ever added to the spool (SQLite's AUTOINCREMENT counter)."""
    with contextlib.closing(sqlite3.connect(data_dir / SPOOL_FILE)) as db:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'pending'").fetchone()
    return 0 if row is None else int(row[0])


@pytest.mark.parametrize(("write_ahead_after", "inserts"), [(30.0, 0), (0.0, 1)])
async def test_a_stop_answered_at_once_never_touches_the_disk(
    simulator: NoojeeSimulator,
    ca_file: Path,
    tmp_path: Path,
    write_ahead_after: float,
    inserts: int,
) -> None:
    """An attempt that succeeds within write_ahead_after is never written to the spool; with
    0 every request is written ahead (and removed once delivered)."""
    settings = make_settings(simulator, ca_file, tmp_path, write_ahead_after=write_ahead_after)
    async with running_bridge(settings) as bridge:
        result = await call(bridge, "Fred")
        await bridge.delivery.drain(5)
        stats = await bridge.spool.stats()
    assert result.variables["NOOJEE_STATUS"] == "STOPPED"
    assert _spool_inserts(tmp_path) == inserts
    assert stats.pending == 0
    assert len(_api(simulator)) == 1


async def test_a_stop_waiting_for_a_busy_connection_is_queued_and_sent_once(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Every NoojeeContact connection busy: a stop waits for one at most its budget, hears
    QUEUED, and the worker sends it once a connection is free; each stop is sent once."""
    budget = 0.3
    settings = make_settings(
        simulator, ca_file, tmp_path, noojee_max_connections=1, stop_budget=budget
    )
    simulator.set_failure(FailureMode.SLOW, delay=1.0)
    async with running_bridge(settings) as bridge:
        holder = asyncio.create_task(call(bridge, "Fred", uniqueid="5.1"))
        await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
        waiter = await call(bridge, "Barney", uniqueid="5.2")
        simulator.set_failure(FailureMode.NONE)
        await simulator.wait_for(
            1, predicate=lambda r: r.path == STOP_PATH and r.params["agentLoginName"] == "Barney"
        )
        await bridge.delivery.drain(5)
        stats = await bridge.spool.stats()
    assert (await holder).variables["NOOJEE_STATUS"] == "QUEUED"
    assert waiter.variables["NOOJEE_STATUS"] == "QUEUED"
    assert waiter.hold < budget + 0.25
    assert sorted(r["agentLoginName"] for r in _api(simulator)) == ["Barney", "Fred"]
    assert stats.pending == 0


async def test_a_delivery_is_recorded_even_when_the_worker_batch_is_cut_short(
    simulator: NoojeeSimulator, tmp_path: Path
) -> None:
    """The worker sends a batch at once; one answer comes back, another hangs, and shutdown
    cancels the batch. The delivered entry is out of the spool (not sent again after the
    restart); the hanging one stays pending."""
    hang = asyncio.Event()

    async def answer(request: httpx.Request) -> httpx.Response:
        if "agentLoginName=Barney" in str(request.url):
            await hang.wait()  # never set: cancelled with the batch
        return httpx.Response(200, json={"Message": "Recording stopped", "Code": 0})

    spool = Spool(tmp_path)
    spool.open()
    client = NoojeeClient(
        base_url=simulator.base_url,
        auth="apikey",
        api_key=API_KEY,
        transport=httpx.MockTransport(answer),
    )
    delivery = Delivery(config=DeliveryConfig(), client=client, spool=spool, metrics=Metrics())
    deleted = asyncio.Event()
    record = spool.remove

    def spy(entry_id: int) -> asyncio.Future[None]:
        write = record(entry_id)
        write.add_done_callback(lambda _: deleted.set())
        return write

    try:
        for agent in ("Fred", "Barney"):
            request = RecordingRequest(action="stop", target="410", agent=agent)
            await spool.add(request, call_uniqueid=f"4.{agent}")
        spool.remove = spy  # type: ignore[method-assign]
        worker = asyncio.create_task(delivery.run())
        await asyncio.wait_for(deleted.wait(), timeout=5)
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        [left] = spool.admin.list("pending")
    finally:
        await client.aclose()
        spool.close()
    assert left.request.agent == "Barney"


async def test_async_mode_answers_queued_and_delivers(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """mode=async answers QUEUED once the request is on disk, and the worker sends it."""
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        result = await call(bridge, "Fred", "mode=async")
        assert result.variables["NOOJEE_STATUS"] == "QUEUED"
        [request] = await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
    assert request.params["agentLoginName"] == "Fred"


async def test_repeat_of_the_same_stop_on_the_same_call_is_sent_once(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Feature code then hangup handler on the same call: one stop reaches NoojeeContact."""
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        first = await call(bridge, "Fred", uniqueid="1795811871.9")
        second = await call(bridge, "Fred", uniqueid="1795811871.9")
        other_call = await call(bridge, "Fred", uniqueid="1795811871.10")
    assert first.variables["NOOJEE_STATUS"] == second.variables["NOOJEE_STATUS"] == "STOPPED"
    assert "sent once" in second.variables["NOOJEE_MESSAGE"]
    assert other_call.variables["NOOJEE_STATUS"] == "STOPPED"
    assert len(_api(simulator)) == 2


async def test_concurrent_repeats_on_one_call_are_sent_once(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Feature code and hangup handler stopping the same call at the same moment: the second
    waits for the first's answer instead of sending its own."""
    simulator.set_failure(FailureMode.SLOW, delay=0.3)
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        first, second = await asyncio.gather(
            call(bridge, "Fred", uniqueid="1795811871.20"),
            call(bridge, "Fred", uniqueid="1795811871.20"),
        )
    statuses = {first.variables["NOOJEE_STATUS"], second.variables["NOOJEE_STATUS"]}
    assert statuses == {"STOPPED"}
    messages = [first.variables["NOOJEE_MESSAGE"], second.variables["NOOJEE_MESSAGE"]]
    assert sum("sent once" in m for m in messages) == 1
    assert len(_api(simulator)) == 1


async def test_an_asterisk_that_stops_answering_is_let_go_at_the_command_deadline(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A peer that takes the SET VARIABLE and never answers it: the session gives up after
    command_timeout and closes the connection; the stop itself was sent."""
    settings = make_settings(simulator, ca_file, tmp_path, command_timeout=0.2)
    async with running_bridge(settings) as bridge:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.server.port)
        writer.write(environment_block(Call(arguments=("Fred",), port=bridge.server.port)))
        first = await reader.readline()
        # Generous margin over the 0.2 s deadline: only a deadline that never fires fails.
        async with asyncio.timeout(10):
            rest = await reader.read()
        writer.close()
    # Both variables in one command (ARRAY()), the status first.
    assert first.startswith(b'SET VARIABLE "ARRAY(NOOJEE_STATUS,NOOJEE_MESSAGE)" "STOPPED,')
    assert rest == b""  # closed without another command
    assert len(_api(simulator)) == 1


async def test_caller_hangs_up_mid_session(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A HANGUP line right after the environment: the stop is still sent and the dead channel
    still gets its variables."""
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        result = await call(bridge, "Fred", hangup_before_commands=True)
    assert result.variables["NOOJEE_STATUS"] == "STOPPED"
    assert len(_api(simulator)) == 1


@contextlib.contextmanager
def _json_logs() -> Iterator[io.StringIO]:
    """The bridge's own logging (JSON, every processor) into a string, for the block."""
    stream = io.StringIO()
    root_handlers = logging.getLogger().handlers[:]
    configure_logging(level="debug", fmt="json", secrets=[API_KEY], stream=stream, cache=False)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers[:] = root_handlers


async def test_logs_never_contain_secrets(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Every log line of a full run, both auth schemes and failures included, is free of the
    API key and of every hash the bridge sent."""
    with _json_logs() as stream:
        # What a library logs through the standard library is scrubbed too (an asyncio
        # "exception was never retrieved" quoting a request URL).
        logging.getLogger("asyncio").error("POST https://x/stop?apiKey=%s failed", API_KEY)
        for auth in ("apikey", "hash"):
            settings = make_settings(simulator, ca_file, tmp_path / auth, noojee_auth=auth)
            async with running_bridge(settings) as bridge:
                await call(bridge, "Fred")
                await call(bridge, "Pebbles", uniqueid="2.2")
                simulator.set_failure(FailureMode.HTTP_500)
                await call(bridge, "Fred", uniqueid="2.3")
                simulator.set_failure(FailureMode.NONE)
                await simulator.wait_for(
                    1,
                    predicate=lambda r: (
                        r.params.get("extenOrUniqueId") == "410"
                        and r.answered_code == 0
                        and r.auth == auth  # noqa: B023  # awaited within this iteration
                    ),
                )
    text = stream.getvalue()
    hashes = {r.params["hash"] for r in simulator.received if "hash" in r.params}
    assert hashes, "the hash scheme was exercised"
    assert text.count("agi.session.finished") == 6
    assert '"logger": "asyncio"' in text
    assert API_KEY not in text
    for value in hashes:
        assert value not in text
    for line in text.splitlines():
        json.loads(line)  # every line is one JSON object


async def test_repeat_after_queued_reports_the_delivery_made_since(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """QUEUED (NoojeeContact too slow), then confirmed late: the agent's repeat hears STOPPED,
    not the first answer, and nothing is sent twice."""
    settings = make_settings(simulator, ca_file, tmp_path, stop_budget=0.3)
    simulator.set_failure(FailureMode.SLOW, delay=0.6)
    async with running_bridge(settings) as bridge:
        first = await call(bridge, "Fred", uniqueid="1795811871.30")
        await bridge.server.delivery.drain(5)  # the late answer settled the spool entry
        repeat = await call(bridge, "Fred", uniqueid="1795811871.30")
    assert first.variables["NOOJEE_STATUS"] == "QUEUED"
    assert repeat.variables == {
        "NOOJEE_STATUS": "STOPPED",
        "NOOJEE_MESSAGE": "repeat within 60s, sent once: delivered since it was queued",
    }
    assert len(_api(simulator)) == 1


async def test_repeat_after_queued_reports_still_queued(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """QUEUED while NoojeeContact is down, and still down at the repeat: QUEUED again, saying
    that the request is still waiting (the recording may still be running)."""
    simulator.set_failure(FailureMode.HTTP_503)
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        first = await call(bridge, "Fred", uniqueid="1795811871.31")
        repeat = await call(bridge, "Fred", uniqueid="1795811871.31")
        simulator.set_failure(FailureMode.NONE)
        await simulator.wait_for(1, predicate=lambda r: r.answered_code == 0)
    assert first.variables["NOOJEE_STATUS"] == "QUEUED"
    assert repeat.variables["NOOJEE_STATUS"] == "QUEUED"
    assert "sent once: still queued: " in repeat.variables["NOOJEE_MESSAGE"]


async def test_repeat_after_queued_reports_the_failure_since(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """QUEUED while NoojeeContact is down; once back it refuses the stop for good (Barney may
    not stop): the repeat hears FAILED with the reason, not QUEUED."""
    simulator.set_failure(FailureMode.HTTP_503)
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        first = await call(bridge, "Barney", uniqueid="1795811871.32")
        simulator.set_failure(FailureMode.NONE)
        await simulator.wait_for(1, predicate=lambda r: r.answered_code == -1)
        # Until the worker has recorded the refusal: a write inside the bridge, no event to
        # wait on; bounded by the timeout.
        async with asyncio.timeout(10):
            while (await bridge.spool.stats()).dead == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        repeat = await call(bridge, "Barney", uniqueid="1795811871.32")
    assert first.variables["NOOJEE_STATUS"] == "QUEUED"
    assert repeat.variables == {
        "NOOJEE_STATUS": "FAILED",
        "NOOJEE_MESSAGE": "repeat within 60s, sent once: failed since it was queued: "
        "Permission denied",
    }


async def test_a_queued_stop_for_a_call_noojee_does_not_know_is_settled_not_dead(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A hangup stop (async) answered "Call not found": the call ended before the stop arrived.
    Not retried, not a dead letter (nobody to page), but counted by kind and logged."""
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        result = await call(bridge, "Fred", "by=id", "id=404", "mode=async")
        [request] = await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
        await bridge.server.delivery.drain(5)
        async with asyncio.timeout(10):  # the worker's write, inside the bridge: no event
            while (await bridge.spool.stats()).pending:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        stats = await bridge.spool.stats()
        errors = bridge.metrics.registry.get_sample_value(
            "agi_bridge_noojee_errors_total", {"kind": "not_found"}
        )
    assert result.variables["NOOJEE_STATUS"] == "QUEUED"
    assert (request.params["extenOrUniqueId"], request.answered_code) == ("404", -1)
    assert (stats.pending, stats.dead) == (0, 0)
    assert errors == 1
    assert len(_api(simulator)) == 1


async def test_a_live_stop_for_a_call_noojee_does_not_know_is_failed(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """The same answer to a live stop (the stop code) is FAILED: the agent must not take it for
    stopped."""
    async with running_bridge(make_settings(simulator, ca_file, tmp_path)) as bridge:
        result = await call(bridge, "Fred", "by=id", "id=404")
        await bridge.server.delivery.drain(5)
        stats = await bridge.spool.stats()
    assert result.variables == {"NOOJEE_STATUS": "FAILED", "NOOJEE_MESSAGE": "Call not found"}
    assert (stats.pending, stats.dead) == (0, 0)
