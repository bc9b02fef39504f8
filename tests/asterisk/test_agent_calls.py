"""An agent's own outgoing call with real SIP phones: 410 (Fred) calls the customer's phone.

410's phone dials 200 (tests/asterisk/sandbox-extensions.conf, ``[test-phones]``), armed as
dialplan/README.md's recipe for an agent's own calls says: ``Gosub(agi-bridge-agent-call,s,1)``
then ``Dial(...,U(agi-bridge-agent-call-answered))``. The call's linkedid is 410's channel's
uniqueid; transfers dial 411 (Wilma) in ``[test-phones]`` too. Every test asserts exactly which
requests NoojeeContact received.
"""

from __future__ import annotations

import pytest

from agi_bridge.testing.simulator import NoojeeSimulator

from .codes import START, STOP
from .conftest import START_PATH, STOP_PATH, Ami, BridgeProcess
from .phones import Phone, StartPhone
from .test_phones import (
    _attended_by_the_phone,
    _channel,
    _ends,
    _handed_on,
    _requests,
    _talking,
)
from .test_queue import _feature_done

pytestmark = pytest.mark.asterisk


async def _agent_call(ami: Ami, phones: StartPhone) -> tuple[Phone, Phone, str, str]:
    """410 calls the customer, who answers, and they talk: (410, the customer, 410's channel =
    the call's linkedid, the customer's channel)."""
    agent = await phones("410")
    customer = await phones("customer")
    leg, callee = await _talking(ami, agent, "200", customer, "PJSIP/410-", "PJSIP/customer-")
    return agent, customer, leg, callee


async def _press(ami: Ami, agent: Phone, leg: str, code: str, state: str) -> None:
    """410's phone sends an in-call code; the call's state becomes ``state`` and the agent
    heard the sound."""
    since = len(ami.events)
    await agent.send("dtmf", call="c1", digits=code)
    await ami.wait_var("NOOJEE_CALL_RECORDING", state, uniqueid=leg)
    await _feature_done(ami, leg, since)


async def _blind_to_411(
    ami: Ami, simulator: NoojeeSimulator, phones: StartPhone, agent: Phone, leg: str, callee: str,
    how: str = "REFER",
) -> str:  # fmt: skip
    """410's phone (REFER), or CTI software (AMI BlindTransfer of 410's channel), transfers the
    call to 411, who answers and talks with the customer, nothing sent meanwhile: 411's channel."""
    await phones("411")
    since = len(ami.events)
    if how == "REFER":
        await agent.send("xfer", call="c1", to=agent.uri("411"))
    else:
        channel = ami.channel_name(leg)
        await ami.action("BlindTransfer", Channel=channel, Context="test-phones", Exten="411")
    await ami.wait_hangup(leg)
    return await _handed_on(ami, simulator, callee, "411", since)


@pytest.mark.parametrize("who", ["agent", "customer"])
async def test_no_transfer_one_stop_when_either_side_hangs_up(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone, who: str
) -> None:
    """410 calls the customer, one side hangs up: one stop by 410's uniqueid (the linkedid),
    with 410's login, and nothing more from the other side."""
    agent, customer, leg, callee = await _agent_call(ami, phones)
    assert simulator.received == []
    if who == "agent":
        await agent.send("hangup", call="c1")
    else:
        await customer.send("hangup", call="in1")
    await ami.wait_hangup(leg)
    await ami.wait_hangup(callee)
    await bridge.wait_drained()
    assert _requests(simulator) == [(STOP_PATH, leg, "Fred")]


@pytest.mark.parametrize("how", ["REFER", "AMI"])
async def test_blind_transfer_one_stop_at_the_end(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone, how: str
) -> None:
    """410's call is transferred to 411 (the phone's REFER, AMI BlindTransfer): nothing when 410
    leaves nor while the customer talks to 411; one stop by 410's uniqueid (the linkedid) when
    the customer hangs up, with 411's login."""
    agent, customer, leg, callee = await _agent_call(ami, phones)
    target = await _blind_to_411(ami, simulator, phones, agent, leg, callee, how)
    await _ends(ami, bridge, customer, callee, target, call="in1")
    assert _requests(simulator) == [(STOP_PATH, leg, "Wilma")]


async def test_attended_transfer_by_the_phone_one_stop_at_the_end(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """410 holds the customer, calls 411 from its phone, completes with REFER + Replaces:
    nothing when 410 leaves nor while the customer talks to 411; one stop by 410's first
    channel's uniqueid (the linkedid) at the end, with 411's login."""
    agent, customer, leg, callee = await _agent_call(ami, phones)
    consulted = await phones("411")
    since = len(ami.events)
    await _attended_by_the_phone(agent, consulted, call="c1")
    await ami.wait_hangup(leg)
    target = await _handed_on(ami, simulator, callee, "411", since)
    await _ends(ami, bridge, customer, callee, target, call="in1")
    assert _requests(simulator) == [(STOP_PATH, leg, "Wilma")]


@pytest.mark.parametrize("then", ["hangup", "blind transfer"])
async def test_stop_code_then_the_end_one_stop_by_extension(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone, then: str
) -> None:
    """410 presses the stop code, then hangs up (or transfers to 411, and the customer hangs up
    later): one stop for extension 410 with Fred's login; nothing at the end."""
    agent, customer, leg, callee = await _agent_call(ami, phones)
    await _press(ami, agent, leg, STOP, "stopped")
    if then == "hangup":
        await agent.send("hangup", call="c1")
        await ami.wait_hangup(leg)
        await ami.wait_hangup(callee)
        await bridge.wait_drained()
    else:
        target = await _blind_to_411(ami, simulator, phones, agent, leg, callee)
        await _ends(ami, bridge, customer, callee, target, call="in1")
    assert _requests(simulator) == [(STOP_PATH, "410", "Fred")]


async def test_stop_then_start_code_then_blind_transfer_the_end_stops(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """410 stops then restarts the recording, then transfers to 411 (REFER): the call's state
    (started) reaches the customer's channel, whose end sends one stop with 411's login."""
    agent, customer, leg, callee = await _agent_call(ami, phones)
    await _press(ami, agent, leg, STOP, "stopped")
    await _press(ami, agent, leg, START, "started")
    target = await _blind_to_411(ami, simulator, phones, agent, leg, callee)
    await _ends(ami, bridge, customer, callee, target, call="in1")
    assert _requests(simulator) == [
        (STOP_PATH, "410", "Fred"),
        (START_PATH, "410", "Fred"),
        (STOP_PATH, leg, "Wilma"),
    ]


async def test_nobody_answers_no_stop(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """410 calls the customer, whose phone rings and is never answered; 410 gives up: no stop."""
    agent = await phones("410")
    customer = await phones("customer", ring=True)
    since = len(ami.events)
    await agent.send("call", call="c1", to=agent.uri("200"))
    leg = await _channel(ami, "PJSIP/410-", since)
    callee = await _channel(ami, "PJSIP/customer-", since)
    await customer.ringing()
    await agent.send("hangup", call="c1")
    await ami.wait_hangup(leg)
    await ami.wait_hangup(callee)
    await bridge.wait_drained()
    assert simulator.received == []
