"""The shipped dialplan/ on a real Asterisk 22: loading, and its own handling of the AGI wire.

A fake FastAGI listener stands in for the bridge where a test is about the dialplan itself
(what it sends on the wire, AGISIGHUP, a bridge that answers nothing) or about no bridge at all;
everything that involves NoojeeContact runs against the real bridge in test_end_to_end.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .codes import DIALLED_STOP, STOP, in_call_codes
from .conftest import SANDBOX_SCRIPT, Ami, FakeBridge, Sandbox
from .readme_snippets import claims, snippets

pytestmark = pytest.mark.asterisk

SHIPPED_CONTEXTS = (
    "agi-bridge-recording",
    "agi-bridge-call-recording",
    "agi-bridge-feedback",
    "agi-bridge-feature",
    "agi-bridge-features",
    "agi-bridge-agent-call",
    "agi-bridge-queue-call",
    "agi-bridge-queue-member",
    "agi-bridge-queue-connected",
    "agi-bridge-call-end",
    "agi-bridge-hangup",
    "agi-bridge-h",
    "agi-bridge-dialled",
    "agi-bridge-example-agents",
)


def test_every_shipped_context_is_loaded_from_the_real_files(sandbox: Sandbox) -> None:
    for context in SHIPPED_CONTEXTS:
        out = sandbox.cli(f"dialplan show {context}")
        assert f"Context '{context}' created by 'pbx_config'" in out, out
        # read from the bind-mounted repo file, not from a copy
        assert re.search(r"\[extensions\.conf:\d+\]", out), out
    mounts = Path("/proc/self/mountinfo").read_text()
    assert f"/agi-bridge-sandbox/{sandbox.instance}/dialplan ro," in mounts


def test_provision_says_it_reused_the_cached_root(sandbox: Sandbox) -> None:
    """`asterisk-sandbox provision` on a provisioned root says it reused it, not just "done"."""
    res = subprocess.run(
        [str(SANDBOX_SCRIPT), "provision"], capture_output=True, text=True, check=True, timeout=60
    )
    assert res.stdout == "PROVISION=reused\n"
    assert "reusing " in res.stderr


def test_sandbox_overrides_the_bridge_address_without_editing_the_shipped_file(
    sandbox: Sandbox,
) -> None:
    out = sandbox.cli("dialplan show globals")
    assert f"AGI_BRIDGE=agi://127.0.0.1:{sandbox.bridge_port}" in out
    assert "4573" not in out  # the shipped default is overridden, never called by tests


def test_feature_codes_are_registered(sandbox: Sandbox) -> None:
    """Asterisk has the shipped applicationmap entries, with the digits features.conf gives."""
    out = sandbox.cli("features show")
    for name, digits in in_call_codes().items():
        assert re.search(rf"^{name}\s+no def\s+{re.escape(digits)}\s*$", out, re.M), out


async def test_applicationmap_substitutes_variables(ami: Ami, fake_bridge: FakeBridge) -> None:
    """Fact about Asterisk 22: ${...} in applicationmap application data IS substituted.

    (The shipped features.conf still uses a Gosub: one place for address and status handling.)
    """
    phone, agent = await ami.originate(
        "Local/410@test-agent/n",
        context="test-dtmf",
        variables={"TEST_DTMF": "#9", "TEST_CALLEE_WAIT": "2",
                   "TEST_EXTRA_FEATURES": "test_subst_probe"},
    )  # fmt: skip
    probe = await ami.wait_var("TEST_SUBST_PROBE", uniqueid=agent)
    assert probe.get("Value", "").startswith("Local/410@test-agent-")
    await ami.wait_hangup(phone)
    await fake_bridge.wait_sessions(1)  # the hangup handler


async def test_hangup_handler_stops_by_uniqueid_async_without_sighup(
    ami: Ami, fake_bridge: FakeBridge
) -> None:
    phone, agent = await ami.originate(
        "Local/410@test-agent/n", application="Wait", data="10",
        variables={"TEST_CALLEE_WAIT": "1"},
    )  # fmt: skip
    await ami.wait_hangup(agent)
    [handler] = await fake_bridge.wait_sessions(1)
    assert handler.env["agi_network_script"] == "recording/stop"
    assert handler.env["agi_uniqueid"] == agent
    assert handler.env["agi_context"] == "agi-bridge-recording"
    # no NOOJEE_AGENT on this call; the call named by its linkedid, the first channel's uniqueid
    assert handler.args == ["by=uniqueid", "mode=async", f"call={phone}"]
    # dead channel: SET VARIABLE still works, and AGISIGHUP=no spared the HANGUP line
    assert handler.replies == ["200 result=1", "200 result=1"]
    assert handler.hangup_lines == 0
    await ami.wait_var("NOOJEE_STATUS", "STOPPED", uniqueid=agent)
    await ami.wait_hangup(phone)


async def test_agisighup_no_is_what_spares_the_hangup_line(
    ami: Ami, fake_bridge: FakeBridge
) -> None:
    """Without AGISIGHUP=no a hangup handler's session gets an extra "HANGUP" line."""
    phone, _ = await ami.originate("Local/s@test-sighup-probe/n", application="Wait", data="5")
    await ami.wait_hangup(phone)
    [session] = await fake_bridge.wait_sessions(1)
    assert session.args == ["by=uniqueid", "probe=sighup"]
    assert session.after_close == ["HANGUP"]


