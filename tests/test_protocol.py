"""Tests for the I/O-free FastAGI protocol core: bytes in, events out."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agi_bridge.protocol import (
    MAX_ARGUMENTS,
    MAX_COMMAND_BYTES,
    MAX_COMMAND_WORDS,
    MAX_ENVIRONMENT_BYTES,
    MAX_LINE_BYTES,
    MAX_REPLY_LINES,
    NEED_DATA,
    AgiConnection,
    EndOfStream,
    Environment,
    Event,
    Hangup,
    LocalProtocolError,
    NeedData,
    ProtocolError,
    RemoteProtocolError,
    Reply,
    encode_command,
)
from agi_bridge.testing.fake_asterisk import written_variables

# Captured on Asterisk 22.10.1: AGI(agi://127.0.0.1:4573/recording/stop,arg1,arg 2).
# Note "agi_accountcode: " with its trailing space.
CAPTURE_ENVIRONMENT = (
    b"agi_network: yes\n"
    b"agi_network_script: recording/stop\n"
    b"agi_request: agi://127.0.0.1:4573/recording/stop\n"
    b"agi_channel: Local/s@test-00000000;2\n"
    b"agi_language: en\n"
    b"agi_type: Local\n"
    b"agi_uniqueid: 1795811316.1\n"
    b"agi_version: 22.10.1+dfsg+~cs6.17.60671434-1\n"
    b"agi_callerid: unknown\n"
    b"agi_calleridname: unknown\n"
    b"agi_callingpres: 67\n"
    b"agi_callingani2: 0\n"
    b"agi_callington: 0\n"
    b"agi_callingtns: 0\n"
    b"agi_dnid: unknown\n"
    b"agi_rdnis: unknown\n"
    b"agi_context: test\n"
    b"agi_extension: s\n"
    b"agi_priority: 2\n"
    b"agi_enhanced: 0.0\n"
    b"agi_accountcode: \n"
    b"agi_threadid: 139643354601152\n"
    b"agi_arg_1: arg1\n"
    b"agi_arg_2: arg 2\n"
    b"\n"
)

CAPTURE_VARIABLES = {
    "agi_network": "yes",
    "agi_network_script": "recording/stop",
    "agi_request": "agi://127.0.0.1:4573/recording/stop",
    "agi_channel": "Local/s@test-00000000;2",
    "agi_language": "en",
    "agi_type": "Local",
    "agi_uniqueid": "1795811316.1",
    "agi_version": "22.10.1+dfsg+~cs6.17.60671434-1",
    "agi_callerid": "unknown",
    "agi_calleridname": "unknown",
    "agi_callingpres": "67",
    "agi_callingani2": "0",
    "agi_callington": "0",
    "agi_callingtns": "0",
    "agi_dnid": "unknown",
    "agi_rdnis": "unknown",
    "agi_context": "test",
    "agi_extension": "s",
    "agi_priority": "2",
    "agi_enhanced": "0.0",
    "agi_accountcode": "",
    "agi_threadid": "139643354601152",
    "agi_arg_1": "arg1",
    "agi_arg_2": "arg 2",
}


# ------------------------------------------------------------------------------ helpers


def env_block(*lines: bytes) -> bytes:
    """An environment block made of ``lines`` and the closing empty line."""
    return b"".join(line + b"\n" for line in lines) + b"\n"


def minimal_env(*extra: bytes) -> bytes:
    """A small valid environment block with ``extra`` lines appended."""
    return env_block(b"agi_network: yes", b"agi_uniqueid: 1795811316.1", *extra)


def events_of(conn: AgiConnection) -> list[Event]:
    """Every event available now, stopping at NEED_DATA or EndOfStream."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            return events
        events.append(event)
        if isinstance(event, EndOfStream):
            return events


def environment_of(data: bytes, conn: AgiConnection | None = None) -> Environment:
    """Feed ``data`` and return the Environment event it must produce."""
    conn = conn or AgiConnection()
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, Environment)
    return event


def ready(*extra_env: bytes, **limits: int) -> AgiConnection:
    """A connection whose environment has been received."""
    conn = AgiConnection(**limits)
    environment_of(minimal_env(*extra_env), conn)
    return conn


def reply_to(conn: AgiConnection, data: bytes, *command: str) -> Reply:
    """Send ``command`` (NOOP by default), feed ``data`` and return the Reply it makes."""
    conn.send_command(*(command or ("NOOP",)))
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, Reply)
    return event


def remote_error(conn: AgiConnection) -> str:
    """Run next_event expecting a RemoteProtocolError; return its reason."""
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    return info.value.reason


def parse_args(line: str) -> list[str]:
    """A Python port of parse_args() from Asterisk's res_agi.c, to check our quoting."""
    argv: list[str] = []
    current: list[str] | None = None
    quoted = escaped = False
    whitespace = True
    for char in line:
        if char == '"' and not escaped:
            quoted = not quoted
            if quoted and whitespace:
                current = []
                argv.append("")
                whitespace = False
            escaped = False
            continue
        if char in " \t" and not quoted and not escaped:
            if current is not None:
                argv[-1] = "".join(current)
            current = None
            whitespace = True
            continue
        if char == "\\" and not escaped:
            escaped = True
            continue
        if whitespace:
            current = []
            argv.append("")
            whitespace = False
        assert current is not None
        current.append(char)
        escaped = False
    if current is not None:
        argv[-1] = "".join(current)
    return argv


# ------------------------------------------------------------------------- environment


def test_capture_fed_at_once() -> None:
    """The real Asterisk 22.10.1 environment parses into every variable, argument and path."""
    env = environment_of(CAPTURE_ENVIRONMENT)
    assert dict(env.variables) == CAPTURE_VARIABLES
    assert env.arguments == ("arg1", "arg 2")
    assert env.script == "recording/stop"
    assert env.raw_script == "recording/stop"
    assert env.query == ()
    assert env.uniqueid == "1795811316.1"
    assert env.channel == "Local/s@test-00000000;2"
    assert env.request == "agi://127.0.0.1:4573/recording/stop"
    assert (env.context, env.extension, env.priority) == ("test", "s", "2")


