"""Queue calls on Asterisk 22 + the real agi-bridge + the NoojeeContact simulator.

A customer (``Local/0412345678@test-inbound/n``: its ;1 half is the customer's phone, whose
uniqueid is the call's linkedid) calls queue ``test-direct`` or ``test-chain``
(tests/asterisk/sandbox-queues.conf), armed as dialplan/README.md's contact-centre recipe says:
the shipped ``[agi-bridge-queue-member]`` as Queue's predial subroutine and
``[agi-bridge-queue-connected]`` as its connected-call subroutine.

The direct member is a Local channel that answers itself (``Local/410@test-member/n``): the
channel Queue dials and bridges is the agent's phone, as ``PJSIP/410`` would be; it carries the
DTMF, the feature code and the hangup handler. (A PJSIP member needs two SIP stacks over
loopback; what this case must prove, that everything happens on the one channel Queue dialled,
does not depend on the channel driver.) The FreePBX-style member (``Local/410@test-member-dial/n``)
reaches the same phone through a second Local chain, so the agent's DTMF crosses two more
channels that must NOT act on it.

Every test asserts exactly which requests NoojeeContact received, and how many.
"""

from __future__ import annotations

import pytest
from panoramisk.message import Message

from agi_bridge.testing.simulator import FailureMode, NoojeeSimulator

from .codes import START, STOP, TOGGLE
from .conftest import AGENTS, EXTENSION_MAX_AGE, START_PATH, STOP_PATH, Ami, BridgeProcess

pytestmark = pytest.mark.asterisk

EXT = "410"
CUSTOMER = "Local/0412345678@test-inbound/n"
# queue -> (the answering member's channel prefix, the agent's login the stop must carry)
QUEUES = {
    # unnamed member: the bridge's agents setting (410 -> Wilma)
    "test-direct": ("Local/410@test-member-", AGENTS[EXT]),
    # member named Fred: MEMBERNAME through the connected-call subroutine
    "test-chain": ("Local/410@test-member-dial-", "Fred"),
    # 410 (Fred, answers) and 411 (Barney, never answers), rung at once
    "test-ringall": ("Local/410@test-member-", "Fred"),
}
DUAL = ["test-direct", "test-chain"]  # the two member types


async def _call(ami: Ami, queue: str, **variables: str) -> tuple[str, str]:
    """A customer calls ``queue``; (the customer's phone = the linkedid, the member's channel)."""
    customer, _ = await ami.originate(
        CUSTOMER, application="Wait", data="40", variables={"TEST_QUEUE": queue, **variables}
    )
    return customer, await _member(ami, customer, QUEUES[queue][0])


async def _member(ami: Ami, customer: str, prefix: str) -> str:
    """The uniqueid of the member channel (``prefix...;1``) Queue created for the call."""
    member = await ami.wait_event(
        lambda e: e.event == "Newchannel" and e.get("Linkedid") == customer
        and str(e.get("Channel", "")).startswith(prefix) and str(e["Channel"]).endswith(";1"),
        what=f"the member channel {prefix}...;1",
    )  # fmt: skip
    return str(member["Uniqueid"])


async def _logged(ami: Ami, uniqueid: str, text: str) -> None:
    """The channel ran an application whose data contains ``text`` (the handler's Verbose)."""
    await ami.wait_event(
        lambda e: e.event == "Newexten" and e.get("Uniqueid") == uniqueid
        and text in str(e.get("AppData", "")),
        what=f"'{text}' on {uniqueid}",
    )  # fmt: skip


async def _feature_done(ami: Ami, uniqueid: str, since: int = 0) -> None:
    """The feature code's subroutine returned (its sound played), after event ``since``: the
    agent may go on."""
    await ami.wait_event(
        lambda e: e.event == "Newexten" and e.get("Uniqueid") == uniqueid
        and e.get("Context") == "agi-bridge-feature" and e.get("Application") == "Return"
        and any(seen is e for seen in ami.events[since:]),
        what=f"the end of the feature code on {uniqueid}",
    )  # fmt: skip


