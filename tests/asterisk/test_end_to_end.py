"""Asterisk 22 + the real agi-bridge (a subprocess) + the NoojeeContact simulator (HTTPS).

Calls are driven over AMI; every test asserts on what Asterisk did (AMI VarSet / Hangup /
Newexten events), what the simulator received, and what the bridge logged. The agent's channel
is the ;2 half of ``Local/410@...``, so the bridge derives extension 410 from its name exactly as
it would from ``PJSIP/410-0000002a``.
"""

from __future__ import annotations

import pytest

from agi_bridge.testing.simulator import FailureMode, NoojeeSimulator

from .codes import DIALLED_START, DIALLED_STOP, START, STOP
from .conftest import AGENTS, BUDGET, START_PATH, STOP_PATH, Ami, BridgeProcess, requests_for

pytestmark = pytest.mark.asterisk

EXT = "410"  # the agent's extension in every call below


async def _newexten(ami: Ami, uniqueid: str, context: str, appdata_part: str) -> None:
    await ami.wait_event(
        lambda e: e.event == "Newexten" and e.get("Uniqueid") == uniqueid
        and e.get("Context") == context and appdata_part in str(e.get("AppData", "")),
        what=f"Newexten {context} '{appdata_part}' on {uniqueid}",
    )  # fmt: skip


# ------------------------------------------------------------------------ in-call feature codes


