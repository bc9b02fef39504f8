"""dialplan/README.md's FreePBX recipe, as written, in an IMITATION of FreePBX 17, with real phones.

The imitation (tests/asterisk/freepbx/, started with ``asterisk-sandbox --layout freepbx``) is
what FreePBX would generate around the recipe, cut down to what a queue call with transfers
passes through; it is not FreePBX. It imitates: FreePBX's file layout (``extensions.conf``
including ``extensions_additional.conf`` then ``extensions_custom.conf``, then its empty
predial hook; ``features.conf`` including the generated and custom files inside
``[general]`` / ``[applicationmap]`` / ``[featuremap]``; the shipped files in
``/etc/asterisk/agi-bridge``); the generated ``[globals]`` (``DYNAMIC_FEATURES=apprecord``,
``TRANSFER_CONTEXT=from-internal-xfer``, ``DIAL_OPTIONS=HhTtr``); ``from-internal`` with its
``noxfer`` / ``xfer`` branches and ``-custom`` includes; ``ext-local``; ``ext-queues`` with
FreePBX's QOPTIONS / QGOSUB lines and ``Queue()`` line; ``from-queue``; ``macro-dial-one``
(caller-side ``T`` dropped for queue calls, ``U(macro-auto-blkvm)``, the predial hook,
``b(func-apply-sipheaders)``); an inbound route to the recipe's Custom Destination; FreePBX's
in-call codes (``##``, ``*2``, ``**``, ``apprecord`` ``*1``, attended-transfer codes ``*3``-``*6``);
the queue member ``Local/410@from-queue/n`` named by its display name; and
``pjsip.endpoint_custom_post.conf``. It does NOT imitate FreePBX's PHP, database, GUI and
``fwconsole``, follow-me, call forwarding, voicemail, ring groups, its own recording (``*1``
runs a stand-in), ``macro-exten-vm``, ``macro-hangupcall``, queue announcements, fail-over
destinations, FreePBX 16 (``Macro()``), nor commercial modules.

The README's FreePBX files (extensions_custom.conf, features_applicationmap_custom.conf,
pjsip.endpoint_custom_post.conf) are extracted literally and loaded where FreePBX loads them.
Extension 410 has no login of its own (the bridge's ``agents`` setting gives Wilma); 411 has
``Fred`` from the README's ``set_var``.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from agi_bridge.testing.simulator import NoojeeSimulator

from .codes import DIALLED_STOP, STOP, TOGGLE, dialled_codes, in_call_codes
from .conftest import START_PATH, STOP_PATH, Ami, BridgeProcess, Sandbox, running_sandbox
from .phones import Phone, StartPhone
from .readme_snippets import freepbx_files
from .test_codes import clashes
from .test_phones import (
    TALK,
    _attended_by_the_phone,
    _channel,
    _ends,
    _requests,
    _talking,
)
from .test_queue import _feature_done

pytestmark = pytest.mark.asterisk

IMITATION = Path(__file__).resolve().parent / "freepbx"
# The number the customer dials: the imitation's inbound route, to the Custom Destination.
DID = "0299990000"
# The attended-transfer codes of the imitation ([general]) and Asterisk's defaults, which older
# FreePBX cores leave in place: features show does not list them.
ATXFER_CODES = {"*3", "*4", "*5", "*6"} | {"*1", "*2"}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """This module's Asterisk: the imitation of FreePBX with the README's FreePBX files."""
    site = tmp_path_factory.mktemp("freepbx-site")
    for name, text in freepbx_files().items():
        (site / name).write_text(text)
    args = [
        "--layout", "freepbx",
        "--extensions", str(IMITATION / "freepbx-extensions.conf"),
        "--features", str(IMITATION / "freepbx-features.conf"),
        "--queues", str(IMITATION / "freepbx-queues.conf"),
        "--pjsip", str(IMITATION / "freepbx-pjsip.conf"),
        "--pjsip", str(site / "pjsip.endpoint_custom_post.conf"),
        "--etc", str(site / "extensions_custom.conf"),
        "--etc", str(site / "features_applicationmap_custom.conf"),
    ]  # fmt: skip
    for generated in sorted(IMITATION.glob("*_additional.conf")):
        args += ["--etc", str(generated)]
    instance = f"pytest-{os.getpid()}-freepbx"
    with running_sandbox(instance, args, tmp_path_factory, "freepbx-full.log") as box:
        yield box


def test_features_show_lists_no_clash(sandbox: Sandbox) -> None:
    """Every in-call code `features show` lists, with the attended-transfer codes, is neither
    equal to nor a prefix of another; ours sit next to FreePBX's ##, *2, ** and apprecord *1."""
    current: dict[str, str] = {}
    for line in sandbox.cli("features show").split("Feature Groups")[0].splitlines():
        name, *values = re.split(r"\s{2,}", line.strip())
        if values and not values[-1].endswith("Current") and not name.startswith("-"):
            current[name] = values[-1]  # the code in use; a feature without one has no values
    # Pickup is the dialled pickup code (the channel driver matches it when a phone dials),
    # never a code in a bridge: checked against the dialled codes below.
    pickup = current.pop("Pickup")
    assert current == {
        "Blind Transfer": "##", "Attended Transfer": "*2", "Disconnect Call": "**",
        "apprecord": "*1", **in_call_codes(),
    }  # fmt: skip
    codes = sorted(current.values())
    for i, code in enumerate(codes):
        assert not any(clashes(code, other) for other in codes[i + 1 :]), (code, current)
    for ours in in_call_codes().values():
        assert not any(clashes(ours, atxfer) for atxfer in ATXFER_CODES), ours
    assert not any(clashes(code, pickup) for code in dialled_codes().values())