async def _blind_transfer(ami: Ami, member: str, action: str = "BlindTransfer") -> None:
    """AMI BlindTransfer (or Atxfer) of the member's call to 411 (test-transfer), as a console
    does."""
    await ami.action(action, Channel=ami.channel_name(member), Context="test-transfer", Exten="411")


async def _connected(ami: Ami, member: str) -> Message:
    """The member answered and Queue ran the connected-call subroutine on it."""
    return await ami.wait_event(
        lambda e: e.event == "Newexten" and e.get("Uniqueid") == member
        and e.get("Context") == "agi-bridge-queue-connected",
        what=f"agi-bridge-queue-connected on {member}",
    )  # fmt: skip


@pytest.mark.parametrize("queue", DUAL)
async def test_agent_hangs_up_first_one_stop_by_linkedid(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, queue: str
) -> None:
    """The agent hangs up: one stop, from the customer's channel (the call ends with it), by the
    call's linkedid, with the login of the member who answered."""
    customer, member = await _call(ami, queue, TEST_AGENT_STAY="1")
    await ami.wait_hangup(member)
    await ami.wait_var("NOOJEE_STATUS", "QUEUED", uniqueid=customer)
    [stop] = await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
    assert stop.params["extenOrUniqueId"] == customer
    assert stop.params["agentLoginName"] == QUEUES[queue][1]
    assert stop.answered_code == 0
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    assert simulator.received == [stop]
    assert bridge.sessions(member) == []
    [session] = bridge.sessions(customer)
    assert (session["route"], session["status"]) == ("recording/stop", "QUEUED")


