"""Issue 18's table, each row reproduced against a bridge in front of the simulator over real
HTTPS: a start reaches NoojeeContact at most once, a request by extension never reaches
another call, and only NoojeeContact's answer confirms.

Timeouts are scaled down from the issue's (a 9 s silence against a 5 s request timeout becomes
5 s against 0.3 s): what is asserted is what reaches the simulator, not how long it takes.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agi_bridge.app import Bridge
from agi_bridge.settings import Settings
from agi_bridge.spool import SPOOL_FILE, SpoolEntry
from agi_bridge.testing.simulator import FailureMode, NoojeeSimulator
from tests.bridge_helpers import call, make_settings, running_bridge, running_simulator

STOP_PATH = "/servicemanager/rest/CallManagementAPI/stop"
START_PATH = "/servicemanager/rest/CallManagementAPI/start"
# The agent's phone (PJSIP/410-...) and the uniqueid of the call it is on.
CALL = "1764633600.41"
# Bounds every wait for a state, so that a broken bridge fails the test instead of hanging it.
STATE_TIMEOUT = 10.0
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
async def simulator(server_ssl_context: ssl.SSLContext) -> AsyncIterator[NoojeeSimulator]:
    async with running_simulator(server_ssl_context) as simulator:
        yield simulator


def _settings(simulator: NoojeeSimulator, ca_file: Path, data: Path, **extra: Any) -> Settings:
    # 0.3 s without an answer is a read timeout; the sync budget ends before it (QUEUED).
    values: dict[str, Any] = {"noojee_timeout": 0.3, "start_budget": 0.2, "stop_budget": 0.2}
    return make_settings(simulator, ca_file, data, **(values | extra))


async def _until(what: str, check: Callable[[], bool]) -> None:
    """Wait for a state of the bridge that no event announces (a spool entry settled)."""
    async with asyncio.timeout(STATE_TIMEOUT):
        # The spool announces no change: poll the state, bounded above (not a timing guess).
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert check(), what


def _dead(bridge: Bridge) -> list[SpoolEntry]:
    return bridge.spool.admin.list("dead")


def _starts(simulator: NoojeeSimulator) -> int:
    return sum(1 for r in simulator.received if r.path == START_PATH)


async def _marker(bridge: Bridge, simulator: NoojeeSimulator, uniqueid: str) -> None:
    """A stop queued now and delivered: everything queued before it was looked at."""
    await call(bridge, "Fred", "by=uniqueid", "mode=async", uniqueid=uniqueid)
    await simulator.wait_for(
        1, predicate=lambda r: r.params.get("extenOrUniqueId") == uniqueid, timeout=STATE_TIMEOUT
    )


# --- row 1: a start applied, then no answer -------------------------------------------------


async def test_a_start_without_an_answer_reaches_noojeecontact_once(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """NoojeeContact applies a start and does not answer: the dialplan hears QUEUED, the
    start is settled unconfirmed (never retried, nor after a restart): one start, one leg."""
    settings = _settings(simulator, ca_file, tmp_path)
    simulator.set_failure(FailureMode.SLOW, delay=5)
    async with running_bridge(settings) as bridge:
        first = await call(bridge, "Fred", "by=uniqueid", script="recording/start", uniqueid=CALL)
        assert first.variables["NOOJEE_STATUS"] == "QUEUED"
        await _until("start settled", lambda: [e.reason for e in _dead(bridge)] == ["unconfirmed"])
        simulator.set_failure(FailureMode.NONE)
        repeat = await call(bridge, "Fred", "by=uniqueid", script="recording/start", uniqueid=CALL)
        await _marker(bridge, simulator, "1764633600.90")
    assert repeat.variables["NOOJEE_STATUS"] == "UNCONFIRMED"
    assert "not sent again" in repeat.variables["NOOJEE_MESSAGE"]
    async with running_bridge(settings) as bridge:
        await _marker(bridge, simulator, "1764633600.91")
    assert _starts(simulator) == 1


async def test_a_start_refused_at_connect_is_sent_again(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Connection refused: the start certainly never reached NoojeeContact, so it is queued
    and delivered once NoojeeContact is back."""
    simulator.set_failure(FailureMode.REFUSE)
    async with running_bridge(_settings(simulator, ca_file, tmp_path)) as bridge:
        first = await call(bridge, "Fred", "by=uniqueid", script="recording/start", uniqueid=CALL)
        assert first.variables["NOOJEE_STATUS"] == "QUEUED"
        simulator.set_failure(FailureMode.NONE)
        [start] = await simulator.wait_for(1, timeout=STATE_TIMEOUT)
    assert (start.path, start.answered_code) == (START_PATH, 0)
    assert _starts(simulator) == 1