def test_the_site_hook_replaces_freepbx_stub_and_transfers_never_see_the_dialled_codes(
    sandbox: Sandbox,
) -> None:
    """The README's predial hook wins over FreePBX's stub (rejected at load, as FreePBX means
    it); the dialled codes are reachable from the phones' context, not from a transfer's."""
    hook = sandbox.cli("dialplan show s@macro-dialout-one-predial-hook")
    assert "Gosub(agi-bridge-freepbx-predial,s,1)" in hook, hook
    assert "extensions_custom.conf" in hook, hook
    log = sandbox.log_since(0)
    assert "Unable to register extension 's' priority 1 in 'macro-dialout-one-predial-hook'" in log
    assert "agi-bridge-dialled" in sandbox.cli(f"dialplan show {DIALLED_STOP}@from-internal")
    res = sandbox.run("cli", f"dialplan show {DIALLED_STOP}@from-internal-xfer", check=False)
    assert "There is no existence" in res.stdout + res.stderr, res


async def _queue_call(ami: Ami, phones: StartPhone) -> tuple[Phone, Phone, str, str]:
    """The customer dials the DID, FreePBX's queue rings 410 through Local/410@from-queue and
    the agent answers; they talk: (410, customer, the customer's channel, 410's phone channel)."""
    agent = await phones("410")
    customer = await phones("customer")
    cust, _, phone = await _talking(
        ami, customer, DID, agent, "PJSIP/customer-", "Local/410@from-queue-", "PJSIP/410-"
    )
    return agent, customer, cust, phone


async def _presses(
    ami: Ami, agent: Phone, channel: str, cust: str, code: str, recording: str
) -> None:
    """The agent's phone sends ``code`` (RFC 4733); the code runs on its ``channel`` and leaves
    the call's recording ``recording``; the agent heard the sound."""
    await agent.send("dtmf", call="in1", digits=code)
    await ami.wait_var("NOOJEE_CALL_RECORDING", recording, uniqueid=cust)
    await _feature_done(ami, channel)


