"""Queue calls and transfers with real SIP phones (PJSIP endpoints, PJSUA2 user agents).

The customer's phone (endpoint ``customer``) calls 100 (queue ``test-sip``, member ``PJSIP/410``)
or 101 (queue ``test-sip-chain``, a FreePBX-style Local member dialling 410), as
tests/asterisk/sandbox-extensions.conf's ``[test-sip-inbound]`` arms it after dialplan/README.md.
Agents' phones 410 (Fred), 411 (Wilma) and 412 (Betty) carry their login in pjsip.conf
(sandbox-pjsip.conf). Every test asserts exactly which requests NoojeeContact received.
"""

from __future__ import annotations

import asyncio

import pytest
from panoramisk.message import Message

from agi_bridge.testing.simulator import NoojeeSimulator

from .codes import STOP
from .conftest import STOP_PATH, Ami, BridgeProcess
from .phones import Phone, StartPhone
from .test_queue import _feature_done

pytestmark = pytest.mark.asterisk

# How long the customer talks to an agent before anything else happens: people, not states.
TALK = 1.0


def _requests(simulator: NoojeeSimulator) -> list[tuple[str, str, str | None]]:
    return [
        (r.path, r.params["extenOrUniqueId"], r.params.get("agentLoginName"))
        for r in simulator.received
    ]


async def _channel(ami: Ami, prefix: str, since: int) -> str:
    """The uniqueid of the first channel named ``prefix...`` created after event ``since``."""
    event = await ami.wait_event(
        lambda e: e.event == "Newchannel" and str(e.get("Channel", "")).startswith(prefix)
        and any(seen is e for seen in ami.events[since:]),
        what=f"a new channel {prefix}...",
    )  # fmt: skip
    return str(event["Uniqueid"])


def _uniqueid(ami: Ami, channel: str) -> str:
    """The uniqueid of the channel named ``channel`` (its Newchannel event was seen)."""
    [event] = [e for e in ami.events if e.event == "Newchannel" and e.get("Channel") == channel]
    return str(event["Uniqueid"])


async def _bridged(ami: Ami, a: str, b: str, since: int = 0) -> Message:
    """Channels ``a`` and ``b`` are in the same bridge (they talk), as AMI reports it."""

    def entered(uniqueid: str) -> list[Message]:
        return [
            e for e in ami.events[since:]
            if e.event == "BridgeEnter" and e.get("Uniqueid") == uniqueid
        ]  # fmt: skip

    def together(_e: Message) -> bool:
        left = {str(e["BridgeUniqueid"]) for e in entered(a)}
        return any(str(e["BridgeUniqueid"]) in left for e in entered(b))

    return await ami.wait_event(together, what=f"{a} and {b} in one bridge")


async def _talking(
    ami: Ami, caller: Phone, number: str, answerer: Phone, *prefixes: str
) -> list[str]:
    """``caller`` dials ``number``, ``answerer`` answers, and once the first two channels named
    by ``prefixes`` are in one bridge they talk for TALK: the uniqueids of the channels this
    call created with those name prefixes, in their order."""
    since = len(ami.events)
    await caller.call(number)
    channels = [await _channel(ami, prefix, since) for prefix in prefixes]
    await answerer.answered()
    await _bridged(ami, channels[0], channels[1], since)
    await asyncio.sleep(TALK)
    return channels