def test_capture_fed_one_byte_at_a_time() -> None:
    """Byte-by-byte feeding gives NEED_DATA until the last byte, then the same Environment."""
    conn = AgiConnection()
    for byte in CAPTURE_ENVIRONMENT[:-1]:
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is NEED_DATA
    conn.receive_data(CAPTURE_ENVIRONMENT[-1:])
    event = conn.next_event()
    assert event == environment_of(CAPTURE_ENVIRONMENT)
    assert conn.environment == event
    assert conn.next_event() is NEED_DATA


def test_environment_variables_are_read_only() -> None:
    """The variables mapping of the event cannot be changed by a consumer."""
    env = environment_of(CAPTURE_ENVIRONMENT)
    with pytest.raises(TypeError):
        env.variables["agi_uniqueid"] = "forged"  # type: ignore[index]


def test_capture_session_replies() -> None:
    """The captured command/reply exchange, ended by HANGUP after the half-close and EOF."""
    conn = AgiConnection()
    environment_of(CAPTURE_ENVIRONMENT, conn)

    assert conn.send_command("GET VARIABLE", "CHANNEL") == b'GET VARIABLE "CHANNEL"\n'
    assert conn.awaiting_reply
    conn.receive_data(b"200 result=1 (Local/s@test-00000000;2)\n")
    assert conn.next_event() == Reply(
        code=200,
        result="1",
        data="Local/s@test-00000000;2",
        extra="",
        lines=("200 result=1 (Local/s@test-00000000;2)",),
    )
    assert not conn.awaiting_reply

    reply = reply_to(conn, b"200 result=0\n", "GET VARIABLE", "LINKEDID")
    assert (reply.ok, reply.result, reply.data, reply.extra) == (True, "0", None, "")

    assert conn.set_variable("FOO", "bar") == b'SET VARIABLE "FOO" "bar"\n'
    conn.receive_data(b"200 result=1\n")
    reply = conn.next_event()
    assert isinstance(reply, Reply)
    assert (reply.code, reply.result) == (200, "1")
    reply = reply_to(conn, b"200 result=1\n", "VERBOSE", "hello", "1")
    assert reply.result == "1"
    reply = reply_to(conn, b"200 result=0\n", "NOOP")
    assert reply.result == "0"

    conn.receive_data(b"HANGUP\n")
    assert conn.next_event() == Hangup()
    conn.receive_data(b"")
    assert conn.next_event() == EndOfStream()


def test_h_extension_variant() -> None:
    """In the h extension the same block arrives with extension h and priority 1."""
    data = CAPTURE_ENVIRONMENT.replace(b"agi_extension: s\n", b"agi_extension: h\n").replace(
        b"agi_priority: 2\n", b"agi_priority: 1\n"
    )
    env = environment_of(data)
    assert (env.extension, env.priority, env.context) == ("h", "1", "test")
    conn = AgiConnection()
    environment_of(data, conn)
    assert reply_to(conn, b"200 result=1\n", "SET VARIABLE", "FOO", "bar").ok


def test_query_is_split_off_and_decoded() -> None:
    """The ?query part is removed from script and parsed into percent-decoded pairs."""
    env = environment_of(
        minimal_env(
            b"agi_network_script: recording/stop?by=extension&agent=Fred%20Smith&flag",
            b"agi_request: agi://127.0.0.1/recording/stop?by=extension&agent=Fred%20Smith&flag",
        )
    )
    assert env.script == "recording/stop"
    assert env.raw_script == "recording/stop?by=extension&agent=Fred%20Smith&flag"
    assert env.query == (("by", "extension"), ("agent", "Fred Smith"), ("flag", ""))


def test_empty_query_after_question_mark() -> None:
    """A bare trailing '?' leaves the script intact and no query pairs."""
    env = environment_of(minimal_env(b"agi_network_script: recording/start?"))
    assert (env.script, env.query) == ("recording/start", ())


def test_absent_network_script() -> None:
    """agi://host with no path: no agi_network_script, so script and query are empty."""
    env = environment_of(minimal_env(b"agi_request: agi://127.0.0.1"))
    assert (env.script, env.raw_script, env.query) == ("", "", ())
    assert env.extension == ""


def test_non_utf8_caller_name_loses_only_the_bad_byte() -> None:
    """A caller name cut inside a UTF-8 sequence decodes with U+FFFD, nothing else lost."""
    env = environment_of(
        minimal_env(b"agi_calleridname: Jos\xc3", b"agi_callerid: 410", b"agi_arg_1: \xffx")
    )
    assert env.variables["agi_calleridname"] == "Jos\ufffd"
    assert env.variables["agi_callerid"] == "410"
    assert env.arguments == ("\ufffdx",)


def test_utf8_values_decode() -> None:
    """Well-formed UTF-8 values come through as text."""
    env = environment_of(minimal_env("agi_calleridname: José Müller".encode()))
    assert env.variables["agi_calleridname"] == "José Müller"


def test_values_with_colons_split_on_first_separator() -> None:
    """Only the first ': ' separates name from value; colons in values are kept."""
    env = environment_of(
        minimal_env(
            b"agi_channel: IAX2/10.0.0.1:4569-1",
            b"agi_request: agi://10.0.0.2:4573/recording/stop",
            b"agi_arg_1: a: b: c",
        )
    )
    assert env.channel == "IAX2/10.0.0.1:4569-1"
    assert env.request == "agi://10.0.0.2:4573/recording/stop"
    assert env.arguments == ("a: b: c",)


def test_empty_values() -> None:
    """'name: ' and a trimmed 'name:' both mean an empty value; empty arguments are kept."""
    env = environment_of(
        minimal_env(b"agi_accountcode: ", b"agi_dnid:", b"agi_arg_1: x", b"agi_arg_2: ")
    )
    assert env.variables["agi_accountcode"] == ""
    assert env.variables["agi_dnid"] == ""
    assert env.arguments == ("x", "")


