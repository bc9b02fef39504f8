"""A FastAGI client that speaks like Asterisk 22 (see the captures in the reference), for trying
the bridge without a PBX (``agi-bridge fake-call``), for the tests and for the benchmark.

It sends the environment block exactly as ``res_agi.c`` builds it, answers every command the
way a live (or, after ``hangup``, a dead) channel does, records the variables set, and, like
Asterisk, writes a last ``HANGUP`` line when the server closes, unless ``AGISIGHUP=no``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from agi_bridge.testing.defaults import DEFAULT_CHANNEL, DEFAULT_UNIQUEID

ASTERISK_VERSION: Final = "22.10.1+dfsg+~cs6.17.60671434-1"
# Asterisk's own connect timeout for FastAGI (res_agi.c): a server slower to accept fails.
CONNECT_TIMEOUT: Final = 2.0


@dataclass(frozen=True, slots=True)
class Call:
    """What Asterisk knows about the channel running ``AGI(...)``."""

    script: str = "recording/stop"
    arguments: Sequence[str] = ()
    channel: str = DEFAULT_CHANNEL
    uniqueid: str = DEFAULT_UNIQUEID
    callerid: str = "410"
    calleridname: bytes = b"Fred Agent"  # raw bytes: Asterisk sends no charset
    context: str = "agents"
    extension: str = "s"
    priority: int = 2
    host: str = "127.0.0.1"
    port: int = 4573


def environment_block(call: Call) -> bytes:
    """The bytes Asterisk sends first, in its order, bare ``\\n``, then one empty line."""
    request = (
        f"agi://{call.host}:{call.port}/{call.script}"
        if call.script
        else (f"agi://{call.host}:{call.port}")
    )
    technology = call.channel.split("/", 1)[0]
    lines: list[bytes] = [b"agi_network: yes"]
    if call.script:
        lines.append(b"agi_network_script: " + call.script.encode())
    for name, value in (
        ("agi_request", request),
        ("agi_channel", call.channel),
        ("agi_language", "en"),
        ("agi_type", technology),
        ("agi_uniqueid", call.uniqueid),
        ("agi_version", ASTERISK_VERSION),
        ("agi_callerid", call.callerid),
    ):
        lines.append(f"{name}: {value}".encode())
    lines.append(b"agi_calleridname: " + call.calleridname)
    for name, value in (
        ("agi_callingpres", "0"),
        ("agi_callingani2", "0"),
        ("agi_callington", "0"),
        ("agi_callingtns", "0"),
        ("agi_dnid", "unknown"),
        ("agi_rdnis", "unknown"),
        ("agi_context", call.context),
        ("agi_extension", call.extension),
        ("agi_priority", str(call.priority)),
        ("agi_enhanced", "0.0"),
        ("agi_accountcode", ""),
        ("agi_threadid", "139643354601152"),
    ):
        lines.append(f"{name}: {value}".encode())
    lines.extend(f"agi_arg_{n}: {arg}".encode() for n, arg in enumerate(call.arguments, 1))
    return b"\n".join(lines) + b"\n\n"


def _unquote(text: str) -> str:
    r"""Undo our quoting the way Asterisk's parse_args does: ``"a \"b\""`` -> ``a "b"``."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    out: list[str] = []
    escaped = False
    for ch in text:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)


def separate_args(text: str) -> list[str]:
    """What Asterisk's __ast_app_separate_args(text, ',', remove_chars=1) (main/app.c) makes of
    ``text``, as ARRAY() splits its value: at commas outside double quotes, parentheses and
    brackets (which stay); double quotes dropped; the character after a backslash taken
    literally; a trailing comma gives a last empty argument, an empty text none."""
    args: list[str] = []
    current: list[str] = []
    paren = bracket = 0
    quote = False
    chars = iter(text)
    for ch in chars:
        if ch == '"':
            quote = not quote
            continue
        if ch == "\\":
            current.append(next(chars, ""))
            continue
        if ch == "," and not (paren or bracket or quote):
            args.append("".join(current))
            current = []
            continue
        if ch in "()":
            paren = paren + 1 if ch == "(" else max(0, paren - 1)
        elif ch in "[]":
            bracket = bracket + 1 if ch == "[" else max(0, bracket - 1)
        current.append(ch)
    if text:
        args.append("".join(current))
    return args