async def test_pjsip_member_one_stop_by_linkedid_when_the_customer_hangs_up(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """The phone PJSIP/410 answers a queue call, talks, the customer hangs up: one stop, by the
    customer's uniqueid (the linkedid), with the endpoint's login."""
    agent = await phones("410")
    customer = await phones("customer")
    cust, member = await _talking(ami, customer, "100", agent, "PJSIP/customer-", "PJSIP/410-")
    assert simulator.received == []
    await customer.send("hangup", call="c1")
    await ami.wait_hangup(member)
    await ami.wait_hangup(cust)
    await bridge.wait_drained()
    assert _requests(simulator) == [(STOP_PATH, cust, "Fred")]


# The member channel Queue bridges with the customer, by the number the customer dials.
MEMBERS = {"100": "PJSIP/410-", "101": "Local/410@test-sip-dial-", "0299990001": "PJSIP/410-"}


async def _queue_call(
    ami: Ami, phones: StartPhone, exten: str = "100"
) -> tuple[Phone, Phone, str, str]:
    """The customer calls ``exten``, 410 answers and they talk: (410, customer, the customer's
    channel = the linkedid, the member's channel)."""
    agent = await phones("410")
    customer = await phones("customer")
    since = len(ami.events)
    await customer.call(exten)
    cust = await _channel(ami, "PJSIP/customer-", since)
    member = await _channel(ami, MEMBERS[exten], since)
    await agent.answered()
    await _bridged(ami, cust, member, since)
    await asyncio.sleep(TALK)
    return agent, customer, cust, member


async def _ends(
    ami: Ami, bridge: BridgeProcess, customer: Phone, *legs: str, call: str = "c1"
) -> None:
    """The customer hangs up (its call ``call``); the legs end; what the call sent is delivered."""
    await customer.send("hangup", call=call)
    for leg in legs:
        await ami.wait_hangup(leg)
    await bridge.wait_drained()


async def _handed_on(ami: Ami, simulator: NoojeeSimulator, cust: str, to: str, since: int) -> str:
    """The customer's channel is bridged with a new channel of phone ``to`` and they talk,
    and NoojeeContact received nothing meanwhile: the uniqueid of that channel."""
    before = len(simulator.received)
    target = await _channel(ami, f"PJSIP/{to}-", since)
    await _bridged(ami, cust, target, since)
    await asyncio.sleep(TALK)
    assert simulator.received[before:] == []
    return target


async def _attended_by_the_phone(agent: Phone, consulted: Phone, call: str = "in1") -> None:
    """410's phone holds the customer (its call ``call``), calls 411, talks, completes with
    REFER + Replaces."""
    await agent.send("hold", call=call)
    await agent.send("call", call="c2", to=agent.uri(consulted.user))
    await consulted.answered()
    await agent.wait(event="state", call="c2", state="CONFIRMED")
    await asyncio.sleep(TALK)  # 410 tells 411 about the customer
    await agent.send("xfer_replaces", call=call, other="c2")


async def test_local_chain_member_agent_hangs_up_one_stop_with_the_member_name(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """A FreePBX-style member (Local/410@test-sip-dial/n, named Fred) rings PJSIP/410; the agent
    hangs up first: one stop by the linkedid, with the member's name as the login."""
    agent, customer, cust, member = await _queue_call(ami, phones, "101")
    assert simulator.received == []
    await agent.send("hangup", call="in1")
    await ami.wait_hangup(member)
    await customer.ended("c1")
    await ami.wait_hangup(cust)
    await bridge.wait_drained()
    assert _requests(simulator) == [(STOP_PATH, cust, "Fred")]


async def test_stop_code_from_the_phone_then_hangup_one_stop_by_extension(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """The phone sends the stop code (RFC 4733): one stop for 410 (Fred); nothing at the end."""
    agent, customer, cust, member = await _queue_call(ami, phones)
    await agent.send("dtmf", call="in1", digits=STOP)
    await ami.wait_var("NOOJEE_CALL_RECORDING", "stopped", uniqueid=cust)
    await _feature_done(ami, member)  # the agent heard the beep
    await _ends(ami, bridge, customer, cust, member)
    assert _requests(simulator) == [(STOP_PATH, "410", "Fred")]


async def test_blind_transfer_by_the_phone_one_stop_at_the_end_with_the_target_login(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """410's phone transfers the customer to 411 (REFER): nothing while the customer talks to
    411; one stop by the linkedid when the call ends, with 411's login."""
    agent, customer, cust, member = await _queue_call(ami, phones)
    await phones("411")
    since = len(ami.events)
    await agent.send("xfer", call="in1", to=agent.uri("411"))
    await ami.wait_hangup(member)
    target = await _handed_on(ami, simulator, cust, "411", since)
    await _ends(ami, bridge, customer, cust, target)
    assert _requests(simulator) == [(STOP_PATH, cust, "Wilma")]


@pytest.mark.parametrize("exten", ["100", "101"])  # a PJSIP member, a Local-chain member
async def test_attended_transfer_by_the_phone_one_stop_at_the_end(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone, exten: str
) -> None:
    """410 holds the customer, calls 411 from its own phone, completes with REFER + Replaces:
    nothing when 410 leaves nor while the customer talks to 411; one stop by the linkedid at
    the end, with 411's login (noted by 410's leg as it leaves: ATTENDEDTRANSFER). With a
    Local member the chain stays: its far end (``;2``) talks to 411 instead of the phone."""
    since = len(ami.events)
    agent, customer, cust, member = await _queue_call(ami, phones, exten)
    phone = await _channel(ami, "PJSIP/410-", since)  # 410's phone's leg (the member, for 100)
    # who 411 gets bridged with: the customer, or the ;2 half of the member's Local channel
    peer = cust if exten == "100" else _uniqueid(ami, ami.channel_name(member)[:-1] + "2")
    consulted = await phones("411")
    await _attended_by_the_phone(agent, consulted)
    await ami.wait_hangup(phone)
    target = await _handed_on(ami, simulator, peer, "411", 0)
    await _ends(ami, bridge, customer, cust, target)
    assert _requests(simulator) == [(STOP_PATH, cust, "Wilma")]


async def test_cti_redirect_one_stop_at_the_end_with_the_target_login(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """Agent desktop software redirects the customer's channel (AMI Redirect) to a context that
    dials 411: nothing when 410's leg ends nor while the customer talks to 411; one stop at the
    end with 411's login."""
    _agent, customer, cust, member = await _queue_call(ami, phones)
    await phones("411")
    since = len(ami.events)
    await ami.action(
        "Redirect", Channel=ami.channel_name(cust), Context="test-phones", Exten="411", Priority="1"
    )
    await ami.wait_hangup(member)
    target = await _handed_on(ami, simulator, cust, "411", since)
    await _ends(ami, bridge, customer, cust, target)
    assert _requests(simulator) == [(STOP_PATH, cust, "Wilma")]


async def test_transfer_target_that_never_answers_leaves_the_login_alone(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """410 transfers to 412, who rings and never answers; the customer gives up: one stop by
    the linkedid with Fred's login (412 never had the call)."""
    agent, customer, cust, member = await _queue_call(ami, phones)
    ringing = await phones("412", ring=True)
    await agent.send("xfer", call="in1", to=agent.uri("412"))
    await ami.wait_hangup(member)
    await ringing.ringing()
    assert simulator.received == []
    await _ends(ami, bridge, customer, cust)
    assert _requests(simulator) == [(STOP_PATH, cust, "Fred")]


async def test_stop_code_before_a_blind_transfer_nothing_more_at_the_end(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """410 stops the recording with the stop code, then transfers to 411 (REFER): the call's state
    says stopped, so the end of the call sends nothing more."""
    agent, customer, cust, member = await _queue_call(ami, phones)
    await phones("411")
    await agent.send("dtmf", call="in1", digits=STOP)
    await ami.wait_var("NOOJEE_CALL_RECORDING", "stopped", uniqueid=cust)
    await _feature_done(ami, member)  # the agent heard the beep
    since = len(ami.events)
    await agent.send("xfer", call="in1", to=agent.uri("411"))
    await ami.wait_hangup(member)
    target = await _handed_on(ami, simulator, cust, "411", since)
    await _ends(ami, bridge, customer, cust, target)
    assert _requests(simulator) == [(STOP_PATH, "410", "Fred")]


async def test_readme_survey_snippet_stops_when_queue_returns(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """dialplan/README.md's survey snippet, as written: the agent hangs up, the stop goes out
    when Queue() returns, before the customer's survey; the customer's end sends nothing more."""
    agent, customer, cust, member = await _queue_call(ami, phones, "0299990001")
    await agent.send("hangup", call="in1")
    await ami.wait_hangup(member)
    queued = await ami.wait_var("NOOJEE_STATUS", "QUEUED", uniqueid=cust)
    survey = await ami.wait_app(cust, "Playback")
    await customer.ended("c1")  # the snippet hangs up after its survey
    hangup = await ami.wait_hangup(cust)
    await bridge.wait_drained()
    assert ami.events.index(queued) < ami.events.index(survey) < ami.events.index(hangup)
    assert _requests(simulator) == [(STOP_PATH, cust, "Fred")]
