"""From an AGI environment to a NoojeeContact request: parameters, identifier and agent.

Environments are built the way the server gets them: the bytes the fake Asterisk sends, fed
through the real protocol parser.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from agi_bridge.calls import (
    MAX_IDENTIFIER_LENGTH,
    MAX_VALUE_LENGTH,
    CallDefaults,
    CallParameters,
    Rejected,
    build_request,
    extension_from_channel,
    parse_parameters,
)
from agi_bridge.protocol import AgiConnection, Environment
from agi_bridge.testing.fake_asterisk import Call, environment_block
from agi_bridge.vocabulary import Action, RecordingRequest

UNIQUEID = "1795811316.1"


def environment(
    script: str = "recording/stop",
    arguments: Sequence[str] = (),
    channel: str = "PJSIP/410-00000001",
    uniqueid: str = UNIQUEID,
) -> Environment:
    connection = AgiConnection()
    connection.receive_data(
        environment_block(
            Call(script=script, arguments=tuple(arguments), channel=channel, uniqueid=uniqueid)
        )
    )
    event = connection.next_event()
    assert isinstance(event, Environment), event
    return event


def settings(**values: Any) -> CallDefaults:
    return CallDefaults(**values)


def request_for(
    action: Action,
    script: str = "recording/stop",
    arguments: Sequence[str] = (),
    channel: str = "PJSIP/410-00000001",
    uniqueid: str = UNIQUEID,
    **setting_values: Any,
) -> RecordingRequest:
    env = environment(script, arguments, channel, uniqueid)
    return build_request(action, env, parse_parameters(env), settings(**setting_values))


def rejected(action: Action, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(Rejected) as caught:
        request_for(action, *args, **kwargs)
    return caught.value.reason


# --- extension_from_channel ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "extension"),
    [
        ("PJSIP/410-00000001", "410"),
        ("PJSIP/alice-00000003", "alice"),
        ("PJSIP/alice-smith-00000003", "alice-smith"),
        ("SIP/410-0000002a", "410"),
        ("SIP/410-12FA7B", "410"),  # the NoojeeContact docs' example
        ("IAX2/410-1234", "410"),
        ("DAHDI/1-1", "1"),
        ("DAHDI/i1/5551234-1a", "5551234"),
        ("Local/410@from-internal-00000002;1", "410"),
        ("Local/410@from-internal-00000002;2", "410"),
        ("Local/s@test-00000000;2", "s"),
    ],
)
def test_extension_from_channel(channel: str, extension: str) -> None:
    """Each driver's channel name yields its endpoint; the opaque suffix is dropped."""
    assert extension_from_channel(channel) == extension


@pytest.mark.parametrize(
    "channel",
    [
        "",
        "PJSIP",
        "PJSIP/",
        "/410-00000001",
        "PJSIP/410",  # no unique suffix: not a channel name we know
        "PJSIP/-00000001",
        "Local/410",
        "Local/@from-internal-00000002;1",
        "IAX2/10.0.0.1:4569-123",  # a guest caller: an address, not an extension
        "garbage",
    ],
)
def test_extension_from_channel_none(channel: str) -> None:
    """Names without an extension in them give None instead of a guess."""
    assert extension_from_channel(channel) is None


# --- parse_parameters ------------------------------------------------------------------------


def test_no_parameters() -> None:
    """A bare route has no parameters at all."""
    assert parse_parameters(environment()) == CallParameters()


def test_query_parameters() -> None:
    """Parameters in the URL's query string are read (and percent-decoded)."""
    env = environment("recording/start?by=uniqueid&agent=Fred%20F&tag=abc&mode=async")
    assert parse_parameters(env) == CallParameters(
        by="uniqueid", agent="Fred F", tag="abc", mode="async"
    )


def test_argument_parameters() -> None:
    """key=value arguments are read; '=' inside a value is kept."""
    env = environment(arguments=["by=id", "id=abc=def", "agent=Fred"])
    assert parse_parameters(env) == CallParameters(by="id", id="abc=def", agent="Fred")


def test_arguments_win_over_query() -> None:
    """The same key in the query and the arguments: the argument's value is used."""
    env = environment("recording/stop?by=uniqueid&agent=Wilma&mode=sync", ["agent=Fred", "by=id"])
    assert parse_parameters(env) == CallParameters(by="id", agent="Fred", mode="sync")


def test_lone_argument_is_the_agent() -> None:
    """AGI(agi://.../recording/stop,Fred) means agent=Fred."""
    assert parse_parameters(environment(arguments=["Fred"])).agent == "Fred"