async def test_stop_code_stops_once_on_the_phone(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """The agent presses the stop code: one stop for extension 410 with the login of the
    bridge's agents setting, run on the phone's channel; FreePBX's own U() still ran there;
    the end of the call sends nothing more."""
    agent, customer, cust, phone = await _queue_call(ami, phones)
    await ami.wait_var("IMITATION_BLKVM", "ran", uniqueid=phone)
    assert simulator.received == []
    await _presses(ami, agent, phone, cust, STOP, "stopped")
    await _ends(ami, bridge, customer, cust, phone)
    assert _requests(simulator) == [(STOP_PATH, "410", "Wilma")]


async def test_toggle_stops_then_starts_and_the_end_stops(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """The toggle twice: a stop, then a start, for 410; the recording runs again, so the end of
    the call sends its stop by the linkedid."""
    agent, customer, cust, phone = await _queue_call(ami, phones)
    await _presses(ami, agent, phone, cust, TOGGLE, "stopped")
    await _presses(ami, agent, phone, cust, TOGGLE, "started")
    await _ends(ami, bridge, customer, cust, phone)
    assert _requests(simulator) == [
        (STOP_PATH, "410", "Wilma"), (START_PATH, "410", "Wilma"), (STOP_PATH, cust, "Wilma"),
    ]  # fmt: skip


async def test_freepbx_one_touch_recording_still_works_on_an_armed_phone(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """FreePBX's *1 (apprecord, from its global DYNAMIC_FEATURES) runs FreePBX's recording on
    the phone our codes are armed on, and touches nothing of NoojeeContact's: one stop at the
    end."""
    agent, customer, cust, phone = await _queue_call(ami, phones)
    await agent.send("dtmf", call="in1", digits="*1")
    await ami.wait_var("IMITATION_ONE_TOUCH", "ran", uniqueid=phone)
    assert simulator.received == []
    await _ends(ami, bridge, customer, cust, phone)
    assert _requests(simulator) == [(STOP_PATH, cust, "Wilma")]


async def _handed_to_411(
    ami: Ami, simulator: NoojeeSimulator, phones: StartPhone, agent: Phone, phone: str,
    how: str,
) -> tuple[Phone, str]:  # fmt: skip
    """410 hands the call to 411 ``how``: FreePBX's ``##`` or ``*2`` then 411, or the phone's
    blind transfer (``refer``); 411's phone answers (armed by the recipe: FreePBX's U() ran
    there too); 410 leaves (a blind transfer drops it, an attended one completes when 410 hangs
    up); NoojeeContact received nothing: (411, its channel)."""
    target_phone = await phones("411")
    since = len(ami.events)
    if how == "refer":
        await agent.send("xfer", call="in1", to=agent.uri("411"))
    else:
        await agent.send("dtmf", call="in1", digits=f"{how}411")
    target = await _channel(ami, "PJSIP/411-", since)
    await target_phone.answered()
    await ami.wait_var("IMITATION_BLKVM", "ran", uniqueid=target)
    if how == "*2":
        await asyncio.sleep(TALK)  # 410 tells 411 about the customer
        await agent.send("hangup", call="in1")
    await ami.wait_hangup(phone)
    await asyncio.sleep(TALK)  # the customer talks to 411
    assert simulator.received == []
    return target_phone, target


# FreePBX's blind and attended transfer codes, the phone's blind transfer (REFER)
@pytest.mark.parametrize("how", ["##", "*2", "refer"])
async def test_transfer_keeps_the_recording_one_stop_at_the_end(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone, how: str
) -> None:
    """410 hands the call to 411 (FreePBX's ## or *2, or the phone's REFER; all dial in
    TRANSFER_CONTEXT): nothing while the customer talks to 411; one stop by the linkedid when
    the call ends, with 411's login (its endpoint's set_var)."""
    agent, customer, cust, phone = await _queue_call(ami, phones)
    _, target = await _handed_to_411(ami, simulator, phones, agent, phone, how)
    await _ends(ami, bridge, customer, cust, target)
    assert _requests(simulator) == [(STOP_PATH, cust, "Fred")]


async def test_attended_transfer_by_the_phone_one_stop_at_the_end_with_the_target_login(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """410's phone holds the customer, calls 411 (an ordinary internal call), completes with
    REFER + Replaces: nothing meanwhile; one stop by the linkedid at the end, with 411's login
    (noted by 410's phone channel as it leaves)."""
    agent, customer, cust, phone = await _queue_call(ami, phones)
    consulted = await phones("411")
    await _attended_by_the_phone(agent, consulted)
    await ami.wait_hangup(phone)
    await asyncio.sleep(TALK)  # the customer talks to 411
    assert simulator.received == []
    await customer.send("hangup", call="c1")
    await consulted.ended("in1")
    await ami.wait_hangup(cust)
    await bridge.wait_drained()
    assert _requests(simulator) == [(STOP_PATH, cust, "Fred")]


async def test_freepbx_attended_transfer_arms_the_target(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """After FreePBX's *2 to 411, 411's stop code stops the recording for 411 with 411's login;
    the end of the call sends nothing more."""
    agent, customer, cust, phone = await _queue_call(ami, phones)
    target_phone, target = await _handed_to_411(ami, simulator, phones, agent, phone, "*2")
    await _presses(ami, target_phone, target, cust, STOP, "stopped")
    await _ends(ami, bridge, customer, cust, target)
    assert _requests(simulator) == [(STOP_PATH, "411", "Fred")]


async def test_dialled_stop_code_from_a_freepbx_phone(
    ami: Ami, bridge: BridgeProcess, simulator: NoojeeSimulator, phones: StartPhone
) -> None:
    """410's phone dials the dialled stop code in FreePBX's from-internal: one stop for 410."""
    agent = await phones("410")
    await agent.call(DIALLED_STOP)
    await agent.ended("c1")  # the code hangs up after its sound
    await bridge.wait_drained()
    assert _requests(simulator) == [(STOP_PATH, "410", "Wilma")]