def written_variables(name: str, value: str) -> dict[str, str]:
    """The channel variables ``SET VARIABLE name value`` writes (both unquoted): ``name``, or
    for ``ARRAY(a,b,...)`` each of its names, given its value in order ("" past the last)."""
    if not (name.startswith("ARRAY(") and name.endswith(")")):
        return {name: value}
    values = separate_args(value)
    return {
        each: values[i] if i < len(values) else ""
        for i, each in enumerate(separate_args(name[len("ARRAY(") : -1]))
    }


@dataclass(slots=True)
class SessionResult:
    variables: dict[str, str] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    hold: float = 0.0  # connect to server close, what the dialplan waits
    agistatus: str = "SUCCESS"
    # Why AGISTATUS is FAILURE, for a person (Asterisk itself only logs "FastAGI failed").
    reason: str = ""


async def run_call(
    call: Call,
    *,
    hangup_before_commands: bool = False,
    sighup: bool = True,
    deadline: float = 30.0,
) -> SessionResult:
    """One AGI session against ``call.host:call.port``; returns what the dialplan would see.

    ``hangup_before_commands``: the caller hangs up while the server works: a ``HANGUP`` line
    is sent right after the environment, as Asterisk does, and commands get dead-channel answers.
    """
    result = SessionResult()
    started = time.perf_counter()
    where = f"[{call.host}]:{call.port}" if ":" in call.host else f"{call.host}:{call.port}"
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(call.host, call.port)
    except TimeoutError:
        result.agistatus = "FAILURE"  # Asterisk: "FastAGI failed", the dialplan continues
        result.reason = f"no connection to {where} within {CONNECT_TIMEOUT:g} s"
        return result
    except ConnectionRefusedError:
        result.agistatus = "FAILURE"
        result.reason = f"connection refused at {where}: is the bridge running, on that port?"
        return result
    except OSError as exc:
        result.agistatus = "FAILURE"
        result.reason = f"cannot connect to {where}: {exc.strerror or exc}"
        return result
    try:
        writer.write(environment_block(call) + (b"HANGUP\n" if hangup_before_commands else b""))
        async with asyncio.timeout(deadline):
            while line := await reader.readline():
                text = line.decode("utf-8", "replace").rstrip("\n")
                if text.startswith("failure"):
                    result.agistatus = "FAILURE"
                    result.reason = (
                        f"the bridge at {where} refused the session (it answered 'failure'): "
                        "not in allow_clients, too many sessions, or shutting down; its log "
                        "says which (agi.connection.refused)"
                    )
                    break
                result.commands.append(text)
                writer.write(_answer(text, result))
    except ConnectionError as exc:
        result.agistatus = "FAILURE"
        result.reason = f"the connection to {where} broke: {exc.strerror or exc}"
    except TimeoutError:
        result.agistatus = "FAILURE"
        result.reason = f"the session with {where} did not end within {deadline:g} s"
    finally:
        result.hold = time.perf_counter() - started
        if sighup and result.agistatus == "SUCCESS":
            with contextlib.suppress(OSError):
                writer.write(b"HANGUP\n")
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if hangup_before_commands and result.agistatus == "SUCCESS":
        result.agistatus = "HANGUP"
    return result


def _answer(command: str, result: SessionResult) -> bytes:
    verb = command.upper()
    if verb.startswith("SET VARIABLE "):
        rest = command[len("SET VARIABLE ") :]
        name, _, value = rest.partition(" ")
        result.variables.update(written_variables(_unquote(name), _unquote(value)))
        return b"200 result=1\n"
    if verb.startswith(("GET VARIABLE ", "GET FULL VARIABLE ")):
        return b"200 result=0\n"
    if verb.startswith(("NOOP", "VERBOSE")):
        return b"200 result=0\n"
    return b"510 Invalid or unknown command\n"
