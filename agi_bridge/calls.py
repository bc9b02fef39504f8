"""From an AGI environment to a NoojeeContact request: the call parameters the dialplan passed,
the identifier (uniqueid, extension or an explicit id) and the agent. Pure functions, no I/O.

The dialplan passes parameters as AGI arguments ``key=value`` and/or in the URL's query string
(arguments win); a lone argument without ``=`` is the agent name, so
``AGI(agi://127.0.0.1/recording/stop,Fred)`` works. Anything we do not understand is rejected
with a reason the admin can act on, never guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, get_args

from agi_bridge import defaults
from agi_bridge.protocol import Environment
from agi_bridge.vocabulary import (
    ACTIONS,
    Action,
    By,
    Mode,
    RecordingRequest,
    TargetKind,
    target_kind,
)

# Asterisk accepts a uniqueid of up to 149 characters when it is set at Originate
# (AST_MAX_UNIQUEID 150 including the NUL); NoojeeContact identifiers are no longer.
MAX_IDENTIFIER_LENGTH: Final = 149
# agentLoginName and tag are short NoojeeContact fields; a longer value is a dialplan bug.
MAX_VALUE_LENGTH: Final = 255
# The parameters given as text, and how long each may be.
_TEXT_LIMITS: Final = {
    "id": MAX_IDENTIFIER_LENGTH,
    "channel": MAX_IDENTIFIER_LENGTH,
    "call": MAX_IDENTIFIER_LENGTH,
    "agent": MAX_VALUE_LENGTH,
    "tag": MAX_VALUE_LENGTH,
}
# Every parameter: the text ones, and the two checked against their choices (_checked).
KNOWN_KEYS: Final = frozenset({"by", "mode", *_TEXT_LIMITS})
# C0 control characters and DEL: a dialplan value with one is a bug (or an injection).
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True, kw_only=True)
class CallDefaults:
    """What a call gets when it does not say (the settings of the same names, read once)."""

    default_by: By = defaults.DEFAULT_BY
    default_agent: str | None = None
    agents: Mapping[str, str] = field(default_factory=dict)  # extension -> agentLoginName


class Rejected(Exception):
    """The call asked for something we will not do; ``reason`` goes to NOOJEE_MESSAGE."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CallParameters:
    by: By | None = None
    id: str | None = None
    agent: str | None = None
    tag: str | None = None
    mode: Mode | None = None
    # The channel whose extension is meant, when it is not the one running the AGI: an agent
    # pool's queue member (Local/1001@agent-request) stands for the phone that logged in.
    channel: str | None = None
    # The call this request belongs to (the dialplan sends ${CHANNEL(linkedid)}), when it is
    # not this channel's own uniqueid: requests made on different legs of one call (an
    # agent's *2 on the member's leg, the end stop on the customer's channel) then name the
    # same call, so that the call's own stop cancels what it still has queued by extension.
    call: str | None = None