def test_crlf_line_ends_accepted() -> None:
    """A trailing '\\r' before '\\n' is stripped from environment and reply lines."""
    conn = AgiConnection()
    env = environment_of(CAPTURE_ENVIRONMENT.replace(b"\n", b"\r\n"), conn)
    assert dict(env.variables) == CAPTURE_VARIABLES
    assert reply_to(conn, b"200 result=1 (x)\r\n").data == "x"
    conn.receive_data(b"HANGUP\r\n")
    assert conn.next_event() == Hangup()


def test_twelve_arguments_sort_numerically() -> None:
    """agi_arg_1..12 come out in numeric order, even when sent out of order."""
    order = [1, 10, 11, 12, 2, 3, 4, 5, 6, 7, 8, 9]
    env = environment_of(minimal_env(*(b"agi_arg_%d: v%d" % (n, n) for n in order)))
    assert env.arguments == tuple(f"v{n}" for n in range(1, 13))


def test_no_arguments() -> None:
    """An environment without agi_arg_N lines has an empty argument tuple."""
    assert environment_of(minimal_env()).arguments == ()


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ((b"agi_arg_1: a", b"agi_arg_3: c"), "gap in agi_arg_N numbering"),
        ((b"agi_arg_2: b",), "gap in agi_arg_N numbering"),
        ((b"agi_arg_1: a", b"agi_arg_1: b"), "duplicate environment variable"),
        ((b"agi_channel: a", b"agi_channel: b"), "duplicate environment variable"),
        ((b"agi_arg_0: a",), "bad argument name"),
        ((b"agi_arg_01: a",), "bad argument name"),
        ((b"agi_arg_x: a",), "bad argument name"),
        ((b"agi_arg_: a",), "bad argument name"),
        ((b"no colon here",), 'environment line is not "name: value"'),
        ((b"agi_channel:PJSIP/1",), 'environment line is not "name: value"'),
        ((b": value",), "bad environment variable name"),
        ((b"GET /x HTTP/1.1: y",), "bad environment variable name"),
    ],
)
def test_bad_environment_is_refused(lines: tuple[bytes, ...], reason: str) -> None:
    """Malformed lines, duplicates and agi_arg_N gaps are remote protocol errors."""
    conn = AgiConnection()
    conn.receive_data(minimal_env(*lines))
    assert remote_error(conn) == reason


def test_http_request_is_refused() -> None:
    """A stray HTTP client is refused on its request line."""
    conn = AgiConnection()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert remote_error(conn) == 'environment line is not "name: value"'


def test_empty_environment_is_refused() -> None:
    """A block with no variables at all is not Asterisk."""
    conn = AgiConnection()
    conn.receive_data(b"\n")
    assert remote_error(conn) == "empty environment"


def test_environment_is_emitted_once_then_lines_are_replies() -> None:
    """After the environment, a 'name: value' line is not a second environment but garbage."""
    conn = ready()
    conn.receive_data(b"agi_network: yes\n")
    assert remote_error(conn) == "malformed reply line"


# ------------------------------------------------------------------------------ limits


def test_limit_constants() -> None:
    """The named limits have the values their comments justify."""
    assert MAX_LINE_BYTES == 8192
    assert MAX_ENVIRONMENT_BYTES == 65536
    assert MAX_ARGUMENTS == 128
    assert MAX_REPLY_LINES == 256
    assert MAX_COMMAND_BYTES == 2047
    assert MAX_COMMAND_WORDS == 127


def test_line_at_limit_is_accepted() -> None:
    """An environment line of exactly MAX_LINE_BYTES bytes (before '\\n') is fine."""
    line = b"agi_arg_1: " + b"x" * (MAX_LINE_BYTES - len(b"agi_arg_1: "))
    assert len(line) == MAX_LINE_BYTES
    env = environment_of(minimal_env(line))
    assert len(env.arguments[0]) == MAX_LINE_BYTES - len(b"agi_arg_1: ")


def test_line_over_limit_with_newline_is_refused() -> None:
    """A complete line one byte over MAX_LINE_BYTES is refused."""
    line = b"agi_arg_1: " + b"x" * (MAX_LINE_BYTES + 1 - len(b"agi_arg_1: "))
    conn = AgiConnection()
    conn.receive_data(minimal_env(line))
    assert remote_error(conn) == f"line exceeds {MAX_LINE_BYTES} bytes"


def test_line_over_limit_fails_before_any_newline() -> None:
    """Without a newline, the buffer is refused as soon as it passes MAX_LINE_BYTES."""
    conn = AgiConnection()
    conn.receive_data(b"x" * MAX_LINE_BYTES)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"x")
    assert remote_error(conn) == f"line exceeds {MAX_LINE_BYTES} bytes"


OVERLONG_AGENT = b"agi_arg_1: " + b"x" * 10_000  # a 10 kB dialplan argument


@pytest.mark.parametrize("chunk", [None, 1000, 8192, 8193])
def test_cut_overlong_lines_drops_the_value_and_names_the_line(chunk: int | None) -> None:
    """With cut_overlong_lines, a 10 kB argument however chunked: the environment still
    arrives whole, that argument empty and named in ``overlong``, the other lines intact, and
    the session can go on (commands are accepted)."""
    data = minimal_env(OVERLONG_AGENT, b"agi_arg_2: by=uniqueid", b"agi_channel: PJSIP/410-1")
    conn = AgiConnection(cut_overlong_lines=True)
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    events: list[Event] = []
    for piece in pieces:
        conn.receive_data(piece)
        events += events_of(conn)
    [env] = events
    assert isinstance(env, Environment)
    assert env.overlong == ("agi_arg_1",)
    assert env.arguments == ("", "by=uniqueid")
    assert env.channel == "PJSIP/410-1"
    assert conn.buffered == 0
    assert conn.set_variable("NOOJEE_STATUS", "REJECTED").startswith(b"SET VARIABLE")


def test_cut_overlong_lines_is_off_by_default_and_keeps_every_other_limit() -> None:
    """An overlong line that is not ``name: value``, or that takes the environment past
    MAX_ENVIRONMENT_BYTES, is still refused when cutting; no environment is ever overlong by
    default."""
    conn = AgiConnection(cut_overlong_lines=True)
    conn.receive_data(b"x" * (MAX_LINE_BYTES + 1))
    assert remote_error(conn) == 'environment line is not "name: value"'
    conn = AgiConnection(cut_overlong_lines=True)
    conn.receive_data(b"agi_arg_1: " + b"x" * MAX_ENVIRONMENT_BYTES)
    assert remote_error(conn) == f"environment exceeds {MAX_ENVIRONMENT_BYTES} bytes"
    assert environment_of(minimal_env()).overlong == ()