# --- row 2: a request by extension queued during an outage ----------------------------------


async def test_the_calls_own_stop_cancels_its_queued_request_by_extension(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """The stop code by extension during an outage (QUEUED), then the call's hangup stop by
    uniqueid: after the outage only the hangup stop is delivered; extension 410 (by now on another
    customer's call) gets nothing."""
    simulator.set_failure(FailureMode.REFUSE)
    async with running_bridge(_settings(simulator, ca_file, tmp_path)) as bridge:
        code = await call(bridge, "Fred", "by=extension", uniqueid=CALL)
        assert code.variables["NOOJEE_STATUS"] == "QUEUED"
        hangup = await call(bridge, "Fred", "by=uniqueid", "mode=async", uniqueid=CALL)
        assert hangup.variables["NOOJEE_STATUS"] == "QUEUED"
        await _until("cancelled", lambda: [e.reason for e in _dead(bridge)] == ["cancelled"])
        simulator.set_failure(FailureMode.NONE)
        await _marker(bridge, simulator, "1764633600.90")
    targets = [r.params["extenOrUniqueId"] for r in simulator.received]
    assert targets[0] == CALL
    assert "410" not in targets


async def test_the_end_stop_on_the_customers_channel_cancels_a_members_stop_code(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A queue call: the stop code runs on the member's leg, the end stop on the customer's channel
    (another uniqueid); both name the call by its linkedid (call=), so the end stop still
    cancels the stop code's request queued by extension."""
    linkedid, member_leg = "1764633600.40", "1764633600.43"
    simulator.set_failure(FailureMode.REFUSE)
    async with running_bridge(_settings(simulator, ca_file, tmp_path)) as bridge:
        code = await call(bridge, "Fred", "by=extension", f"call={linkedid}", uniqueid=member_leg)
        assert code.variables["NOOJEE_STATUS"] == "QUEUED"
        await call(
            bridge, "Fred", f"id={linkedid}", "mode=async", f"call={linkedid}", uniqueid=linkedid
        )
        await _until("cancelled", lambda: [e.reason for e in _dead(bridge)] == ["cancelled"])
        simulator.set_failure(FailureMode.NONE)
        await _marker(bridge, simulator, "1764633600.90")
    targets = [r.params["extenOrUniqueId"] for r in simulator.received]
    assert targets[0] == linkedid
    assert "410" not in targets


async def test_a_code_pressed_after_its_calls_end_stop_is_never_sent(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """The stop code races the customer's hangup and arrives after the call's end stop: it is
    EXPIRED, not queued: by extension it would reach extension 410's next call."""
    linkedid, member_leg = "1764633600.40", "1764633600.43"
    simulator.set_failure(FailureMode.REFUSE)
    async with running_bridge(_settings(simulator, ca_file, tmp_path)) as bridge:
        await call(
            bridge, "Fred", f"id={linkedid}", "mode=async", f"call={linkedid}", uniqueid=linkedid
        )
        late = await call(bridge, "Fred", "by=extension", f"call={linkedid}", uniqueid=member_leg)
        assert late.variables["NOOJEE_STATUS"] == "EXPIRED"
        simulator.set_failure(FailureMode.NONE)
        await _marker(bridge, simulator, "1764633600.90")
    targets = [r.params["extenOrUniqueId"] for r in simulator.received]
    assert "410" not in targets


async def test_the_calls_own_stop_cancels_it_after_a_restart_too(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A stop code by extension queued by the previous process is still cancelled by its call's own
    stop: the new process learns from the spool which calls have requests by extension."""
    settings = _settings(simulator, ca_file, tmp_path)
    simulator.set_failure(FailureMode.REFUSE)
    async with running_bridge(settings) as bridge:
        await call(bridge, "Fred", "by=extension", uniqueid=CALL)
    async with running_bridge(settings) as bridge:
        await call(bridge, "Fred", "by=uniqueid", "mode=async", uniqueid=CALL)
        await _until("cancelled", lambda: [e.reason for e in _dead(bridge)] == ["cancelled"])
        simulator.set_failure(FailureMode.NONE)
        await _marker(bridge, simulator, "1764633600.90")
    assert "410" not in [r.params["extenOrUniqueId"] for r in simulator.received]


async def test_a_request_by_extension_expires_and_a_repeat_hears_it(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Without the call's own stop, a stop code by extension expires after extension_max_age and is
    never sent; the repeat within the window hears EXPIRED, the press after it is fresh."""
    settings = _settings(simulator, ca_file, tmp_path, extension_max_age=0.5)
    simulator.set_failure(FailureMode.REFUSE)
    async with running_bridge(settings) as bridge:
        await call(bridge, "Fred", "by=extension", uniqueid=CALL)
        await _until("expired", lambda: [e.reason for e in _dead(bridge)] == ["expired"])
        simulator.set_failure(FailureMode.NONE)
        await _marker(bridge, simulator, "1764633600.90")
        assert len(simulator.received) == 1  # the marker alone
        repeat = await call(bridge, "Fred", "by=extension", uniqueid=CALL)
        fresh = await call(bridge, "Fred", "by=extension", uniqueid=CALL)
    assert repeat.variables["NOOJEE_STATUS"] == "EXPIRED"
    assert fresh.variables["NOOJEE_STATUS"] == "STOPPED"
    assert [r.params["extenOrUniqueId"] for r in simulator.received] == ["1764633600.90", "410"]


async def test_a_repeat_never_hears_expired_while_the_start_is_on_its_way(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """*8 by extension, NoojeeContact slow: pressed again past extension_max_age while the
    first start is still on its way, the agent hears QUEUED, not EXPIRED ("press again"):
    that start may yet be applied. One start reaches NoojeeContact."""
    max_age = 0.3
    settings = _settings(simulator, ca_file, tmp_path, extension_max_age=max_age, noojee_timeout=5)
    simulator.set_failure(FailureMode.SLOW, delay=1.5)
    async with running_bridge(settings) as bridge:
        pressed = time.monotonic()
        first = await call(bridge, "Fred", "by=extension", script="recording/start", uniqueid=CALL)
        assert first.variables["NOOJEE_STATUS"] == "QUEUED"
        await _until("past its validity", lambda: time.monotonic() > pressed + max_age)
        again = await call(bridge, "Fred", "by=extension", script="recording/start", uniqueid=CALL)
        assert again.variables["NOOJEE_STATUS"] == "QUEUED", again.variables
        assert "being sent" in again.variables["NOOJEE_MESSAGE"]
        await _until(
            "the start answered", lambda: any(r.answered_code == 0 for r in simulator.received)
        )
        simulator.set_failure(FailureMode.NONE)
        await _marker(bridge, simulator, "1764633600.90")
    assert _starts(simulator) == 1


async def test_stops_by_uniqueid_keep_their_retry_horizon(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """A stop by uniqueid outlives extension_max_age: delivered after the outage."""
    max_age = 0.05
    settings = _settings(simulator, ca_file, tmp_path, extension_max_age=max_age)
    simulator.set_failure(FailureMode.REFUSE)
    async with running_bridge(settings) as bridge:
        await call(bridge, "Fred", "by=uniqueid", uniqueid=CALL)
        await call(bridge, "Fred", "by=extension", uniqueid="1764633600.42")
        [by_extension] = [
            e for e in bridge.spool.admin.list("pending") if e.request.kind == "extension"
        ]
        # NoojeeContact comes back only once the request by extension is past its validity:
        # the worker may reach it at once, and the outage alone does not make it old enough.
        await _until("past its validity", lambda: time.time() > by_extension.created + max_age)
        simulator.set_failure(FailureMode.NONE)
        await _marker(bridge, simulator, "1764633600.90")
        assert [e.reason for e in _dead(bridge)] == ["expired"]
    stop, _marker_stop = simulator.received
    assert (stop.params["extenOrUniqueId"], stop.answered_code) == (CALL, 0)


# --- row 3: a 2xx that is not NoojeeContact's answer ----------------------------------------


@pytest.mark.parametrize("mode", [FailureMode.LOGIN_PAGE, FailureMode.CUT_OFF_JSON])
async def test_an_answer_that_is_not_noojeecontacts_confirms_nothing(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path, mode: FailureMode
) -> None:
    """HTTP 200 with a login page or cut-off JSON: the stop is QUEUED (never STOPPED), kept
    and delivered once NoojeeContact answers; the start is UNCONFIRMED and never resent."""
    simulator.set_failure(mode)
    async with running_bridge(_settings(simulator, ca_file, tmp_path, stop_budget=1)) as bridge:
        stop = await call(bridge, "Fred", "by=uniqueid", uniqueid=CALL)
        start = await call(
            bridge, "Fred", "by=uniqueid", script="recording/start", uniqueid="1764633600.42"
        )
        await _until("start settled", lambda: [e.reason for e in _dead(bridge)] == ["unconfirmed"])
        assert [e.request.action for e in bridge.spool.admin.list("pending")] == ["stop"]
        simulator.set_failure(FailureMode.NONE)
        delivered = await simulator.wait_for(
            1, predicate=lambda r: r.answered_code == 0, timeout=STATE_TIMEOUT
        )
        await _marker(bridge, simulator, "1764633600.90")
    assert stop.variables["NOOJEE_STATUS"] == "QUEUED"
    assert "unexpected answer, HTTP 200" in stop.variables["NOOJEE_MESSAGE"]
    assert start.variables["NOOJEE_STATUS"] == "UNCONFIRMED"
    assert [(r.path, r.params["extenOrUniqueId"]) for r in delivered] == [(STOP_PATH, CALL)]
    assert _starts(simulator) == 1


# --- upgrade: a spool written by the previous release ---------------------------------------


async def test_a_spool_of_the_previous_release_is_migrated_and_delivered(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """tests/fixtures/spool-v0.sqlite3, written by the release before spool schema versions:
    the new bridge delivers its stop and its start by uniqueid, never sends the starts that
    release may have sent, nor the year-old request by extension."""
    data = tmp_path / "data"
    data.mkdir()
    (data / SPOOL_FILE).write_bytes((FIXTURES / "spool-v0.sqlite3").read_bytes())
    # The fixture's entries are from 2025: an age limit that still lets a uniqueid through.
    settings = _settings(simulator, ca_file, data, retry_max_age=10 * 365 * 86400.0)
    async with running_bridge(settings) as bridge:
        delivered = await simulator.wait_for(2, timeout=STATE_TIMEOUT)
        await _marker(bridge, simulator, "1764633600.90")
        dead = {e.id: e.reason for e in _dead(bridge)}
    assert sorted((r.path, r.params["extenOrUniqueId"]) for r in delivered) == [
        (START_PATH, "1764633590.18"),
        (STOP_PATH, "1764633590.17"),
    ]
    assert len(simulator.received) == 3  # and the marker: nothing else
    assert dead == {2: "expired", 4: "unconfirmed", 5: "unconfirmed", 6: "failed"}