async def test_feature_code_stop_then_hangup_sends_exactly_one_stop(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """The stop code in a bridged call: one stop for 410 as Fred, STOPPED on the agent's channel,
    a beep, the call goes on; at hangup the handler sees the recording already stopped and sends
    nothing (the stop by extension and a stop by uniqueid would be two different targets)."""
    phone, agent = await ami.originate(
        f"Local/{EXT}@test-agent/n",
        context="test-dtmf",
        variables={"TEST_DTMF": STOP, "TEST_AGENT": "Fred", "TEST_CALLEE_WAIT": "3"},
    )
    await ami.wait_var("NOOJEE_STATUS", "STOPPED", uniqueid=agent)
    await ami.wait_var("NOOJEE_RECORDING", "stopped", uniqueid=agent)
    [stop] = requests_for(simulator, STOP_PATH)
    assert stop.params["extenOrUniqueId"] == EXT
    assert stop.params["agentLoginName"] == "Fred"
    assert (stop.auth, stop.answered_code, stop.http_status) == ("apikey", 0, 200)
    session = await bridge.finished(agent)
    assert (session["status"], session["route"]) == ("STOPPED", "recording/stop")
    assert session["channel"].startswith(f"Local/{EXT}@test-agent-")
    assert session["channel"].endswith(";2")  # "self": the agent's leg ran the feature
    await ami.wait_var("PLAYBACKSTATUS", "SUCCESS", uniqueid=agent)  # the confirmation beep
    # the call went on until the callee hung up, then the hangup handler ran and skipped
    await ami.wait_var("TEST_CALLEE_DONE", "yes", linkedid=phone)
    await ami.wait_var("TEST_AFTER_DIAL", "ANSWER", uniqueid=agent)
    await _newexten(ami, agent, "agi-bridge-hangup", "already stopped on this call")
    await ami.wait_hangup(agent)
    await ami.wait_hangup(phone)
    await bridge.wait_drained()
    assert len(requests_for(simulator, STOP_PATH)) == 1
    assert len(bridge.sessions(agent)) == 1


async def test_feature_code_start_with_tag_then_hangup_handler_stops_by_uniqueid(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """The start code starts with the call's NOOJEE_TAG (its comma made harmless); at hangup the
    handler sends the stop (async) by the agent channel's uniqueid."""
    phone, agent = await ami.originate(
        f"Local/{EXT}@test-agent/n",
        context="test-dtmf",
        variables={"TEST_DTMF": START, "TEST_AGENT": "Fred", "TEST_CALLEE_WAIT": "2",
                   "NOOJEE_TAG": "crm:4711,vip"},
    )  # fmt: skip
    await ami.wait_var("NOOJEE_STATUS", "STARTED", uniqueid=agent)
    [start] = requests_for(simulator, START_PATH)
    assert start.params["extenOrUniqueId"] == EXT
    assert start.params["agentLoginName"] == "Fred"
    assert start.params["tag"] == "crm:4711_vip"
    assert start.answered_code == 0
    await ami.wait_var("PLAYBACKSTATUS", "SUCCESS", uniqueid=agent)
    await ami.wait_var("TEST_AFTER_DIAL", "ANSWER", uniqueid=agent)
    # the hangup handler: QUEUED at once on the dead channel, delivered by the bridge's worker
    await ami.wait_var("NOOJEE_STATUS", "QUEUED", uniqueid=agent)
    [stop] = await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
    assert stop.params["extenOrUniqueId"] == agent  # the uniqueid AMI reported for the channel
    assert stop.params["agentLoginName"] == "Fred"
    assert stop.answered_code == 0
    _, handler = await bridge.wait_sessions(agent, 2)
    assert (handler["route"], handler["status"]) == ("recording/stop", "QUEUED")
    await ami.wait_hangup(phone)


async def test_repeated_feature_code_is_sent_once(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """The stop code pressed twice in one call: one stop sent, the repeat answered with it."""
    phone, agent = await ami.originate(
        f"Local/{EXT}@test-agent/n",
        context="test-dtmf",
        variables={"TEST_DTMF": STOP, "TEST_DTMF2": STOP, "TEST_DTMF2_AFTER": "2",
                   "TEST_AGENT": "Fred", "TEST_CALLEE_WAIT": "5"},
    )  # fmt: skip
    await ami.wait_event(
        lambda e: e.event == "VarSet" and e.get("Uniqueid") == agent
        and e.get("Variable") == "NOOJEE_MESSAGE" and "sent once" in str(e.get("Value")),
        what="the repeat's NOOJEE_MESSAGE",
    )  # fmt: skip
    assert [v for v in ami.values("NOOJEE_STATUS", agent) if v] == ["STOPPED", "STOPPED"]
    first, repeat = await bridge.wait_sessions(agent, 2)
    assert first["status"] == repeat["status"] == "STOPPED"
    assert "sent once" in repeat["message"]
    assert len(requests_for(simulator, STOP_PATH)) == 1
    await ami.wait_hangup(phone, within=20)
    assert len(requests_for(simulator, STOP_PATH)) == 1  # and the hangup handler skipped


async def test_hangup_handler_agent_from_the_bridge_settings(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """No NOOJEE_AGENT on the call: the bridge's agents setting names 410's agent (Wilma)."""
    phone, agent = await ami.originate(
        f"Local/{EXT}@test-agent/n", application="Wait", data="10",
        variables={"TEST_CALLEE_WAIT": "1"},
    )  # fmt: skip
    await ami.wait_hangup(agent)
    await ami.wait_var("NOOJEE_STATUS", "QUEUED", uniqueid=agent)
    [stop] = await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
    assert stop.params["extenOrUniqueId"] == agent
    assert stop.params["agentLoginName"] == AGENTS[EXT]
    assert stop.answered_code == 0
    await ami.wait_hangup(phone)


async def test_h_extension_variant(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    phone, agent = await ami.originate(
        f"Local/{EXT}@test-agent-h/n", application="Wait", data="10",
        variables={"TEST_CALLEE_WAIT": "1", "TEST_AGENT": "Fred"},
    )  # fmt: skip
    await ami.wait_var("NOOJEE_STATUS", "QUEUED", uniqueid=agent)
    [stop] = await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
    assert stop.params["extenOrUniqueId"] == agent
    assert stop.params["agentLoginName"] == "Fred"
    session = await bridge.finished(agent)
    assert session["status"] == "QUEUED"
    assert "queued" in session["message"]
    await ami.wait_hangup(phone)


async def test_h_extension_variant_skips_after_feature_code_stop(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    phone, agent = await ami.originate(
        f"Local/{EXT}@test-agent-h/n",
        context="test-dtmf",
        variables={"TEST_DTMF": STOP, "TEST_AGENT": "Fred", "TEST_CALLEE_WAIT": "2"},
    )
    await ami.wait_var("NOOJEE_STATUS", "STOPPED", uniqueid=agent)
    # the included h extension ran (Newexten names the channel's own context, test-agent-h)
    await _newexten(ami, agent, "test-agent-h", "already stopped on this call")
    await ami.wait_hangup(phone)
    await bridge.wait_drained()
    [stop] = requests_for(simulator, STOP_PATH)
    assert stop.params["extenOrUniqueId"] == EXT
    assert len(bridge.sessions(agent)) == 1


# ---------------------------------------------------------------------- dialled feature codes


@pytest.mark.parametrize(
    ("code", "path", "status"),
    [(DIALLED_STOP, STOP_PATH, "STOPPED"), (DIALLED_START, START_PATH, "STARTED")],
)
async def test_dialled_feature_codes(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, code: str, path: str,
    status: str,
) -> None:  # fmt: skip
    """410 dials the dialled stop / start code: one request for 410 as Fred, a beep, the end."""
    _, agent = await ami.originate(
        f"Local/{EXT}@test-phone/n", application="Wait", data="10",
        variables={"TEST_DIAL": code, "NOOJEE_AGENT": "Fred"},
    )  # fmt: skip
    await ami.wait_var("NOOJEE_STATUS", status, uniqueid=agent)
    await ami.wait_var("PLAYBACKSTATUS", "SUCCESS", uniqueid=agent)
    await ami.wait_hangup(agent)
    [request] = requests_for(simulator, path)
    assert request.params["extenOrUniqueId"] == EXT
    assert request.params["agentLoginName"] == "Fred"
    assert request.answered_code == 0
    assert simulator.received == [request]
    session = await bridge.finished(agent)
    assert session["status"] == status


# ------------------------------------------------------------------ NoojeeContact misbehaving


async def _dial_stop(ami: Ami, agent_name: str = "Fred") -> str:
    """Extension 410 dials the dialled stop code; the uniqueid of its channel."""
    _, agent = await ami.originate(
        f"Local/{EXT}@test-phone/n", application="Wait", data="10",
        variables={"TEST_DIAL": DIALLED_STOP, "NOOJEE_AGENT": agent_name},
    )  # fmt: skip
    return agent


async def test_permission_denied_is_failed_and_the_call_goes_on(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    dead_before = await bridge.metric("agi_bridge_spool_dead")
    agent = await _dial_stop(ami, "Pebbles")
    await ami.wait_var("NOOJEE_STATUS", "FAILED", uniqueid=agent)
    await ami.wait_var("NOOJEE_MESSAGE", "Permission denied", uniqueid=agent)
    await ami.wait_var("PLAYBACKSTATUS", "SUCCESS", uniqueid=agent)  # beeperr, then on
    await ami.wait_hangup(agent)
    [stop] = requests_for(simulator, STOP_PATH)
    assert stop.params["agentLoginName"] == "Pebbles"
    assert stop.answered_code == -1
    assert (await bridge.finished(agent))["status"] == "FAILED"
    await bridge.wait_drained()
    assert await bridge.metric("agi_bridge_spool_dead") == dead_before + 1  # kept, not retried
    assert len(requests_for(simulator, STOP_PATH)) == 1


async def test_server_error_is_queued_then_delivered_once_noojee_is_back(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    simulator.set_failure(FailureMode.HTTP_500)
    agent = await _dial_stop(ami)
    await ami.wait_var("NOOJEE_STATUS", "QUEUED", uniqueid=agent)
    await ami.wait_app(agent, "PlayTones")  # the pending sound: not confirmed
    await ami.wait_hangup(agent)
    first = requests_for(simulator, STOP_PATH)[0]
    assert (first.http_status, first.params["extenOrUniqueId"]) == (500, EXT)
    simulator.set_failure(FailureMode.NONE)
    [delivered] = await simulator.wait_for(
        1, timeout=10, predicate=lambda r: r.path == STOP_PATH and r.answered_code == 0
    )
    assert delivered.params["extenOrUniqueId"] == EXT
    assert delivered.params["agentLoginName"] == "Fred"
    await bridge.wait_drained()
    assert len([r for r in requests_for(simulator, STOP_PATH) if r.answered_code == 0]) == 1


async def test_delivery_that_ends_an_outage_is_logged_and_counted(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """The worker's probe that finds NoojeeContact back is logged and counted as a delivery."""
    delivered_before = await bridge.metric("agi_bridge_spool_delivered_total")
    simulator.set_failure(FailureMode.HTTP_503)
    agent = await _dial_stop(ami)
    await ami.wait_var("NOOJEE_STATUS", "QUEUED", uniqueid=agent)
    await bridge.wait_log(lambda line: line.get("event") == "noojee.unavailable")
    simulator.set_failure(FailureMode.NONE)
    await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH and r.answered_code == 0)
    await bridge.wait_drained()
    assert await bridge.metric("agi_bridge_spool_delivered_total") == delivered_before + 1
    await bridge.wait_log(lambda line: line.get("event") == "spool.entry.delivered", within=2)


async def test_slow_noojee_holds_the_call_no_longer_than_the_budget(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """NoojeeContact takes 3 s: the call waits BUDGET (0.5 s), hears QUEUED, and goes on; the
    late answer still settles the request, which is sent once."""
    simulator.set_failure(FailureMode.SLOW, delay=3)
    agent = await _dial_stop(ami)
    queued = await ami.wait_var("NOOJEE_STATUS", "QUEUED", uniqueid=agent)
    # AMI's view: from clearing NOOJEE_MESSAGE (just before AGI()) to the bridge's answer
    cleared = [
        e for e in ami.events
        if e.event == "VarSet" and e.get("Uniqueid") == agent
        and e.get("Variable") == "NOOJEE_MESSAGE" and not e.get("Value")
    ][-1]  # fmt: skip
    waited = ami.arrived[id(queued)] - ami.arrived[id(cleared)]
    assert BUDGET - 0.05 <= waited < BUDGET + 1.0, waited
    session = await bridge.finished(agent)
    assert session["status"] == "QUEUED"
    assert "did not answer within 0.5s" in session["message"]
    assert BUDGET * 1000 <= session["held_ms"] < BUDGET * 1000 + 500, session
    await ami.wait_app(agent, "PlayTones")  # the pending sound: not confirmed
    await ami.wait_hangup(agent)  # the call went on and ended normally
    await bridge.wait_drained()  # the late answer (after 3 s) settled the spool entry
    [stop] = requests_for(simulator, STOP_PATH)
    assert stop.answered_code == 0


async def test_caller_hangs_up_while_the_bridge_waits(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """The agent hangs up while the bridge waits for a slow NoojeeContact: the bridge survives,
    logs the outcome, the stop reaches NoojeeContact, and the next call is served."""
    simulator.set_failure(FailureMode.SLOW, delay=2)
    agent = await _dial_stop(ami)
    await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
    await ami.hangup(agent)  # mid-session: the bridge is inside its 0.5 s budget
    await ami.wait_hangup(agent)
    session = await bridge.finished(agent)
    assert session["status"] == "QUEUED"
    assert session["hung_up"] is True
    await ami.wait_var("AGISTATUS", "HANGUP", uniqueid=agent)
    await bridge.wait_drained()
    [stop] = requests_for(simulator, STOP_PATH)
    assert stop.params["extenOrUniqueId"] == EXT
    assert stop.answered_code == 0
    # the same bridge process serves the next call
    assert bridge.alive
    simulator.reset()
    agent = await _dial_stop(ami)
    await ami.wait_var("NOOJEE_STATUS", "STOPPED", uniqueid=agent)
    await ami.wait_hangup(agent)


# ----------------------------------------------------------- the subroutine's own parameters


async def test_a_message_with_commas_quotes_and_brackets_reaches_the_dialplan_whole(
    ami: Ami, bridge: BridgeProcess
) -> None:
    """NOOJEE_STATUS and NOOJEE_MESSAGE are set by one SET VARIABLE (ARRAY()): a message with
    the characters ARRAY() reads as syntax (commas, quotes, parentheses, brackets) arrives
    exactly as the bridge logged it, and the status with it."""
    _, chan = await ami.originate(
        "Local/s@test-direct/n", application="Wait", data="5",
        variables={"TEST_ROUTE": "stop", "TEST_AGENT": "Fred", "TEST_MODE": "l(a)[t]e,r"},
    )  # fmt: skip
    await ami.wait_var("TEST_RETVAL", "REJECTED", uniqueid=chan)
    message = (await bridge.finished(chan))["message"]
    assert all(ch in message for ch in "',()[]"), message
    await ami.wait_var("NOOJEE_STATUS", "REJECTED", uniqueid=chan)
    # AMI shows a VarSet's value C-escaped (varset_to_ami(): ast_escape_c_alloc()).
    shown = message.translate({ord(ch): "\\" + ch for ch in "\\'\"?"})
    await ami.wait_var("NOOJEE_MESSAGE", shown, uniqueid=chan)


@pytest.mark.parametrize(
    ("variables", "status", "path", "params"),
    [
        # a stop needs an agent: the bridge refuses it, nothing is sent
        ({"TEST_ROUTE": "stop"}, "REJECTED", None, None),
        ({"TEST_ROUTE": "stop", "TEST_NOOJEE_AGENT": "Fred"}, "STOPPED", STOP_PATH,
         {"extenOrUniqueId": "s", "agentLoginName": "Fred"}),
        # explicit id; the dialplan drops a tag on a stop (the bridge would reject it)
        ({"TEST_ROUTE": "stop", "TEST_BY": "id=12347811.214", "TEST_AGENT": "Fred",
          "TEST_TAG": "ignored"}, "STOPPED", STOP_PATH,
         {"extenOrUniqueId": "12347811.214", "agentLoginName": "Fred"}),
        ({"TEST_ROUTE": "start", "TEST_BY": "uniqueid", "TEST_AGENT": "Fred",
          "TEST_MODE": "sync", "TEST_TAG": "my tag"}, "STARTED", START_PATH,
         {"extenOrUniqueId": "{uniqueid}", "agentLoginName": "Fred", "tag": "my tag"}),
        ({"TEST_ROUTE": "start", "TEST_BY": "linkedid", "TEST_NOOJEE_TAG": "a,b:c?d"},
         "STARTED", START_PATH, {"extenOrUniqueId": "{linkedid}", "tag": "a_b:c?d"}),
        ({"TEST_ROUTE": "stop", "TEST_AGENT": "Fred", "TEST_MODE": "async"}, "QUEUED",
         STOP_PATH, {"extenOrUniqueId": "s", "agentLoginName": "Fred"}),
        ({"TEST_ROUTE": "stop", "TEST_BY": "channel", "TEST_AGENT": "Fred"}, "REJECTED",
         None, None),
        ({"TEST_ROUTE": "stop", "TEST_AGENT": "Fred", "TEST_MODE": "later"}, "REJECTED",
         None, None),
    ],
    ids=["stop-no-agent", "stop-agent-var", "stop-by-id", "start-by-uniqueid-tag",
         "start-by-linkedid-tag-var", "stop-async", "bad-by", "bad-mode"],
)  # fmt: skip
async def test_subroutine_parameters(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, variables: dict[str, str],
    status: str, path: str | None, params: dict[str, str] | None,
) -> None:  # fmt: skip
    phone, chan = await ami.originate(
        "Local/s@test-direct/n", application="Wait", data="5", variables=variables
    )
    await ami.wait_var("TEST_RETVAL", status, uniqueid=chan)
    session = await bridge.finished(chan)
    assert session["status"] == status
    if path is None:
        await bridge.wait_drained()
        assert simulator.received == []
        return
    [request] = await simulator.wait_for(1, predicate=lambda r: r.path == path)
    wanted = {
        k: v.replace("{uniqueid}", chan).replace("{linkedid}", phone)
        for k, v in (params or {}).items()
    }
    got = {k: v for k, v in request.params.items() if k != "apiKey"}
    assert got == wanted
    assert request.answered_code == 0