def test_reply_line_over_limit_fails_before_any_newline() -> None:
    """The line limit applies to replies too, with no newline needed to trip it."""
    conn = ready(max_line_bytes=64)
    conn.send_command("NOOP")
    conn.receive_data(b"200 result=1 (" + b"x" * 50)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"x" * 20)
    assert remote_error(conn) == "line exceeds 64 bytes"


def _environment_of_size(size: int) -> bytes:
    """A valid environment block of exactly ``size`` bytes, closing empty line included."""
    head = b"agi_network: yes\n"
    lines = [head]
    remaining = size - len(head) - 1  # the closing "\n"
    number = 1
    while remaining > 0:
        prefix = b"agi_arg_%d: " % number
        body = min(remaining - len(prefix) - 1, 4000)
        if body < 0:
            raise AssertionError("size not reachable")
        lines.append(prefix + b"y" * body + b"\n")
        remaining -= len(prefix) + body + 1
        number += 1
    data = b"".join(lines) + b"\n"
    assert len(data) == size
    return data


def test_environment_at_limit_is_accepted() -> None:
    """An environment of exactly MAX_ENVIRONMENT_BYTES bytes is fine."""
    env = environment_of(_environment_of_size(MAX_ENVIRONMENT_BYTES))
    assert len(env.arguments) > 1


def test_environment_over_limit_is_refused() -> None:
    """An environment one byte over MAX_ENVIRONMENT_BYTES is refused."""
    conn = AgiConnection()
    conn.receive_data(_environment_of_size(MAX_ENVIRONMENT_BYTES + 1))
    assert remote_error(conn) == f"environment exceeds {MAX_ENVIRONMENT_BYTES} bytes"


def test_small_environment_over_a_lower_limit_in_one_read_is_refused() -> None:
    """A whole block in one read, shorter than a line may be, still obeys a lower environment
    limit (the one-read parse checks it too), and one of exactly that size passes."""
    conn = AgiConnection(max_environment_bytes=200)
    conn.receive_data(_environment_of_size(201))
    assert remote_error(conn) == "environment exceeds 200 bytes"
    conn = AgiConnection(max_environment_bytes=200)
    conn.receive_data(_environment_of_size(200))
    assert isinstance(conn.next_event(), Environment)


def test_environment_over_limit_fails_inside_a_partial_line() -> None:
    """The environment limit trips on a partial line, without waiting for its newline."""
    conn = AgiConnection(max_environment_bytes=100)
    conn.receive_data(b"agi_network: yes\n")  # 17 bytes
    conn.receive_data(b"agi_arg_1: " + b"z" * 72)  # 83 more: exactly 100
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"z")
    assert remote_error(conn) == "environment exceeds 100 bytes"


def test_environment_limit_ignores_bytes_after_the_block() -> None:
    """Replies buffered right after the environment do not count against its limit."""
    data = _environment_of_size(200)
    conn = AgiConnection(max_environment_bytes=200)
    conn.receive_data(data + b"HANGUP\n" * 100)
    assert isinstance(conn.next_event(), Environment)
    assert conn.next_event() == Hangup()


def test_arguments_at_limit_are_accepted() -> None:
    """Exactly MAX_ARGUMENTS agi_arg_N lines are fine."""
    lines = [b"agi_arg_%d: %d" % (n, n) for n in range(1, MAX_ARGUMENTS + 1)]
    env = environment_of(minimal_env(*lines))
    assert len(env.arguments) == MAX_ARGUMENTS
    assert env.arguments[-1] == str(MAX_ARGUMENTS)


def test_arguments_over_limit_are_refused() -> None:
    """agi_arg_(MAX_ARGUMENTS + 1) is refused as soon as it is read."""
    lines = [b"agi_arg_%d: %d" % (n, n) for n in range(1, MAX_ARGUMENTS + 2)]
    conn = AgiConnection()
    conn.receive_data(b"".join(line + b"\n" for line in lines))  # no closing line yet
    assert remote_error(conn) == f"more than {MAX_ARGUMENTS} arguments"


def _multiline(total_lines: int) -> bytes:
    """A multi-line 520 reply of ``total_lines`` lines, both ends included."""
    body = b"".join(b" usage line %d\n" % n for n in range(total_lines - 2))
    return (
        b"520-Invalid command syntax.  Proper usage follows:\n"
        + body
        + (b"520 End of proper usage.\n")
    )


def test_multiline_reply_at_limit_is_accepted() -> None:
    """A multi-line reply of exactly MAX_REPLY_LINES lines is fine."""
    reply = reply_to(ready(), _multiline(MAX_REPLY_LINES))
    assert len(reply.lines) == MAX_REPLY_LINES


def test_multiline_reply_over_limit_is_refused() -> None:
    """A multi-line reply one line over MAX_REPLY_LINES is refused."""
    conn = ready()
    conn.send_command("NOOP")
    conn.receive_data(_multiline(MAX_REPLY_LINES + 1))
    assert remote_error(conn) == f"multi-line reply exceeds {MAX_REPLY_LINES} lines"


def test_limits_must_be_positive() -> None:
    """A zero or negative limit is a configuration error."""
    with pytest.raises(ValueError, match="max_line_bytes"):
        AgiConnection(max_line_bytes=0)


# ------------------------------------------------------------------------ end of stream


def test_eof_mid_environment_is_refused() -> None:
    """End of stream after complete lines but before the empty line is an error."""
    conn = AgiConnection()
    conn.receive_data(b"agi_network: yes\nagi_uniqueid: 1.1\n")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert remote_error(conn) == "end of stream before end of environment"


def test_eof_before_anything_is_refused() -> None:
    """A connection closed before sending anything never produced an environment."""
    conn = AgiConnection()
    conn.receive_data(b"")
    assert remote_error(conn) == "end of stream before end of environment"