def _pairs_to_dict(pairs: Iterable[tuple[str, str]], source: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in pairs:
        if key not in KNOWN_KEYS:
            known = ", ".join(sorted(KNOWN_KEYS))
            raise Rejected(f"unknown parameter {key!r} in {source} (known: {known})")
        if key in found:
            raise Rejected(f"parameter {key!r} given twice in {source}")
        if value:  # agent=${UNSET}: fall back to the defaults, as for an empty argument
            found[key] = value
    return found


def _split_arguments(arguments: Iterable[str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for argument in arguments:
        if not argument:
            continue  # an unset ${VAR} in the dialplan: fall back to the defaults
        key, sep, value = argument.partition("=")
        pairs.append((key.strip(), value) if sep else ("agent", argument))
    return pairs


def _check_text(name: str, value: str, limit: int) -> str:
    if not value:
        raise Rejected(f"{name} is empty")
    if len(value) > limit:
        raise Rejected(f"{name} is longer than {limit} characters")
    if _CONTROL_RE.search(value) is not None:
        raise Rejected(f"{name} contains control characters")
    return value


def parse_parameters(environment: Environment) -> CallParameters:
    """Merge the query string and the arguments (arguments win) and check every value."""
    # Most dialplans pass arguments, not a query string: no pass over an empty one.
    merged = _pairs_to_dict(environment.query, "the AGI URL query") if environment.query else {}
    merged.update(_pairs_to_dict(_split_arguments(environment.arguments), "the AGI arguments"))
    return _checked(merged)


def parameters_from(pairs: Iterable[tuple[str, str]], source: str) -> CallParameters:
    """Parameters given as ``(key, value)`` pairs elsewhere than in a call (``agi-bridge
    send``), checked as a call's are; ``source`` says where, for the reason."""
    return _checked(_pairs_to_dict(pairs, source))


def _checked(merged: Mapping[str, str]) -> CallParameters:
    by = merged.get("by")
    if by is not None and by not in get_args(By):
        raise Rejected(f"by={by!r} is not one of uniqueid, extension, id")
    mode = merged.get("mode")
    if mode is not None and mode not in get_args(Mode):
        raise Rejected(f"mode={mode!r} is not one of sync, async")
    checked = {
        key: _check_text(key, value, _TEXT_LIMITS[key])
        for key, value in merged.items()
        if key in _TEXT_LIMITS
    }
    return CallParameters(
        by=by,  # type: ignore[arg-type]  # checked against By above
        mode=mode,  # type: ignore[arg-type]  # checked against Mode above
        **checked,
    )


def extension_from_channel(channel: str) -> str | None:
    """The endpoint part of a channel name, as NoojeeContact calls an extension.

    ``PJSIP/410-00000001`` -> ``410``; ``SIP/alice-0000002a`` -> ``alice``;
    ``IAX2/410-1234`` -> ``410``; ``DAHDI/i1/5551234-1a`` -> ``5551234``;
    ``Local/410@from-internal-00000002;1`` -> ``410``. The suffix after the last ``-`` is
    opaque (its format differs per driver and version), and endpoint names may contain ``-``.
    An IAX2 caller without a peer (``IAX2/10.0.0.1:4569-123``) has no extension: None.
    """
    technology, slash, rest = channel.partition("/")
    if not slash or not technology or not rest:
        return None
    if technology.lower() == "local":
        exten, at, _ = rest.partition("@")
        return (exten or None) if at else None
    endpoint, dash, _suffix = rest.rpartition("-")
    if not dash:
        return None
    endpoint = endpoint.rsplit("/", 1)[-1]  # DAHDI/i<span>/<number>-<n>
    # "10.0.0.1:4569" (IAX2 <ip:port>) is an address, not an extension NoojeeContact could
    # know. No endpoint name contains ":".
    if ":" in endpoint:
        return None
    return endpoint or None


def build_request(
    action: Action,
    environment: Environment,
    parameters: CallParameters,
    call_defaults: CallDefaults,
) -> RecordingRequest:
    """The NoojeeContact request for this call, or :class:`Rejected` saying what is missing."""
    by: By = parameters.by or ("id" if parameters.id is not None else call_defaults.default_by)
    channel = parameters.channel or environment.channel
    # The extension names the target (by=extension) or looks the agent up in ``agents``; a
    # call naming its target some other way and its agent itself needs none.
    needed = by == "extension" or parameters.channel is not None or not parameters.agent
    extension = extension_from_channel(channel) if needed else None
    if parameters.channel is not None and extension is None:
        raise Rejected(
            f"channel={channel!r} has no extension in it: name the phone's channel, "
            "e.g. ${AGENT(1001:fullchannel)} (PJSIP/410-0000000c)"
        )
    if by == "id":
        if parameters.id is None:
            raise Rejected("by=id needs id=<identifier>, e.g. id=${CHANNEL(linkedid)}")
        target = parameters.id
    elif parameters.id is not None:
        raise Rejected(f"id= is only used with by=id (this call has by={by})")
    elif by == "uniqueid":
        target = _check_text("agi_uniqueid", environment.uniqueid, MAX_IDENTIFIER_LENGTH)
    else:
        if extension is None:
            raise Rejected(f"no extension in channel {channel!r}: use by=uniqueid or by=id")
        # Checked like a uniqueid: agi_channel is as unchecked as agi_uniqueid.
        target = _check_text("extension", extension, MAX_IDENTIFIER_LENGTH)
    return request_for(action, target, extension, parameters, call_defaults, target_kind(by))


def request_for(
    action: Action,
    target: str,
    extension: str | None,
    parameters: CallParameters,
    call_defaults: CallDefaults,
    kind: TargetKind,
) -> RecordingRequest:
    """The request for ``target`` (checked): what every request goes through, from a call or
    from ``agi-bridge send``. ``extension`` looks the agent up in ``agents`` (None: no lookup).
    """
    rules = ACTIONS[action]
    if parameters.tag is not None and not rules.takes_tag:
        tagged = ", ".join(other.route for other in ACTIONS.values() if other.takes_tag)
        raise Rejected(f"tag is only accepted by {tagged}")
    # ``or None``: an empty default_agent (AGI_BRIDGE_DEFAULT_AGENT=) or agents value is no
    # agent, so a stop without one is REJECTED rather than sent without agentLoginName.
    agent = (
        parameters.agent
        or _agent_for(extension, call_defaults.agents)
        or call_defaults.default_agent
    ) or None
    if agent is None and rules.needs_agent:
        raise Rejected(
            f"{action} needs an agent: pass agent=<login>, or set agents / default_agent"
        )
    return RecordingRequest(
        action=action, target=target, agent=agent, tag=parameters.tag, kind=kind
    )


def _agent_for(extension: str | None, agents: Mapping[str, str]) -> str | None:
    return agents.get(extension) if extension is not None else None