def test_lone_argument_wins_over_query_agent() -> None:
    """A lone argument is an argument, so it wins over agent= in the query."""
    env = environment("recording/stop?agent=Wilma", ["Fred"])
    assert parse_parameters(env).agent == "Fred"


def test_empty_argument_ignored() -> None:
    """An empty argument (an unset ${VAR}) is skipped, not taken as an empty agent."""
    env = environment(arguments=["", "by=uniqueid", ""])
    assert parse_parameters(env) == CallParameters(by="uniqueid")


def test_unknown_key_rejected() -> None:
    """An unknown key is rejected, naming the key, where it was and the keys we know."""
    with pytest.raises(Rejected) as caught:
        parse_parameters(environment(arguments=["agnet=Fred"]))
    assert "'agnet'" in caught.value.reason
    assert "AGI arguments" in caught.value.reason
    assert "agent, by, call, channel, id, mode, tag" in caught.value.reason


def test_unknown_key_in_query_rejected() -> None:
    """An unknown key in the query string is rejected too, saying it came from the URL."""
    with pytest.raises(Rejected, match=r"'colour' in the AGI URL query"):
        parse_parameters(environment("recording/stop?colour=red"))


@pytest.mark.parametrize(
    ("script", "arguments"),
    [
        ("recording/stop", ["agent=Fred", "agent=Wilma"]),
        ("recording/stop", ["Fred", "Wilma"]),  # two lone arguments: two agents
        ("recording/stop", ["Fred", "agent=Wilma"]),
        ("recording/stop?by=id&by=uniqueid", []),
    ],
)
def test_duplicate_key_rejected(script: str, arguments: list[str]) -> None:
    """A key given twice in the same place is ambiguous: rejected."""
    with pytest.raises(Rejected, match="given twice"):
        parse_parameters(environment(script, arguments))


@pytest.mark.parametrize(
    ("argument", "reason"),
    [
        ("by=phone", "by='phone' is not one of uniqueid, extension, id"),
        ("by=UNIQUEID", "is not one of"),
        ("mode=later", "mode='later' is not one of sync, async"),
    ],
)
def test_bad_by_or_mode_rejected(argument: str, reason: str) -> None:
    """by and mode only take their documented values."""
    with pytest.raises(Rejected) as caught:
        parse_parameters(environment(arguments=[argument]))
    assert reason in caught.value.reason