def test_eof_mid_line_is_refused() -> None:
    """End of stream with a partial line buffered is an error, in any state."""
    conn = AgiConnection()
    conn.receive_data(b"agi_network: y")
    conn.receive_data(b"")
    assert remote_error(conn) == "end of stream before end of line"

    conn = ready()
    conn.receive_data(b"HANG")
    conn.receive_data(b"")
    assert remote_error(conn) == "end of stream before end of line"


def test_clean_eof_after_environment() -> None:
    """End of stream after the environment is EndOfStream, again on every later call."""
    conn = ready()
    conn.receive_data(b"")
    assert conn.next_event() == EndOfStream()
    assert conn.next_event() == EndOfStream()
    conn.receive_data(b"")  # a second EOF is harmless
    assert conn.next_event() == EndOfStream()


def test_eof_while_awaiting_reply() -> None:
    """Asterisk closing instead of answering is EndOfStream; no reply is awaited after it."""
    conn = ready()
    conn.send_command("NOOP")
    conn.receive_data(b"")
    assert conn.next_event() == EndOfStream()
    assert not conn.awaiting_reply
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        conn.send_command("NOOP")


def test_eof_inside_multiline_reply_is_refused() -> None:
    """End of stream between the lines of a multi-line reply is an error."""
    conn = ready()
    conn.send_command("NOOP")
    conn.receive_data(b"520-Invalid command syntax.  Proper usage follows:\n usage\n")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert remote_error(conn) == "end of stream before end of multi-line reply"


def test_data_after_eof_is_a_local_error() -> None:
    """Feeding bytes after b'' is a driver bug."""
    conn = ready()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


def test_connection_stays_dead_after_an_error() -> None:
    """After a RemoteProtocolError every next_event raises it again; input is ignored."""
    conn = AgiConnection()
    conn.receive_data(b"garbage\n")
    reason = remote_error(conn)
    conn.receive_data(CAPTURE_ENVIRONMENT)
    assert remote_error(conn) == reason
    conn.receive_data(b"")
    assert remote_error(conn) == reason
    with pytest.raises(LocalProtocolError):
        conn.send_command("NOOP")


# ----------------------------------------------------------------------------- replies


def test_hangup_before_reply_then_reply() -> None:
    """HANGUP while a reply is awaited is a Hangup event; the reply still follows."""
    conn = ready()
    conn.send_command("GET VARIABLE", "CHANNEL")
    conn.receive_data(b"HANGUP\n200 result=1 (PJSIP/410-00000001)\n")
    assert conn.next_event() == Hangup()
    assert conn.awaiting_reply
    event = conn.next_event()
    assert isinstance(event, Reply)
    assert event.data == "PJSIP/410-00000001"
    assert not conn.awaiting_reply


def test_hangup_between_commands() -> None:
    """HANGUP while no command is pending is a Hangup event, and commands may continue."""
    conn = ready()
    assert reply_to(conn, b"200 result=1\n", "SET VARIABLE", "A", "1").ok
    conn.receive_data(b"HANGUP\n")
    assert conn.next_event() == Hangup()
    assert not conn.awaiting_reply
    # Dead channel: SET VARIABLE still answers 200, ANSWER answers 511.
    assert reply_to(conn, b"200 result=1\n", "SET VARIABLE", "B", "2").ok
    reply = reply_to(
        conn, b"511 Command Not Permitted on a dead channel or intercept routine\n", "ANSWER"
    )
    assert (reply.code, reply.ok, reply.result, reply.data) == (511, False, None, None)
    assert reply.extra == "Command Not Permitted on a dead channel or intercept routine"


def test_hangup_right_after_environment() -> None:
    """HANGUP arriving in the same chunk as the environment is the next event."""
    conn = AgiConnection()
    conn.receive_data(CAPTURE_ENVIRONMENT + b"HANGUP\n")
    assert isinstance(conn.next_event(), Environment)
    assert conn.next_event() == Hangup()
    assert conn.next_event() is NEED_DATA


def test_invalid_command_reply() -> None:
    """510 has no result and keeps its text in extra."""
    reply = reply_to(ready(), b"510 Invalid or unknown command\n", "FROB")
    assert (reply.code, reply.result, reply.data) == (510, None, None)
    assert reply.extra == "Invalid or unknown command"
    assert reply.lines == ("510 Invalid or unknown command",)


def test_single_line_520() -> None:
    """One-line 520 (usage not available) is a plain reply."""
    reply = reply_to(ready(), b"520 Invalid command syntax.  Proper usage not available.\n")
    assert reply.code == 520
    assert reply.extra == "Invalid command syntax.  Proper usage not available."


def test_multiline_520() -> None:
    """The 520- block is one Reply; lines inside may look like replies or HANGUP."""
    data = (
        b"520-Invalid command syntax.  Proper usage follows:\n"
        b" Usage: GET VARIABLE <variablename>\n"
        b"200 result=1 (looks like a reply)\n"
        b"HANGUP\n"
        b"\n"
        b"520-also not the end\n"
        b"520 End of proper usage.\n"
    )
    conn = ready()
    reply = reply_to(conn, data, "GET VARIABLE")
    assert reply.code == 520
    assert not reply.ok
    assert reply.extra == "Invalid command syntax.  Proper usage follows:"
    assert reply.lines == (
        "520-Invalid command syntax.  Proper usage follows:",
        " Usage: GET VARIABLE <variablename>",
        "200 result=1 (looks like a reply)",
        "HANGUP",
        "",
        "520-also not the end",
        "520 End of proper usage.",
    )
    assert not conn.awaiting_reply
    assert conn.next_event() is NEED_DATA


def test_multiline_520_with_glued_terminator() -> None:
    """Usage text without a final newline glues the terminator to its last line; still ends."""
    data = (
        b"520-Invalid command syntax.  Proper usage follows:\n"
        b" Usage: NOOP520 End of proper usage.\n"
    )
    reply = reply_to(ready(), data)
    assert reply.lines[-1] == " Usage: NOOP520 End of proper usage."