async def test_the_hangup_stop_identifier_is_a_parameter(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """NOOJEE_QUEUE_STOP_BY=uniqueid (here set on the call before Queue()): the hangup stop
    names the member leg's own uniqueid instead of the linkedid."""
    customer, member = await _call(ami, "test-direct", TEST_AGENT_STAY="1", TEST_STOP_BY="uniqueid")
    await ami.wait_hangup(member)
    [stop] = await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
    assert (stop.params["extenOrUniqueId"], stop.params["agentLoginName"]) == (member, "Wilma")
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    assert simulator.received == [stop]


async def test_an_inherited_login_on_the_customers_call_does_not_reach_the_stop(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """A site's Set(__NOOJEE_AGENT=Fred) on the customer's call (as the README once said) is
    cleared before Queue(): the unnamed member's stop names the bridge's login for 410 (its
    channel's extension, not the customer's), not the inherited Fred."""
    customer, member = await _call(
        ami, "test-direct", TEST_AGENT_STAY="1", TEST_INHERITED_AGENT="Fred"
    )
    await ami.wait_hangup(member)
    [stop] = await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    assert simulator.received == [stop]
    assert (stop.params["extenOrUniqueId"], stop.params["agentLoginName"]) == (customer, "Wilma")


@pytest.mark.parametrize("queue", DUAL)
async def test_caller_hangs_up_first_one_stop_by_linkedid(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, queue: str
) -> None:
    """The customer hangs up first: its channel's handler sends the one stop, by the linkedid,
    with the login of the member (not of a channel of the phone's chain)."""
    customer, member = await _call(ami, queue, TEST_AGENT_STAY="30")
    await _connected(ami, member)
    await ami.hangup(customer)
    await ami.wait_hangup(member)
    [stop] = await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
    assert stop.params["extenOrUniqueId"] == customer
    assert stop.params["agentLoginName"] == QUEUES[queue][1]
    await bridge.wait_drained()
    assert simulator.received == [stop]
    assert bridge.sessions(member) == []
    [session] = bridge.sessions(customer)
    assert session["channel"].startswith("Local/0412345678@test-inbound-")


@pytest.mark.parametrize("queue", DUAL)
async def test_feature_code_stop_then_hangup_sends_exactly_one_stop(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, queue: str
) -> None:
    """The stop code runs on the member's own channel (not the phone's at the end of a Local chain):
    one stop for 410 with the member's login, one beep; the end-of-call handler then skips."""
    customer, member = await _call(ami, queue, TEST_DTMF=STOP, TEST_AGENT_STAY="2")
    await ami.wait_var("NOOJEE_STATUS", "STOPPED", uniqueid=member)
    await ami.wait_hangup(member)
    await _logged(ami, customer, "already stopped")  # the end-of-call handler skipped
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    [stop] = simulator.received
    assert stop.path == STOP_PATH
    assert stop.params["extenOrUniqueId"] == EXT
    assert stop.params["agentLoginName"] == QUEUES[queue][1]
    assert stop.answered_code == 0
    assert ami.ran(member, "Playback") == ["beep"]
    # the one session of the call ran on the member's leg, none on the phone's
    finished = [line for line in bridge.since_mark() if line["event"] == "agi.session.finished"]
    assert [line["uniqueid"] for line in finished] == [member]


async def test_toggle_twice_stops_then_starts_then_hangup_stops(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """The toggle twice: the first press stops (a call starts recorded), the second starts; state
    lives on the customer's channel (the linkedid); at hangup the running recording is stopped
    by the linkedid."""
    customer, member = await _call(
        ami, "test-chain", TEST_DTMF=TOGGLE, TEST_DTMF2=TOGGLE, TEST_DTMF2_AFTER="2",
        TEST_AGENT_STAY="2",
    )  # fmt: skip
    await ami.wait_var("NOOJEE_CALL_RECORDING", "stopped", uniqueid=customer)
    await ami.wait_var("NOOJEE_CALL_RECORDING", "started", uniqueid=customer)
    await ami.wait_hangup(member)
    await simulator.wait_for(3)
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    got = [
        (r.path, r.params["extenOrUniqueId"], r.params["agentLoginName"], r.answered_code)
        for r in simulator.received
    ]
    assert got == [
        (STOP_PATH, EXT, "Fred", 0),
        (START_PATH, EXT, "Fred", 0),
        (STOP_PATH, customer, "Fred", 0),
    ]
    assert ami.ran(member, "Playback") == ["beep", "beep&beep"]
    assert "NOOJEE_CALL_RECORDING" not in (await _globals(ami))  # nothing left behind


async def _globals(ami: Ami) -> str:
    resp = await ami.manager.send_action(
        {"Action": "Command", "Command": "dialplan show globals"}, as_list=False
    )
    return str(resp.get("Output", resp))


async def test_ringall_member_that_never_answered_sends_nothing(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """Queue rings 410 and 411; 410 answers: 411's channel, hung up unanswered, sends no stop
    and does not become the call's agent (the end stop names Fred)."""
    customer, member = await _call(ami, "test-ringall", TEST_AGENT_STAY="1")
    unanswered = await _member(ami, customer, "Local/411@test-no-answer-")
    await ami.wait_hangup(unanswered)
    await ami.wait_hangup(member)
    [stop] = await simulator.wait_for(1, predicate=lambda r: r.path == STOP_PATH)
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    assert simulator.received == [stop]
    assert (stop.params["extenOrUniqueId"], stop.params["agentLoginName"]) == (customer, "Fred")
    assert bridge.sessions(unanswered) == []


async def test_pending_sound_then_a_repeat_hears_the_stop_went_through(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """NoojeeContact confirms too late: the stop code plays the pending pips (QUEUED,
    unconfirmed); the same code pressed once the stop went through plays the stopped beep
    (sent once)."""
    simulator.set_failure(FailureMode.SLOW, delay=1.5)  # > BUDGET: the first answer is QUEUED
    customer, member = await _call(
        ami, "test-chain", TEST_DTMF=STOP, TEST_DTMF2=STOP, TEST_DTMF2_AFTER="4",
        TEST_AGENT_STAY="2",
    )  # fmt: skip
    await ami.wait_var("NOOJEE_STATUS", "QUEUED", uniqueid=member)
    await ami.wait_var("NOOJEE_STATUS", "STOPPED", uniqueid=member, within=15)
    await ami.wait_hangup(member, within=20)
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    assert [v for v in ami.values("NOOJEE_STATUS", member) if v] == ["QUEUED", "STOPPED"]
    assert ami.ran(member, "PlayTones") == ["!425/150,!0/150,!425/150,!0/150,!425/150"]
    assert ami.ran(member, "Playback") == ["beep"]
    first, repeat = bridge.sessions(member)
    assert "did not answer within" in first["message"]
    assert repeat["message"].endswith("sent once: delivered since it was queued")
    [stop] = simulator.received  # and the hangup handler skipped
    assert (stop.params["extenOrUniqueId"], stop.params["agentLoginName"]) == (EXT, "Fred")
    assert stop.answered_code == 0


async def test_failed_stop_plays_the_error_beep_and_the_hangup_stop_follows(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """The stop code refused for good (an HTTP 404): the error beep, the recording counts as
    running, so the hangup handler still sends its stop by the linkedid."""
    simulator.set_failure(FailureMode.HTML_404)
    customer, member = await _call(ami, "test-chain", TEST_DTMF=STOP, TEST_AGENT_STAY="3")
    await ami.wait_var("NOOJEE_STATUS", "FAILED", uniqueid=member)
    simulator.set_failure(FailureMode.NONE)
    await ami.wait_hangup(member)
    await simulator.wait_for(2)
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    assert ami.ran(member, "Playback") == ["beeperr"]
    got = [
        (r.params["extenOrUniqueId"], r.params["agentLoginName"], r.http_status)
        for r in simulator.received
    ]
    assert got == [(EXT, "Fred", 404), (customer, "Fred", 200)]
    assert all(r.path == STOP_PATH for r in simulator.received)


async def test_toggle_state_survives_a_transfer_to_another_agent(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """Agent 410 toggles (stops), then blind-transfers the customer to 411: 410's leg ending
    sends nothing (the call goes on), 411's toggle STARTS (it sees the
    call's state, not its own fresh channel's), and the customer hanging up stops by linkedid."""
    customer, member = await _call(
        ami, "test-chain", TEST_DTMF=TOGGLE, TEST_AGENT_STAY="30", TEST_DTMF_411=TOGGLE
    )
    await ami.wait_var("NOOJEE_CALL_RECORDING", "stopped", uniqueid=customer)
    await _feature_done(ami, member)
    await _blind_transfer(ami, member)
    await ami.wait_hangup(member)
    second = await _member(ami, customer, "Local/411@test-member-")
    await ami.wait_var("NOOJEE_STATUS", "STARTED", uniqueid=second)
    await ami.wait_var("NOOJEE_CALL_RECORDING", "started", uniqueid=customer)
    await ami.hangup(customer)
    await ami.wait_hangup(second)
    await simulator.wait_for(3)
    await bridge.wait_drained()
    got = [
        (r.path, r.params["extenOrUniqueId"], r.params.get("agentLoginName"))
        for r in simulator.received
    ]
    assert got == [
        (STOP_PATH, EXT, "Fred"),
        (START_PATH, "411", "Wilma"),
        (STOP_PATH, customer, "Wilma"),
    ]


PIPS = "!425/150,!0/150,!425/150,!0/150,!425/150"


async def test_a_queued_stop_code_does_not_silence_the_hangup_stop_which_cancels_it(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """The stop code during an outage: the pips (QUEUED, not confirmed), so the hangup handler still
    sends its stop by the linkedid; that stop cancels the stop code's request by extension, which
    never reaches extension 410 (by then on another customer's call): one stop, by the linkedid."""
    simulator.set_failure(FailureMode.REFUSE)
    customer, member = await _call(ami, "test-chain", TEST_DTMF=STOP, TEST_AGENT_STAY="2")
    await ami.wait_var("NOOJEE_STATUS", "QUEUED", uniqueid=member)
    await ami.wait_var("NOOJEE_CALL_RECORDING", "stopping", uniqueid=customer)
    await ami.wait_hangup(member)
    await bridge.wait_log(
        lambda line: line.get("event") == "spool.entry.cancelled",
        what="the the stop code cancelled",
    )
    simulator.set_failure(FailureMode.NONE)
    [stop] = await simulator.wait_for(1, timeout=15)
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    assert ami.ran(member, "PlayTones") == [PIPS]
    assert ami.ran(member, "Playback") == []
    assert (stop.path, stop.params["extenOrUniqueId"], stop.answered_code) == (
        STOP_PATH,
        customer,
        0,
    )
    assert simulator.received == [stop]


async def test_an_expired_stop_code_plays_the_error_beep_and_the_hangup_stop_follows(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """the stop code queued during an outage, pressed again once its validity passed: the error beep
    (EXPIRED, nothing changed), the recording counts as running, the hangup stop follows."""
    simulator.set_failure(FailureMode.REFUSE)
    after = str(EXTENSION_MAX_AGE + 1)
    customer, member = await _call(
        ami, "test-chain", TEST_DTMF=STOP, TEST_DTMF2=STOP, TEST_DTMF2_AFTER=after,
        TEST_AGENT_STAY="1",
    )  # fmt: skip
    await ami.wait_var("NOOJEE_STATUS", "QUEUED", uniqueid=member)
    await ami.wait_var("NOOJEE_STATUS", "EXPIRED", uniqueid=member, within=15)
    await ami.wait_hangup(member, within=20)
    await bridge.wait_log(
        lambda line: line.get("event") == "agi.session.finished"
        and line.get("uniqueid") == customer and line.get("message") == "queued for delivery",
        what="the end stop (on the customer's channel), queued",
    )  # fmt: skip
    simulator.set_failure(FailureMode.NONE)
    [stop] = await simulator.wait_for(1, timeout=15)
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    assert ami.ran(member, "PlayTones") == [PIPS]
    assert ami.ran(member, "Playback") == ["beeperr"]
    # the stop code's request queued, then expired (the recording runs on), then the end stop
    # itself, queued on the customer's channel where it runs
    assert [v for v in ami.values("NOOJEE_CALL_RECORDING", customer) if v] == [
        "stopping",
        "started",
        "stopping",
    ]
    assert (stop.params["extenOrUniqueId"], stop.answered_code) == (customer, 0)
    assert simulator.received == [stop]


async def test_an_unconfirmed_start_code_plays_its_own_sound_and_is_never_resent(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """The start code answered by a login page (HTTP 200, not NoojeeContact's): UNCONFIRMED, the
    error beep then two beeps; the start is never sent again and the hangup stop follows."""
    simulator.set_failure(FailureMode.LOGIN_PAGE)
    customer, member = await _call(ami, "test-chain", TEST_DTMF=START, TEST_AGENT_STAY="2")
    await ami.wait_var("NOOJEE_STATUS", "UNCONFIRMED", uniqueid=member)
    simulator.set_failure(FailureMode.NONE)
    await ami.wait_hangup(member)
    await simulator.wait_for(2)
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    assert ami.ran(member, "Playback") == ["beeperr&beep&beep"]
    got = [(r.path, r.params["extenOrUniqueId"], r.http_status) for r in simulator.received]
    assert got == [(START_PATH, EXT, 200), (STOP_PATH, customer, 200)]
    assert simulator.received[0].answered_code is None  # the login page, not NoojeeContact
