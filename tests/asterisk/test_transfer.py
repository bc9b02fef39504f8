"""Transfers and agent pools on Asterisk 22 + the real agi-bridge + the NoojeeContact simulator.

A customer calls queue ``test-chain`` (agent 410, Fred, a FreePBX-style member) as in
test_queue.py; agent 410 hands the call to agent 411 through the transfer context
``test-transfer`` (sandbox-extensions.conf), written as dialplan/README.md's transfer recipe
says. The featuremap of sandbox-features.conf puts blind transfer on ``#1`` and attended
transfer on ``#8``. Agent pools: extension 410's phone logs in as agent 1001 (Fred) and queue
``test-pool`` reaches it through AgentRequest.

Every test asserts exactly which requests NoojeeContact received, and how many.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from panoramisk.message import Message

from agi_bridge.testing.simulator import NoojeeSimulator

from .codes import STOP
from .conftest import STOP_PATH, Ami, BridgeProcess
from .test_queue import CUSTOMER, _blind_transfer, _call, _feature_done, _logged, _member

pytestmark = pytest.mark.asterisk

QUEUE = "test-chain"  # agent 410 is Fred (the member's name)
TARGET = "Local/411@test-member-"  # agent 411's leg, Dial()ed in test-transfer; Wilma


def _requests(simulator: NoojeeSimulator) -> list[tuple[str, str, str | None]]:
    return [
        (r.path, r.params["extenOrUniqueId"], r.params.get("agentLoginName"))
        for r in simulator.received
    ]


async def _answered(ami: Ami, uniqueid: str, since: int = 0) -> Message:
    """The channel entered a bridge (it talks to someone) after event number ``since``."""
    return await ami.wait_event(_after(ami, since, "BridgeEnter", uniqueid), what="BridgeEnter")


async def _talking(ami: Ami, member: str) -> None:
    """The member and the customer's side are both in the member's bridge: before that, AMI's
    BlindTransfer and Atxfer of the member answer "Transfer invalid" (a bridge of one)."""
    bridge = (await _answered(ami, member)).get("BridgeUniqueid")
    await ami.wait_event(
        lambda e: e.event == "BridgeEnter" and e.get("BridgeUniqueid") == bridge
        and e.get("Uniqueid") != member,
        what=f"the customer's side in the bridge of {member}",
    )  # fmt: skip


def _after(ami: Ami, since: int, event: str, uniqueid: str) -> Callable[[Message], bool]:
    return lambda e: (
        e.event == event
        and e.get("Uniqueid") == uniqueid
        and any(seen is e for seen in ami.events[since:])
    )


async def _press(ami: Ami, uniqueid: str, digits: str) -> None:
    """The phone ``uniqueid`` presses ``digits`` (AMI PlayDTMF sends them out of its channel)."""
    for digit in digits:
        action = {"Action": "PlayDTMF", "Channel": ami.channel_name(uniqueid), "Digit": digit}
        resp = await ami.manager.send_action(action, as_list=False)
        assert resp.get("Response") == "Success", dict(resp)


# Digits pressed within milliseconds of the agent joining the call were seen to arrive cut
# (a begin without an end) at the member leg, which then waits for the rest of the code. An
# agent's finger is slower; the test presses a harmless probe digit until one arrives whole.
KEY_PROBES = 10
KEY_PROBE_WAIT = 1.0  # seconds for one probe digit to cross a few channels on loopback


async def _keys_reach(ami: Ami, phone: str, member: str) -> None:
    """Until a digit the phone ``phone`` presses arrives whole at the ``member`` leg."""
    for _ in range(KEY_PROBES):
        since = len(ami.events)
        await _press(ami, phone, "5")  # no code starts with 5: it just reaches the customer
        try:
            await ami.wait_event(
                lambda e, since=since: e.event == "DTMFEnd" and e.get("Uniqueid") == member
                and e.get("Digit") == "5" and any(seen is e for seen in ami.events[since:]),
                within=KEY_PROBE_WAIT,
            )  # fmt: skip
        except AssertionError:
            continue
        return
    raise AssertionError(f"no digit pressed on {phone} reached {member} whole")


async def _phone_of(ami: Ami, customer: str, extension: str) -> str:
    """The uniqueid of the phone of ``extension`` on the customer's call (the ``;2`` half of
    its Local member): where its agent's key presses come from."""
    phone = await ami.wait_event(
        lambda e: e.event == "Newchannel" and e.get("Linkedid") == customer
        and str(e.get("Channel", "")).startswith(f"Local/{extension}@test-member-")
        and str(e["Channel"]).endswith(";2"),
        what=f"{extension}'s phone",
    )  # fmt: skip
    return str(phone["Uniqueid"])