def test_multiline_520_fed_one_byte_at_a_time() -> None:
    """A multi-line reply split into single bytes gives the same Reply."""
    conn = ready()
    conn.send_command("NOOP")
    data = _multiline(5)
    for byte in data[:-1]:
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is NEED_DATA
    conn.receive_data(data[-1:])
    event = conn.next_event()
    assert isinstance(event, Reply)
    assert len(event.lines) == 5


def test_provisional_100_trying_is_skipped() -> None:
    """'100 result=0 Trying...' is not the reply; the next line is."""
    conn = ready()
    conn.send_command("GOSUB", "ctx", "s", "1")
    conn.receive_data(b"100 result=0 Trying...\n")
    assert conn.next_event() is NEED_DATA
    assert conn.awaiting_reply
    conn.receive_data(b"200 result=0 Gosub complete\n")
    event = conn.next_event()
    assert isinstance(event, Reply)
    assert (event.code, event.result, event.extra) == (200, "0", "Gosub complete")
    assert event.lines == ("200 result=0 Gosub complete",)


def test_reply_without_pending_command_is_refused() -> None:
    """A reply line while no command is pending is a remote protocol error."""
    conn = ready()
    conn.receive_data(b"200 result=1\n")
    assert remote_error(conn) == "reply received while no command is pending"


def test_provisional_without_pending_command_is_refused() -> None:
    """A 100 line while no command is pending is a remote protocol error."""
    conn = ready()
    conn.receive_data(b"100 result=0 Trying...\n")
    assert remote_error(conn) == "provisional reply received while no command is pending"


def test_second_reply_to_one_command_is_refused() -> None:
    """Two replies for one command: the second one is unsolicited."""
    conn = ready()
    conn.send_command("NOOP")
    conn.receive_data(b"200 result=0\n200 result=0\n")
    assert isinstance(conn.next_event(), Reply)
    assert remote_error(conn) == "reply received while no command is pending"


def test_reply_buffered_before_its_command_is_refused() -> None:
    """A reply line already buffered when the command was sent cannot answer it."""
    conn = ready()
    assert reply_to(conn, b"200 result=1 (x)\n200 result=0\n", "GET VARIABLE", "A").data == "x"
    # The forged second line is still buffered when the next command goes out.
    conn.send_command("SET VARIABLE", "B", "1")
    assert remote_error(conn) == "reply arrived before its command was sent"


def test_hangup_buffered_before_a_command_is_still_a_hangup() -> None:
    """HANGUP buffered before a command is sent is an event, and the real reply follows."""
    conn = ready()
    conn.receive_data(b"HANG")
    conn.send_command("NOOP")
    conn.receive_data(b"UP\n200 result=0\n")
    assert conn.next_event() == Hangup()
    assert isinstance(conn.next_event(), Reply)


@pytest.mark.parametrize(
    "line",
    [b"OK", b"20 result=1", b"2000 result=1", b"200", b"2x0 result=1", b"hangup", b"HANGUP "],
)
def test_malformed_reply_line_is_refused(line: bytes) -> None:
    """A line that is neither HANGUP nor a 3-digit code plus space or dash is refused."""
    conn = ready()
    conn.send_command("NOOP")
    conn.receive_data(line + b"\n")
    assert remote_error(conn) == "malformed reply line"


@pytest.mark.parametrize(
    ("line", "result", "data", "extra"),
    [
        (b"200 result=1 (Local/s@test-00000000;2)", "1", "Local/s@test-00000000;2", ""),
        (b"200 result=0", "0", None, ""),
        (b"200 result=-1", "-1", None, ""),
        (b"200 result=1 ()", "1", "", ""),
        (b"200 result=1 (a (b) c)", "1", "a (b) c", ""),
        (b"200 result=1 (x) endpos=5)", "1", "x) endpos=5", ""),
        (b"200 result=1 (timeout) endpos=1234", "1", "timeout", "endpos=1234"),
        (b"200 result=1 (dtmf) endpos=1234", "1", "dtmf", "endpos=1234"),
        (b"200 result=1 (value with ) paren) endpos=5", "1", "value with ", "paren) endpos=5"),
        (b"200 result=0 endpos=0", "0", None, "endpos=0"),
        (
            b"200 result=1 (speech) endpos=0 results=1 score0=9",
            "1",
            "speech",
            "endpos=0 results=1 score0=9",
        ),
        (b"200 result=", "", None, ""),
        (b"200 something else", None, None, "something else"),
        (b"200 ", None, None, ""),
    ],
)
def test_reply_fields(line: bytes, result: str | None, data: str | None, extra: str) -> None:
    """result, data and extra follow the documented rule (see Reply's docstring)."""
    reply = reply_to(ready(), line + b"\n")
    assert (reply.code, reply.result, reply.data, reply.extra) == (200, result, data, extra)
    assert reply.lines == (line.decode(),)


def test_unterminated_data_is_refused() -> None:
    """'(' never closed is what a value with a newline looks like: refused, not guessed."""
    conn = ready()
    conn.send_command("GET VARIABLE", "CALLERID(name)")
    conn.receive_data(b"200 result=1 (first line of a value\n")
    assert remote_error(conn) == "unterminated data in reply"


def test_reply_non_utf8_data() -> None:
    """Reply text decodes leniently, like the environment."""
    reply = reply_to(ready(), b"200 result=1 (Jos\xc3)\n")
    assert reply.data == "Jos\ufffd"


# ------------------------------------------------------------------------ send_command


def test_send_command_before_environment_is_refused() -> None:
    """No command may go out before the environment event was returned."""
    conn = AgiConnection()
    with pytest.raises(LocalProtocolError, match="before the environment"):
        conn.send_command("NOOP")
    conn.receive_data(CAPTURE_ENVIRONMENT)  # buffered but not yet returned
    with pytest.raises(LocalProtocolError, match="before the environment"):
        conn.send_command("NOOP")


def test_send_command_while_reply_pending_is_refused() -> None:
    """A second command before the first one's reply is a local error."""
    conn = ready()
    conn.send_command("NOOP")
    with pytest.raises(LocalProtocolError, match="reply is pending"):
        conn.send_command("NOOP")
    conn.receive_data(b"520-Invalid command syntax.  Proper usage follows:\n")
    assert conn.next_event() is NEED_DATA
    assert conn.awaiting_reply
    with pytest.raises(LocalProtocolError, match="multi-line reply"):
        conn.send_command("NOOP")


