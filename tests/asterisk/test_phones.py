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

from .conftest import STOP_PATH, Ami, BridgeProcess
from .phones import StartPhone

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


async def test_pjsip_member_one_stop_by_linkedid_when_the_customer_hangs_up(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """The phone PJSIP/410 answers a queue call, talks, the customer hangs up: one stop, by the
    customer's uniqueid (the linkedid), with the endpoint's login."""
    agent = await phones("410")
    customer = await phones("customer")
    since = len(ami.events)
    await customer.call("100")
    cust = await _channel(ami, "PJSIP/customer-", since)
    member = await _channel(ami, "PJSIP/410-", since)
    await agent.answered()
    await _bridged(ami, cust, member, since)
    await asyncio.sleep(TALK)
    assert simulator.received == []
    await customer.send("hangup", call="c1")
    await ami.wait_hangup(member)
    await ami.wait_hangup(cust)
    await bridge.wait_drained()
    assert _requests(simulator) == [(STOP_PATH, cust, "Fred")]