async def _bridged_with(ami: Ami, customer: str, target: str) -> None:
    """The customer's channel (``;2``, the half in the call) and the target's leg are in one
    bridge: the hand-on happened."""
    customer = customer.removesuffix("-1") + "-2"  # conftest's Ami.originate names the halves

    def bridges(uniqueid: str) -> set[str]:
        return {
            str(e["BridgeUniqueid"]) for e in ami.events
            if e.event == "BridgeEnter" and e.get("Uniqueid") == uniqueid
        }  # fmt: skip

    await ami.wait_event(
        lambda _e: bool(bridges(customer) & bridges(target)), what="customer with the target"
    )


async def _end(ami: Ami, bridge: BridgeProcess, customer: str, target: str) -> None:
    """The customer hangs up on agent 411; everything the call sent is delivered."""
    await ami.hangup(customer)
    await ami.wait_hangup(target)
    await bridge.wait_drained()


async def test_blind_transfer_by_dtmf_sends_no_stop_for_the_call_that_goes_on(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """410 presses #1 411: its leg hangs up and sends nothing; the one stop, by the linkedid,
    comes from the customer's channel when the call really ends, with 411's login."""
    customer, member = await _call(
        ami, QUEUE, TEST_DTMF="#1", TEST_DTMF2="411", TEST_DTMF2_AFTER="2", TEST_AGENT_STAY="30"
    )
    target = await _member(ami, customer, TARGET)
    await _answered(ami, target)
    await ami.wait_hangup(member)
    await _end(ami, bridge, customer, target)
    assert _requests(simulator) == [(STOP_PATH, customer, "Wilma")]
    assert bridge.sessions(member) == []


async def test_blind_transfer_by_ami_sends_no_stop_for_the_call_that_goes_on(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """AMI BlindTransfer of 410's leg: the same as by DTMF, one stop at the end, 411's login."""
    customer, member = await _call(ami, QUEUE, TEST_AGENT_STAY="30")
    await _talking(ami, member)
    await _blind_transfer(ami, member)
    await ami.wait_hangup(member)
    target = await _member(ami, customer, TARGET)
    await _answered(ami, target)
    await _end(ami, bridge, customer, target)
    assert _requests(simulator) == [(STOP_PATH, customer, "Wilma")]
    assert bridge.sessions(member) == []


async def test_target_feature_code_after_a_transfer(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """411, armed in the transfer context, presses the stop code: one stop for 411 with its own
    login; neither the end of the call nor 410's transfer sends another."""
    customer, member = await _call(ami, QUEUE, TEST_AGENT_STAY="30", TEST_DTMF_411=STOP)
    await _talking(ami, member)
    await _blind_transfer(ami, member)
    target = await _member(ami, customer, TARGET)
    await ami.wait_var("NOOJEE_STATUS", "STOPPED", uniqueid=target)
    await _feature_done(ami, target)  # the call's state says "stopped" from here on
    await _end(ami, bridge, customer, target)
    await _logged(ami, customer, "already stopped")
    assert _requests(simulator) == [(STOP_PATH, "411", "Wilma")]
    assert ami.ran(target, "Playback") == ["beep"]


@pytest.mark.parametrize("by", ["dtmf", "ami"])
async def test_attended_transfer_completed_sends_no_stop_for_the_call_that_goes_on(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, by: str
) -> None:
    """410 presses #8 411 (or a console sends AMI Atxfer), talks to 411, hangs up (the transfer
    completes): 410's leg sends nothing; the one stop, by the linkedid, comes from the
    customer's channel when the customer hangs up, with 411's login."""
    if by == "dtmf":
        customer, member = await _call(
            ami, QUEUE, TEST_DTMF="#8", TEST_DTMF2="411", TEST_DTMF2_AFTER="2",
            TEST_AGENT_STAY="30",
        )  # fmt: skip
    else:
        customer, member = await _call(ami, QUEUE, TEST_AGENT_STAY="30")
        await _talking(ami, member)
        await _blind_transfer(ami, member, "Atxfer")
    target = await _member(ami, customer, TARGET)
    await _answered(ami, target)
    await ami.hangup(member)
    # the consultation's own channel, through which 411 now talks to the customer
    consultation = await _member(ami, customer, "Local/411@test-transfer-")
    await _bridged_with(ami, customer, consultation)
    await _end(ami, bridge, customer, target)
    assert _requests(simulator) == [(STOP_PATH, customer, "Wilma")]
    assert bridge.sessions(member) == []


async def test_attended_transfer_cancelled_leaves_the_agent_armed(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """410 consults 411, who hangs up: 411's leg sends nothing (410 keeps the call); back with
    the customer, 410's stop code stops the recording and the end of the call sends nothing more."""
    customer, member = await _call(
        ami, QUEUE, TEST_DTMF="#8", TEST_DTMF2="411", TEST_DTMF2_AFTER="2", TEST_AGENT_STAY="30"
    )
    target = await _member(ami, customer, TARGET)
    await _answered(ami, target)
    since = len(ami.events)
    await ami.hangup(target)
    await _answered(ami, member, since)  # back in a bridge with the customer
    await _press(ami, await _phone_of(ami, customer, "410"), STOP)
    await ami.wait_var("NOOJEE_STATUS", "STOPPED", uniqueid=member)
    await _feature_done(ami, member)
    await ami.hangup(member)
    await _logged(ami, customer, "already stopped")
    await ami.wait_hangup(customer)
    await bridge.wait_drained()
    assert _requests(simulator) == [(STOP_PATH, "410", "Fred")]
    assert bridge.sessions(target) == []


# Asterisk's default atxferabort (features.conf [general]): 410 ends its consultation.
ABORT = "*1"


@pytest.mark.parametrize("cancelled_by", ["consulted", "agent"])
async def test_attended_transfer_cancelled_then_the_call_ends_names_the_agent_who_kept_it(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, cancelled_by: str
) -> None:
    """410 consults 411, who answers; then 411 hangs up, or 410 presses the abort code: the
    call is back with 410, so the one stop at the end names 410's login, not 411's (who
    answered last, but no longer has the call)."""
    customer, member = await _call(
        ami, QUEUE, TEST_DTMF="#8", TEST_DTMF2="411", TEST_DTMF2_AFTER="2", TEST_AGENT_STAY="30"
    )
    target = await _member(ami, customer, TARGET)
    await _answered(ami, target)
    since = len(ami.events)
    if cancelled_by == "consulted":
        await ami.hangup(target)
    else:
        await _press(ami, await _phone_of(ami, customer, "410"), ABORT)
        await ami.wait_hangup(target)
    await _answered(ami, member, since)  # back in a bridge with the customer
    await _end(ami, bridge, customer, member)
    assert _requests(simulator) == [(STOP_PATH, customer, "Fred")]
    assert bridge.sessions(target) == []


async def test_agent_pool_arms_each_call_not_the_login(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator
) -> None:
    """Extension 410 logs in as agent 1001 (Fred): the stop code in the first call stops 410
    (the phone, not the agent number); that stop does not leak into the second call, whose
    end sends its own stop by its own linkedid; the logoff sends nothing."""
    phone, agent = await ami.originate("Local/410@test-pool-login/n", application="Wait", data="60")
    await ami.wait_event(
        lambda e: e.event == "AgentLogin" and e.get("Uniqueid") == agent, what="AgentLogin"
    )
    calls, members = [], []
    for press in (STOP, ""):
        customer, _ = await ami.originate(
            CUSTOMER, application="Wait", data="40",
            variables={"TEST_QUEUE": "test-pool", "TEST_PREDIAL": "agi-bridge-pool-member"},
        )  # fmt: skip
        # A new agent is not offered calls at once (app_agent_pool): Queue retries every second.
        connected = await ami.wait_event(
            lambda e, c=customer: e.event == "Newexten" and e.get("Linkedid") == c
            and e.get("Context") == "agi-bridge-queue-connected",
            within=20, what="the pool member connected",
        )  # fmt: skip
        member = str(connected["Uniqueid"])
        members.append(member)
        assert ami.values("NOOJEE_PHONE", member)[-1] == ami.channel_name(agent)
        await _answered(ami, member)
        await _keys_reach(ami, phone, member)
        if press:
            await _press(ami, phone, press)
            await ami.wait_var("NOOJEE_STATUS", "STOPPED", uniqueid=member)
            await _feature_done(ami, member)
        await ami.hangup(customer)
        await ami.wait_hangup(member)
        calls.append(customer)
    await ami.hangup(phone)
    await ami.wait_hangup(agent)
    await bridge.wait_drained()
    assert _requests(simulator) == [(STOP_PATH, "410", "Fred"), (STOP_PATH, calls[1], "Fred")]
    # the stop code ran on the first call's member leg, the second call's stop on its customer's
    finished = [line for line in bridge.since_mark() if line["event"] == "agi.session.finished"]
    assert [line["uniqueid"] for line in finished] == [members[0], calls[1]]
    assert finished[0]["channel"].startswith("Local/1001@test-agent-request-")