def test_refused_value_leaves_state_unchanged() -> None:
    """A command refused for its value is not recorded as sent."""
    conn = ready()
    with pytest.raises(LocalProtocolError):
        conn.send_command("SET VARIABLE", "A", "x\nEXEC Dial evil")
    assert not conn.awaiting_reply
    assert conn.send_command("NOOP") == b"NOOP\n"


# ---------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    ("words", "wire"),
    [
        (("NOOP",), b"NOOP\n"),
        (("GET VARIABLE", "CHANNEL"), b'GET VARIABLE "CHANNEL"\n'),
        (("SET VARIABLE", "A", "with spaces"), b'SET VARIABLE "A" "with spaces"\n'),
        (("SET VARIABLE", "A", 'say "hi"'), b'SET VARIABLE "A" "say \\"hi\\""\n'),
        (("SET VARIABLE", "A", "C:\\dir\\"), b'SET VARIABLE "A" "C:\\\\dir\\\\"\n'),
        (("SET VARIABLE", "A", ""), b'SET VARIABLE "A" ""\n'),
        (("SET VARIABLE", "A", "tab\there"), b'SET VARIABLE "A" "tab\there"\n'),
        (("SET VARIABLE", "A", "José"), 'SET VARIABLE "A" "José"\n'.encode()),
        (("SET", "VARIABLE", "A", "b"), b'SET "VARIABLE" "A" "b"\n'),
    ],
)
def test_encode_command(words: tuple[str, ...], wire: bytes) -> None:
    """Command words go out verbatim, values quoted with backslash escapes, UTF-8, '\\n'."""
    assert encode_command(*words) == wire


@pytest.mark.parametrize(
    "values",
    [
        ("A", "with spaces"),
        ("A", 'say "hi"'),
        ("A", "back\\slash\\"),
        ("A", ""),
        ("A", '\\"'),
        ("A", "  leading and trailing  "),
        ("A", "tab\tinside"),
    ],
)
def test_encoded_values_survive_asterisk_parse_args(values: tuple[str, ...]) -> None:
    """Asterisk's parse_args() (ported) gives back exactly the values we encoded."""
    line = encode_command("SET VARIABLE", *values).decode()
    assert parse_args(line[:-1]) == ["SET", "VARIABLE", *values]


@pytest.mark.parametrize("bad", ["x\nEXEC Dial(evil)", "x\r", "x\0y", "\n"])
def test_injection_attempt_is_refused(bad: str) -> None:
    """A value with LF, CR or NUL cannot be encoded: no second command can be smuggled."""
    with pytest.raises(LocalProtocolError, match="CR, LF or NUL"):
        encode_command("SET VARIABLE", "A", bad)
    with pytest.raises(LocalProtocolError):
        ready().set_variable("A", bad)


@pytest.mark.parametrize(
    "command", ["", " NOOP", "NOOP ", "SET  VARIABLE", 'VERBOSE "x"', "NOOP\n", "EXEC;"]
)
def test_invalid_command_name_is_refused(command: str) -> None:
    """The verbatim command part must be plain words separated by single spaces."""
    with pytest.raises(LocalProtocolError, match="invalid command name"):
        encode_command(command)


def test_empty_command_is_refused() -> None:
    """encode_command() needs at least the command word."""
    with pytest.raises(LocalProtocolError, match="empty command"):
        encode_command()


def test_command_at_byte_limit_is_accepted() -> None:
    """A command line of exactly MAX_COMMAND_BYTES bytes, '\\n' included, is fine."""
    overhead = len(b'SET VARIABLE "A" ""\n')
    line = encode_command("SET VARIABLE", "A", "v" * (MAX_COMMAND_BYTES - overhead))
    assert len(line) == MAX_COMMAND_BYTES


def test_command_over_byte_limit_is_refused() -> None:
    """One byte more than MAX_COMMAND_BYTES would let old Asterisk split the line: refused."""
    overhead = len(b'SET VARIABLE "A" ""\n')
    with pytest.raises(LocalProtocolError, match=f"exceeds {MAX_COMMAND_BYTES} bytes"):
        encode_command("SET VARIABLE", "A", "v" * (MAX_COMMAND_BYTES + 1 - overhead))