@pytest.mark.parametrize("key", ["agent", "tag", "id", "channel", "call"])
@pytest.mark.parametrize("bad", ["a\tb", "a\x7fb", "a\x1bb", "a\x00b"])
def test_control_characters_rejected(key: str, bad: str) -> None:
    """Values with control characters are rejected (from the query, percent-encoded)."""
    encoded = "".join(f"%{ord(ch):02X}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in bad)
    with pytest.raises(Rejected, match=f"{key} contains control characters"):
        parse_parameters(environment(f"recording/start?{key}={encoded}"))


@pytest.mark.parametrize(
    ("key", "limit"),
    [
        ("agent", MAX_VALUE_LENGTH),
        ("tag", MAX_VALUE_LENGTH),
        ("id", MAX_IDENTIFIER_LENGTH),
        ("channel", MAX_IDENTIFIER_LENGTH),
        ("call", MAX_IDENTIFIER_LENGTH),
    ],
)
def test_value_length_limits(key: str, limit: int) -> None:
    """A value at the limit is accepted, one character more is rejected."""
    ok = parse_parameters(environment(arguments=[f"{key}={'x' * limit}"]))
    assert getattr(ok, key) == "x" * limit
    with pytest.raises(Rejected, match=f"{key} is longer than {limit} characters"):
        parse_parameters(environment(arguments=[f"{key}={'x' * (limit + 1)}"]))


@pytest.mark.parametrize("key", ["agent", "tag", "id", "by", "mode", "channel", "call"])
def test_empty_value_means_not_given(key: str) -> None:
    """key= with nothing after it (agent=${UNSET} in the dialplan) falls back to the defaults,
    exactly like an empty argument."""
    assert parse_parameters(environment(arguments=[f"{key}="])) == CallParameters()


def test_empty_agent_falls_back_to_the_agents_map() -> None:
    """agent=${UNSET} on a stop still finds the agent configured for the extension."""
    env = environment(arguments=["agent="], channel="PJSIP/410-00000001")
    request = build_request("stop", env, parse_parameters(env), settings(agents={"410": "Fred"}))
    assert request.agent == "Fred"


# --- build_request ---------------------------------------------------------------------------


def test_by_extension_uses_the_channel() -> None:
    """by=extension sends the endpoint of agi_channel."""
    request = request_for("stop", arguments=["by=extension", "Fred"], channel="SIP/alice-0000002a")
    assert request == RecordingRequest("stop", "alice", agent="Fred", kind="extension")


def test_by_uniqueid_uses_agi_uniqueid() -> None:
    """by=uniqueid sends agi_uniqueid as it came, whatever its shape."""
    request = request_for("stop", arguments=["by=uniqueid", "Fred"], uniqueid="pbx1-1795811316.42")
    assert request == RecordingRequest("stop", "pbx1-1795811316.42", agent="Fred")


def test_by_id_uses_the_id_argument() -> None:
    """by=id sends the explicit id (e.g. the linkedid)."""
    request = request_for("stop", arguments=["by=id", "id=1795811300.7", "Fred"])
    assert request == RecordingRequest("stop", "1795811300.7", agent="Fred", kind="id")


def test_channel_parameter_without_extension_rejected() -> None:
    """A channel= the bridge reads no extension from is a dialplan mistake, whatever by= says."""
    reason = rejected("stop", arguments=["by=uniqueid", "channel=IAX2/10.0.0.1:4569-123", "Fred"])
    assert "channel='IAX2/10.0.0.1:4569-123' has no extension" in reason


def test_by_extension_without_extension_rejected() -> None:
    """A channel with no extension in it is rejected with a hint to use another identifier."""
    reason = rejected("stop", arguments=["Fred"], channel="IAX2/10.0.0.1:4569-123")
    assert "no extension in channel 'IAX2/10.0.0.1:4569-123'" in reason
    assert "by=uniqueid" in reason


def test_uniqueid_checked() -> None:
    """by=uniqueid with an over-long agi_uniqueid is rejected, not sent."""
    reason = rejected(
        "stop", arguments=["by=uniqueid", "Fred"], uniqueid="1" * (MAX_IDENTIFIER_LENGTH + 1)
    )
    assert "agi_uniqueid is longer than" in reason


def test_extension_checked() -> None:
    """by=extension with control characters in agi_channel is rejected, not sent."""
    reason = rejected("stop", arguments=["Fred"], channel="PJSIP/41\x1b0-00000001")
    assert "extension contains control characters" in reason


def test_agent_argument_wins_over_map_and_default() -> None:
    """The call's agent beats the extension map and the default agent."""
    request = request_for(
        "stop", arguments=["Fred"], agents={"410": "Wilma"}, default_agent="Barney"
    )
    assert request.agent == "Fred"


def test_agent_from_map_wins_over_default() -> None:
    """Without an agent in the call, the extension -> agent map is used before the default."""
    request = request_for("stop", agents={"410": "Wilma"}, default_agent="Barney")
    assert request.agent == "Wilma"


def test_agent_map_uses_the_channel_extension_even_by_uniqueid() -> None:
    """The map is keyed on the channel's extension, also when the uniqueid identifies the call."""
    request = request_for("stop", arguments=["by=uniqueid"], agents={"410": "Wilma"})
    assert request == RecordingRequest("stop", UNIQUEID, agent="Wilma")


def test_agent_from_default() -> None:
    """An extension missing from the map falls back to default_agent."""
    request = request_for("stop", agents={"411": "Wilma"}, default_agent="Barney")
    assert request.agent == "Barney"


def test_stop_without_agent_rejected() -> None:
    """NoojeeContact requires agentLoginName for stop: no agent anywhere -> REJECTED."""
    reason = rejected("stop", agents={"411": "Wilma"})
    assert "stop needs an agent" in reason


def test_stop_with_empty_default_agent_rejected() -> None:
    """An empty default_agent or map entry counts as no agent (AGI_BRIDGE_DEFAULT_AGENT=)."""
    assert "stop needs an agent" in rejected("stop", default_agent="")
    assert "stop needs an agent" in rejected("stop", agents={"410": ""})


def test_start_without_agent_allowed() -> None:
    """start may go without an agent: agentLoginName is then omitted."""
    request = request_for("start", script="recording/start")
    assert request == RecordingRequest("start", "410", agent=None, tag=None, kind="extension")


def test_start_with_tag() -> None:
    """tag is passed through on start."""
    request = request_for("start", script="recording/start", arguments=["tag=CRM-42", "Fred"])
    assert request == RecordingRequest("start", "410", agent="Fred", tag="CRM-42", kind="extension")


def test_tag_on_stop_rejected() -> None:
    """tag only means something to start: on stop it is rejected, not silently dropped."""
    assert "tag is only accepted by recording/start" in rejected(
        "stop", arguments=["tag=x", "Fred"]
    )