async def test_h_extension_variant(ami: Ami, fake_bridge: FakeBridge) -> None:
    phone, agent = await ami.originate(
        "Local/410@test-agent-h/n", application="Wait", data="10",
        variables={"TEST_CALLEE_WAIT": "1"},
    )  # fmt: skip
    # the channel ran the h extension that [test-agent-h] only has by 'include => agi-bridge-h'
    # (Newexten reports the channel's own context, test-agent-h)
    await ami.wait_event(
        lambda e: e.event == "Newexten" and e.get("Uniqueid") == agent
        and e.get("Extension") == "h" and e.get("AppData") == "AGISIGHUP=no",
        what="h extension of agi-bridge-h",
    )  # fmt: skip
    await ami.wait_var("NOOJEE_STATUS", "STOPPED", uniqueid=agent)
    [h] = await fake_bridge.wait_sessions(1)
    assert h.env["agi_uniqueid"] == agent
    assert h.args == ["by=uniqueid", "mode=async", f"call={phone}"]  # phone's: the linkedid
    assert h.hangup_lines == 0


async def test_bridge_not_running_dialled_code_goes_on(ami: Ami, sandbox: Sandbox) -> None:
    """Nothing listens on the bridge port: AGISTATUS=FAILURE, NOOJEE_STATUS=FAILED, error beep."""
    offset = sandbox.log_size()
    _, agent = await ami.originate(
        "Local/410@test-phone/n",
        application="Wait",
        data="10",
        variables={"TEST_DIAL": DIALLED_STOP},
    )
    await ami.wait_var("AGISTATUS", "FAILURE", uniqueid=agent)
    await ami.wait_var("NOOJEE_STATUS", "FAILED", uniqueid=agent)
    await ami.wait_var(
        "NOOJEE_MESSAGE", "agi-bridge gave no answer (AGISTATUS=FAILURE)", uniqueid=agent
    )
    await ami.wait_var("PLAYBACKSTATUS", "SUCCESS", uniqueid=agent)  # beeperr was played
    await ami.wait_hangup(agent)
    log = sandbox.log_since(offset)
    assert f"agi-bridge at agi://127.0.0.1:{sandbox.bridge_port} failed (AGISTATUS=FAILURE)" in log


async def test_bridge_not_running_feature_code_keeps_the_call(ami: Ami) -> None:
    phone, agent = await ami.originate(
        "Local/410@test-agent/n",
        context="test-dtmf",
        variables={"TEST_DTMF": STOP, "TEST_CALLEE_WAIT": "2"},
    )
    await ami.wait_var("AGISTATUS", "FAILURE", uniqueid=agent)
    await ami.wait_var("NOOJEE_STATUS", "FAILED", uniqueid=agent)
    # the bridged call went on until the callee hung up
    await ami.wait_var("TEST_CALLEE_DONE", "yes", linkedid=phone)
    await ami.wait_var("TEST_AFTER_DIAL", "ANSWER", uniqueid=agent)
    await ami.wait_hangup(phone)


async def test_bridge_that_sets_no_status_counts_as_failed(
    ami: Ami, fake_bridge: FakeBridge
) -> None:
    fake_bridge.status.clear()  # the fake bridge now answers nothing
    _, chan = await ami.originate(
        "Local/s@test-direct/n", application="Wait", data="5",
        variables={"TEST_ROUTE": "stop"},
    )  # fmt: skip
    await ami.wait_var("TEST_RETVAL", "FAILED", uniqueid=chan)
    await ami.wait_var(
        "NOOJEE_MESSAGE", "agi-bridge gave no answer (AGISTATUS=SUCCESS)", uniqueid=chan
    )


def _priorities(out: str) -> dict[str, int]:
    """extension -> number of priorities, from ``dialplan show <context>``."""
    counts: dict[str, int] = {}
    exten = None
    for line in out.splitlines():
        if m := re.match(r"\s*'([^']+)'\s*=>\s*\d+\.", line):
            exten = m.group(1)
            counts[exten] = 1
        elif exten is not None and re.match(r"\s+\d+\.\s", line):
            counts[exten] += 1
        else:
            exten = None
    return counts


def test_readme_snippets_load_as_written(sandbox: Sandbox) -> None:
    """Every ```asterisk snippet of dialplan/README.md, copied verbatim into the sandbox, gives
    Asterisk the contexts, extensions and priorities it claims, without a load problem."""
    texts = snippets()
    assert len(texts) >= 4  # queue call, survey, transfers, agent pool
    for text in texts:
        for context, extens in claims(text).items():
            out = sandbox.cli(f"dialplan show {context}")
            assert f"Context '{context}' created by 'pbx_config'" in out, out
            assert _priorities(out) == extens, (context, out)
    problems = [line for line in sandbox.log_problems() if "readme-snippets" in line]
    assert problems == []


OURS = "agi_bridge_stop#agi_bridge_start#agi_bridge_toggle"


async def test_dynamic_features_once_per_channel_keeping_the_sites(ami: Ami) -> None:
    """A channel armed twice over a site's own DYNAMIC_FEATURES keeps the site's entry and
    gets the codes once."""
    _one, two = await ami.originate("Local/s@test-features/n", application="Wait", data="5")
    features = await ami.wait_var("TEST_FEATURES", uniqueid=two)
    assert features["Value"] == f"site_code#{OURS}"


async def test_agent_call_features_stay_on_the_agents_channel(
    ami: Ami, fake_bridge: FakeBridge
) -> None:
    """[agi-bridge-agent-call] enables the codes on the agent's channel only: the callee
    (the customer, a transfer target) inherits none of them."""
    phone, agent = await ami.originate(
        "Local/410@test-agent/n", application="Wait", data="10",
        variables={"TEST_CALLEE_WAIT": "1"},
    )  # fmt: skip
    callee = await ami.wait_var("TEST_CALLEE_FEATURES")
    assert callee.get("Value", "") == ""
    assert ami.values("DYNAMIC_FEATURES", agent) == [OURS]
    await ami.wait_hangup(phone)
    await fake_bridge.wait_sessions(1)  # the agent's hangup stop