def test_command_byte_limit_counts_utf8_and_escapes() -> None:
    """The limit is on encoded bytes: multi-byte characters and escapes count fully."""
    overhead = len(b'SET VARIABLE "A" ""\n')
    with pytest.raises(LocalProtocolError):
        encode_command("SET VARIABLE", "A", "é" * ((MAX_COMMAND_BYTES - overhead) // 2 + 1))
    with pytest.raises(LocalProtocolError):
        encode_command("SET VARIABLE", "A", '"' * ((MAX_COMMAND_BYTES - overhead) // 2 + 1))


def test_command_word_limit() -> None:
    """At most MAX_COMMAND_WORDS words, command words included (argv overflow in Asterisk)."""
    values = ["v"] * (MAX_COMMAND_WORDS - 1)
    assert encode_command("EXEC", *values).count(b'"v"') == MAX_COMMAND_WORDS - 1
    with pytest.raises(LocalProtocolError, match="words"):
        encode_command("EXEC", *values, "v")
    with pytest.raises(LocalProtocolError, match="words"):
        encode_command("SET VARIABLE", *values)


def test_unencodable_value_is_refused() -> None:
    """A lone surrogate has no UTF-8 form: local error, not UnicodeEncodeError."""
    with pytest.raises(LocalProtocolError, match="UTF-8"):
        encode_command("SET VARIABLE", "A", "\udcff")


@pytest.mark.parametrize("name", ["", "A B", "A;B", "CHANNEL(x)", "A\nB", 'A"', "É"])
def test_set_variable_refuses_bad_names(name: str) -> None:
    """set_variable() only takes names of ASCII letters, digits and underscores, and a
    refused name leaves the connection ready for the next command."""
    conn = ready()
    with pytest.raises(LocalProtocolError, match="invalid variable name"):
        conn.set_variable(name, "x")
    assert not conn.awaiting_reply


def test_set_variable_encodes() -> None:
    """set_variable() is send_command('SET VARIABLE', name, value)."""
    assert ready().set_variable("AGI_BRIDGE_STATUS", "stopped ok") == (
        b'SET VARIABLE "AGI_BRIDGE_STATUS" "stopped ok"\n'
    )
    assert ready().set_variable("__INHERITED_1", "") == b'SET VARIABLE "__INHERITED_1" ""\n'


def test_error_reason_attribute() -> None:
    """Every ProtocolError carries its reason as .reason and as its message."""
    error = RemoteProtocolError("environment exceeds 65536 bytes")
    assert error.reason == str(error) == "environment exceeds 65536 bytes"
    assert isinstance(error, ProtocolError)
    assert isinstance(LocalProtocolError("x"), ProtocolError)
    assert repr(NEED_DATA) == "NEED_DATA"


# -------------------------------------------------------------------------- properties


def _drain(conn: AgiConnection, budget: int) -> bool:
    """Call next_event until NEED_DATA/EndOfStream; False if it raised ProtocolError.

    ``budget`` bounds the calls: every event consumes at least one buffered line, so more
    calls than buffered bytes + 2 would mean a loop that does not terminate.
    """
    for _ in range(budget):
        try:
            event = conn.next_event()
        except ProtocolError:
            return False
        if event is NEED_DATA or isinstance(event, EndOfStream):
            return True
        if isinstance(event, Environment | Reply) and not conn.awaiting_reply:
            # Keep the reply paths reachable: ask for something after each event.
            conn.send_command("NOOP")
        elif isinstance(event, Hangup) and not conn.awaiting_reply:
            conn.send_command("NOOP")
    raise AssertionError("next_event did not settle within its budget")


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


_WIRE_PIECES = st.sampled_from(
    [
        b"agi_network: yes\n",
        b"agi_arg_1: a\n",
        b"agi_arg_2: \n",
        b"agi_arg_2: b\n",
        b"agi_x:\n",
        b"\n",
        b"\r\n",
        b"HANGUP\n",
        b"200 result=1 (x)\n",
        b"200 result=1 (x\n",
        b"100 result=0 Trying...\n",
        b"520-Invalid\n",
        b"520 End of proper usage.\n",
        b"510 Invalid or unknown command\n",
        b"\xff\xc3",
        b":",
        b" ",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.lists(_WIRE_PIECES, max_size=25).map(b"".join),
        st.tuples(st.just(CAPTURE_ENVIRONMENT), st.lists(_WIRE_PIECES, max_size=15)).map(
            lambda pair: pair[0] + b"".join(pair[1])
        ),
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=20),
    close=st.booleans(),
)
def test_any_bytes_any_chunking_gives_events_or_protocol_errors(
    data: bytes, cuts: list[int], close: bool
) -> None:
    """For any input in any chunking, next_event returns or raises ProtocolError, and stops."""
    conn = AgiConnection(max_line_bytes=64, max_environment_bytes=512, max_reply_lines=4)
    alive = True
    for chunk in _chunked(data, cuts):
        conn.receive_data(chunk)
        alive = _drain(conn, len(data) + 3)
        if not alive:
            break
    if alive and close:
        conn.receive_data(b"")
        _drain(conn, len(data) + 3)


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_chunking_does_not_change_the_outcome(data: bytes, cuts: list[int]) -> None:
    """The events (or the error) are the same whether bytes come at once or in pieces."""

    def run(chunks: list[bytes]) -> list[object]:
        conn = AgiConnection(max_line_bytes=64, max_environment_bytes=256)
        seen: list[object] = []
        try:
            for chunk in chunks:
                conn.receive_data(chunk)
                seen.extend(events_of(conn))
            conn.receive_data(b"")
            seen.extend(events_of(conn))
        except ProtocolError as exc:
            seen.append((type(exc), exc.reason))
        return seen

    assert run(_chunked(data, cuts)) == run([data])


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.text(), min_size=1, max_size=5))
def test_encoding_round_trips_through_parse_args(values: list[str]) -> None:
    """Any encodable value reaches Asterisk's parse_args() unchanged, or is refused locally."""
    try:
        line = encode_command("SET VARIABLE", *values)
    except LocalProtocolError:
        return
    text = line.decode()
    assert text.endswith("\n")
    assert text.count("\n") == 1
    assert "\r" not in text
    assert "\0" not in text
    assert parse_args(text[:-1]) == ["SET", "VARIABLE", *values]


def test_two_variables_are_set_by_one_array_command() -> None:
    """set_variables() writes both variables with one SET VARIABLE of ARRAY(): one reply to
    wait for; ARRAY()'s syntax in a value is escaped; one variable is a plain SET VARIABLE."""
    conn = ready()
    line = conn.set_variables(("NOOJEE_STATUS", "FAILED"), ("NOOJEE_MESSAGE", "a,b (c)"))
    assert (
        line == b'SET VARIABLE "ARRAY(NOOJEE_STATUS,NOOJEE_MESSAGE)" "FAILED,a\\\\,b \\\\(c\\\\)"\n'
    )
    conn.receive_data(b"200 result=1\n")
    reply = conn.next_event()
    assert isinstance(reply, Reply)
    assert reply.ok
    assert not conn.awaiting_reply
    assert ready().set_variables(("A", "x,y")) == b'SET VARIABLE "A" "x,y"\n'
    with pytest.raises(LocalProtocolError, match="variable name"):
        ready().set_variables(("A", "1"), ("B(x)", "2"))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.text(), min_size=2, max_size=4))
def test_array_values_reach_asterisk_unchanged(values: list[str]) -> None:
    """Any encodable values, through parse_args() then ARRAY()'s argument splitting (both
    ported), land in their variables unchanged, in order; or are refused locally."""
    names = [f"V{i}" for i in range(len(values))]
    try:
        line = ready().set_variables(*zip(names, values, strict=True))
    except LocalProtocolError:
        return
    _, _, name, value = parse_args(line.decode()[:-1])
    assert written_variables(name, value) == dict(zip(names, values, strict=True))
