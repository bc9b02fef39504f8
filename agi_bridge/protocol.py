"""FastAGI protocol core: bytes in, events out, with no I/O of its own.

The design follows h11. One :class:`AgiConnection` object holds the state of one FastAGI
session, seen from the server side. The driver feeds it whatever the socket produced
(:meth:`AgiConnection.receive_data`, ``b""`` meaning end of stream) and pulls events out
(:meth:`AgiConnection.next_event`) until it gets :data:`NEED_DATA`. Commands are encoded by
:meth:`AgiConnection.send_command`, which returns the bytes to write and records that a
reply is now awaited. Nothing here touches sockets, asyncio, threads, clocks or logging, so
every rule of the protocol is tested by plain synchronous functions feeding bytes.

What Asterisk (``res/res_agi.c``) sends, and what this module makes of it:

* The environment block: ``name: value\\n`` lines ended by one empty line, written by
  ``setup_env()``. It becomes one :class:`Environment` event.
* After that, one line per reply (``200 result=1 (value)``, ``510 ...``, ``511 ...``,
  ``520 ...``), a multi-line ``520-`` usage block, a provisional ``100 result=0 Trying...``
  (skipped), or a bare ``HANGUP`` line, which ``run_agi()`` writes between commands whenever
  it notices the channel hung up. ``HANGUP`` is its own :class:`Hangup` event and is never
  taken for a reply, even when it arrives while a reply is awaited.
* End of stream becomes :class:`EndOfStream` where a session may end, and an error where it
  may not (inside the environment, inside a line, inside a multi-line reply).

Every error is a :class:`ProtocolError` split by whose fault it is:
:class:`RemoteProtocolError` (the peer sent something wrong; the connection is then dead
and every later :meth:`~AgiConnection.next_event` raises again) and
:class:`LocalProtocolError` (our own misuse, such as a newline in a command value; the
connection is left as it was).

Every limit is a named constant below with the reason for its value. Limits are checked as
bytes arrive, so a peer that never sends a newline is refused as soon as the buffer passes
the limit instead of being buffered without bound. With ``cut_overlong_lines`` an environment
line over :data:`MAX_LINE_BYTES` (a dialplan argument of 10 kB) is not an error: its value is
dropped as it arrives, its name listed in :attr:`Environment.overlong`, and the session goes
on, so that the server can still tell the dialplan why it refuses the call.
"""

from __future__ import annotations

import enum
import functools
import itertools
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias
from urllib.parse import parse_qsl

__all__ = [
    "MAX_ARGUMENTS",
    "MAX_COMMAND_BYTES",
    "MAX_COMMAND_WORDS",
    "MAX_ENVIRONMENT_BYTES",
    "MAX_LINE_BYTES",
    "MAX_REPLY_LINES",
    "NEED_DATA",
    "AgiConnection",
    "EndOfStream",
    "Environment",
    "Event",
    "Hangup",
    "LocalProtocolError",
    "NeedData",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "encode_command",
]

# --------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------

# Longest line we accept from Asterisk, counting every byte before the "\n" (a trailing
# "\r" included). Asterisk itself has no limit on what it writes (ast_agi_send() formats
# into a growing ast_str), but the lines that matter are short: a real environment line
# is under 100 bytes, and the longest legitimate ones are agi_request (the whole
# agi://host/script?query URL), agi_calleridname and dialplan arguments. 8 KiB is what
# Asterisk 22.6+ allows for the command lines we send it, ~100 times a real line, and
# keeps a peer that never sends "\n" from growing our buffer.
MAX_LINE_BYTES: Final = 8192

# Largest environment block, all lines, newlines and the closing empty line counted.
# A real block (the Asterisk 22.10.1 capture in tests/test_protocol.py) is about 700
# bytes plus the arguments;
# 64 KiB leaves room for many long arguments while bounding what an impostor can make us
# hold before we have decided whether the session is even valid.
MAX_ENVIRONMENT_BYTES: Final = 65536

# Most agi_arg_N lines we accept. res_agi.c declares the AGI() application's arguments
# as AST_APP_ARG(arg)[MAX_ARGS] with MAX_ARGS 128, the script URL being one of them, so
# Asterisk never sends more than 127; anything past 128 is not Asterisk.
MAX_ARGUMENTS: Final = 128

# Longest variable name looked for at the start of an environment line cut for its length;
# Asterisk's longest, agi_arg_127, has 11 characters.
MAX_NAME_BYTES: Final = 64

# Most lines in one multi-line reply ("520-..." through "520 End of proper usage."),
# both ends included. The lines between are the command's usage text, which res_agi.c
# builds from its XML documentation: a few dozen lines at most. 256 lines bounds the memory
# one reply can hold (at most 256 * MAX_LINE_BYTES) without ever cutting a real one.
MAX_REPLY_LINES: Final = 256

# Longest command line we send, its "\n" included. Asterisk before 20.16/21.11/22.6 reads
# commands with fgets() into char buf[AGI_BUF_LEN] (2048): at most 2047 bytes come back
# per call, and run_agi() then handles what it got as a whole command. A longer line is
# therefore split in two and its tail is executed as a second command, which is a command
# injection when the tail holds a caller-controlled value. 2047 bytes, not 2048, because
# fgets() keeps one byte of the buffer for the terminating NUL.
MAX_COMMAND_BYTES: Final = 2047

# Most words (command words plus values) in one command line. parse_args() in res_agi.c
# fills const char *argv[MAX_ARGS] and checks the bound only for unquoted words: a word
# that starts with a double quote is stored without the check, so more than 127 quoted
# words would write past the end of argv inside Asterisk. We quote every value, so we
# must stay below MAX_ARGS - 1 = 127 words ourselves.
MAX_COMMAND_WORDS: Final = 127
# Encoded command lines remembered: a bridge sends the same few again and again (a SET
# VARIABLE per status, NoojeeContact's few messages), and encoding checks every value.
COMMANDS_REMEMBERED: Final = 256


# --------------------------------------------------------------------------------------
# Errors and the NEED_DATA sentinel
# --------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """A FastAGI protocol violation; ``reason`` is a short, stable, human description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RemoteProtocolError(ProtocolError):
    """The peer (Asterisk or an impostor) sent something this protocol does not allow."""


class LocalProtocolError(ProtocolError):
    """We misused the API: a value that cannot be sent safely, or a command out of turn."""


class NeedData:
    """Type of :data:`NEED_DATA`: no complete event yet, feed more bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Environment:
    """The ``agi_*`` block Asterisk sends when it connects, parsed once."""

    # Every line of the block, keys as sent, values decoded as UTF-8 with replacement.
    variables: Mapping[str, str]
    # agi_arg_1 .. agi_arg_N in numeric order; empty arguments are kept as "".
    arguments: tuple[str, ...]
    # agi_network_script without its "?query" part, e.g. "recording/stop".
    script: str
    # The "?query" part as percent-decoded (name, value) pairs, in order, blanks kept.
    query: tuple[tuple[str, str], ...]
    # agi_network_script exactly as sent ("" when Asterisk left it out).
    raw_script: str
    # Names of the lines longer than MAX_LINE_BYTES whose values were dropped (their
    # variables hold ""), with ``cut_overlong_lines``: the call must be refused, not served.
    overlong: tuple[str, ...] = ()
    # ``agi_uniqueid`` and ``agi_channel``, or ``''``: read once here, as every session reads
    # each twice (its log context and its request), a Python call each as properties.
    uniqueid: str = field(init=False, repr=False, compare=False)
    channel: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "uniqueid", self.variables.get("agi_uniqueid", ""))
        object.__setattr__(self, "channel", self.variables.get("agi_channel", ""))

    @property
    def request(self) -> str:
        """``agi_request`` (the whole ``agi://`` URL), or ``''``."""
        return self.variables.get("agi_request", "")

    @property
    def extension(self) -> str:
        """``agi_extension`` (the dialplan extension, ``h`` in a hangup extension), or ``''``."""
        return self.variables.get("agi_extension", "")

    @property
    def context(self) -> str:
        """``agi_context``, or ``''``."""
        return self.variables.get("agi_context", "")

    @property
    def priority(self) -> str:
        """``agi_priority``, or ``''``."""
        return self.variables.get("agi_priority", "")


@dataclass(frozen=True, slots=True)
class Reply:
    """Asterisk's answer to one command, e.g. ``200 result=1 (value)``.

    The data rule: res_agi.c writes a free-form value in parentheses only as the last
    thing on the line (``GET VARIABLE``, ``GET FULL VARIABLE``, ``DATABASE GET``:
    ``"200 result=1 (%s)\\n"``), and writes extra text after parentheses only when they
    hold a fixed word (``(timeout) endpos=0``, ``(dtmf) endpos=...``, ``(speech) ...``).
    So when the text after ``result=N `` starts with ``(`` and the line ends with ``)``,
    ``data`` runs to that final ``)`` and may itself contain parentheses; otherwise it runs
    to the first ``") "`` and the rest is ``extra``. A ``(`` that is never closed is an
    error: it is what a value containing a newline looks like, and the rest of that value
    would otherwise be read as the next reply.
    """

    code: int
    result: str | None
    data: str | None
    extra: str
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True for a ``200`` reply."""
        return self.code == 200


@dataclass(frozen=True, slots=True)
class Hangup:
    """A bare ``HANGUP`` line: the channel hung up. An event in its own right, never a reply."""


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer closed the connection at a point where a session may end."""


Event: TypeAlias = Environment | Reply | Hangup | EndOfStream


# --------------------------------------------------------------------------------------
# Command encoding
# --------------------------------------------------------------------------------------

# The command words themselves ("GET VARIABLE", "SET VARIABLE", "NOOP") go out verbatim,
# so they are held to what res_agi.c's command table contains: words of letters, digits
# and "_" (commands starting with "_" are hidden ones) separated by single spaces.
_COMMAND_RE: Final = re.compile(r"[A-Za-z0-9_]+(?: [A-Za-z0-9_]+)*")
_VARIABLE_NAME_RE: Final = re.compile(r"[A-Za-z0-9_]+")
# ARRAY()'s list: those names, separated by commas.
_VARIABLE_NAMES_RE: Final = re.compile(
    rf"{_VARIABLE_NAME_RE.pattern}(?:,{_VARIABLE_NAME_RE.pattern})*"
)


def _check_command_name(command: str) -> None:
    if _COMMAND_RE.fullmatch(command) is None:
        raise LocalProtocolError("invalid command name")


@functools.lru_cache(maxsize=COMMANDS_REMEMBERED)
def encode_command(*words: str) -> bytes:
    """Encode one AGI command line: ``words[0]`` verbatim, every other word quoted.

    parse_args() in res_agi.c splits the line on spaces and tabs, starts a quoted word at a
    double quote and treats a backslash as "take the next character literally", in and out
    of quotes. So each value is sent as ``"..."`` with ``\\`` and ``"`` backslash-escaped,
    which gives back exactly the value, including spaces and the empty string. A value
    with CR, LF or NUL is refused: run_agi() ends a command at LF (what lets a value inject
    a second command in libraries that do not check) and parse_args() stops at NUL.
    Command words passed separately (``encode_command("SET", "VARIABLE", ...)``) are
    quoted too, which Asterisk strips before matching, so either spelling works.
    """
    if not words:
        raise LocalProtocolError("empty command")
    command = words[0]
    _check_command_name(command)
    values = words[1:]
    if command.count(" ") + 1 + len(values) > MAX_COMMAND_WORDS:
        raise LocalProtocolError(f"command has more than {MAX_COMMAND_WORDS} words")
    parts = [command]
    for value in values:
        if "\n" in value or "\r" in value or "\0" in value:
            raise LocalProtocolError("command value contains CR, LF or NUL")
        parts.append('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
    try:
        line = (" ".join(parts) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (e.g. from surrogateescape decoding) have no UTF-8 form.
        raise LocalProtocolError("command value is not encodable as UTF-8") from None
    if len(line) > MAX_COMMAND_BYTES:
        raise LocalProtocolError(f"command exceeds {MAX_COMMAND_BYTES} bytes")
    return line


def _line_name(head: bytes) -> bytes:
    """The variable name at the start of an environment line cut for its length."""
    name, separator, _ = head.partition(b": ")
    if not separator or not name.isascii():
        raise RemoteProtocolError('environment line is not "name: value"')
    return name


# What ARRAY() would read as syntax in a value (see array_value): each is sent after a backslash.
_ARRAY_ESCAPES: Final = str.maketrans({ch: "\\" + ch for ch in '\\,"()[]'})


def array_value(values: Iterable[str]) -> str:
    """The value that makes ``ARRAY(name1,name2,...)`` (func_strings, in every Asterisk since
    1.6 and loaded by default) write exactly ``values`` to its variables, in order.

    A SET VARIABLE whose name ends with ")" writes a dialplan function, and ARRAY() splits
    its value with __ast_app_separate_args() (main/app.c): at commas outside double quotes,
    parentheses and brackets; it drops double quotes and takes the character after a backslash
    literally. So every ``\\ , " ( ) [ ]`` of a value is sent after a backslash; nothing else
    is read (no trimming, no ``${}``: a SET VARIABLE value is not substituted). Why not two
    SET VARIABLE commands at once: run_agi() reads a command with fgets() on a FILE*, then
    polls the socket, so a second command read into that FILE*'s buffer would wait there
    unseen."""
    # map() over str.translate: no Python frame per value (a generator would be one each).
    return ",".join(map(str.translate, values, itertools.repeat(_ARRAY_ESCAPES)))


# Quoting keeps a variable name intact on the wire, but Asterisk would still interpret
# characters like "(" (a dialplan function) or ":" in it: only plain names pass.
def _check_variable_name(name: str) -> None:
    if _VARIABLE_NAME_RE.fullmatch(name) is None:
        raise LocalProtocolError("invalid variable name")


# --------------------------------------------------------------------------------------
# Reply parsing
# --------------------------------------------------------------------------------------


def _single_line_reply(line: bytes) -> Reply:
    """The :class:`Reply` of a final one-line reply (its code checked by the caller)."""
    text = _decode(line)
    result, data, extra = _split_reply_text(text[4:])
    return Reply(code=int(line[:3]), result=result, data=data, extra=extra, lines=(text,))


def _split_reply_text(text: str) -> tuple[str | None, str | None, str]:
    """Split what follows the code into ``(result, data, extra)``; see :class:`Reply`."""
    if not text.startswith("result="):
        return None, None, text.strip()
    end = text.find(" ", 7)
    if end < 0:
        return text[7:], None, ""
    result = text[7:end]
    tail = text[end + 1 :].lstrip(" ")
    if not tail.startswith("("):
        return result, None, tail.strip()
    if tail.endswith(")"):
        return result, tail[1:-1], ""
    close = tail.find(") ")
    if close < 0:
        raise RemoteProtocolError("unterminated data in reply")
    return result, tail[1:close], tail[close + 1 :].strip()


def _decode(raw: bytes) -> str:
    # Asterisk declares no charset: values are whatever bytes the channel carried. UTF-8
    # with replacement keeps everything else of a line whose caller name was cut in the
    # middle of a multi-byte sequence (seen in a real Asterisk 16 capture).
    return raw.decode("utf-8", "replace")


# --------------------------------------------------------------------------------------
# The connection state machine
# --------------------------------------------------------------------------------------


# StrEnum, not Enum: the transitions table is looked up by (state, input) on every line, and
# a plain Enum member is hashed by a Python-level method, a str one in C.
class _State(enum.StrEnum):
    ENVIRONMENT = "reading the environment"
    IDLE = "no command is pending"
    AWAITING_REPLY = "a reply is pending"
    MULTILINE_REPLY = "inside a multi-line reply"
    CLOSED = "the stream has ended"
    ERROR = "the connection has failed"


class _Input(enum.StrEnum):
    ENVIRONMENT_END = "end of environment"
    SEND = "command"
    HANGUP = "HANGUP"
    PROVISIONAL = "provisional reply"
    REPLY = "reply"
    MULTILINE_START = "multi-line reply"
    MULTILINE_END = "end of multi-line reply"
    EOF = "end of stream"


# Every legal (state, input) -> next state. Anything missing is a protocol error, whose
# fault depends on the input: SEND is ours, the rest are the peer's.
_TRANSITIONS: Final[dict[_State, dict[_Input, _State]]] = {
    _State.ENVIRONMENT: {
        _Input.ENVIRONMENT_END: _State.IDLE,
    },
    _State.IDLE: {
        _Input.SEND: _State.AWAITING_REPLY,
        # After the server's last command (or a half-close) Asterisk notices the hangup
        # and writes HANGUP unless the dialplan set AGISIGHUP=no.
        _Input.HANGUP: _State.IDLE,
        _Input.EOF: _State.CLOSED,
    },
    _State.AWAITING_REPLY: {
        # run_agi() writes HANGUP between reading our command and answering it when the
        # channel hung up in the meantime; the reply still follows on the next line.
        _Input.HANGUP: _State.AWAITING_REPLY,
        # "100 result=0 Trying..." (handle_gosub) precedes the real reply.
        _Input.PROVISIONAL: _State.AWAITING_REPLY,
        _Input.REPLY: _State.IDLE,
        _Input.MULTILINE_START: _State.MULTILINE_REPLY,
        # Asterisk may close without answering (failure, shutdown); the driver learns it
        # from EndOfStream while awaiting_reply was still true.
        _Input.EOF: _State.CLOSED,
    },
    _State.MULTILINE_REPLY: {
        _Input.MULTILINE_END: _State.IDLE,
    },
    _State.CLOSED: {
        _Input.EOF: _State.CLOSED,
    },
    _State.ERROR: {},
}

# Reasons for the illegal transitions a peer can cause; the default is built from names.
_REFUSALS: Final[dict[tuple[_State, _Input], str]] = {
    (_State.ENVIRONMENT, _Input.EOF): "end of stream before end of environment",
    (_State.MULTILINE_REPLY, _Input.EOF): "end of stream before end of multi-line reply",
    (_State.ENVIRONMENT, _Input.SEND): "command sent before the environment was received",
    (_State.CLOSED, _Input.SEND): "command sent after end of stream",
}

# What SET VARIABLE (every session, twice) and most commands answer, parsed once: a Reply is
# frozen, so one object serves every session.
_COMMON_REPLIES: Final = {
    line: _single_line_reply(line) for line in (b"200 result=1", b"200 result=0")
}
_HANGUP_LINE: Final = b"HANGUP"
_REPLY_SEPARATORS: Final = (b" ", b"-")
_ARG_PREFIX: Final = "agi_arg_"
_SCRIPT_VARIABLE: Final = "agi_network_script"


class AgiConnection:
    """Server side of one FastAGI session."""

    def __init__(
        self,
        *,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_environment_bytes: int = MAX_ENVIRONMENT_BYTES,
        max_arguments: int = MAX_ARGUMENTS,
        max_reply_lines: int = MAX_REPLY_LINES,
        cut_overlong_lines: bool = False,
    ) -> None:
        if min(max_line_bytes, max_environment_bytes, max_arguments, max_reply_lines) < 1:
            for name, limit in (
                ("max_line_bytes", max_line_bytes),
                ("max_environment_bytes", max_environment_bytes),
                ("max_arguments", max_arguments),
                ("max_reply_lines", max_reply_lines),
            ):
                if limit < 1:
                    raise ValueError(f"{name} must be at least 1, got {limit}")
        self._max_line_bytes = max_line_bytes
        self._max_environment_bytes = max_environment_bytes
        self._max_arguments = max_arguments
        self._max_reply_lines = max_reply_lines
        self._cut_overlong_lines = cut_overlong_lines

        self._state = _State.ENVIRONMENT
        self._buffer = bytearray()
        # Where the search for the next "\n" resumes: bytes before it are known to hold
        # none, so feeding one byte at a time stays linear instead of quadratic.
        self._scan_from = 0
        self._eof = False
        self._error_reason = ""

        # Environment being assembled; kept across NEED_DATA.
        self._environment_bytes = 0
        self._variables: dict[str, str] = {}
        self._arguments: dict[int, str] = {}
        self._environment: Environment | None = None
        # The name of the overlong environment line being dropped until its "\n", and the
        # names of those dropped so far.
        self._cutting: bytes | None = None
        self._overlong: list[str] = []

        # Multi-line reply being assembled.
        self._reply_code = b""
        self._reply_lines: list[str] = []

        # How many buffered bytes were already there when the pending command was sent.
        # Asterisk cannot have answered a command it had not received, so a reply line
        # starting in those bytes is unsolicited: typically the tail of a GET VARIABLE
        # value that contained a newline, forged to pass for the next reply.
        self._stale_bytes = 0
        self._line_is_stale = False

    # ---------------------------------------------------------------- public interface

    @property
    def awaiting_reply(self) -> bool:
        """True between :meth:`send_command` and the :class:`Reply` that answers it."""
        return self._state in (_State.AWAITING_REPLY, _State.MULTILINE_REPLY)

    @property
    def buffered(self) -> int:
        """Bytes received and not consumed yet: what a driver's flow control watches."""
        return len(self._buffer)

    @property
    def environment(self) -> Environment | None:
        """The :class:`Environment` once it has been returned by :meth:`next_event`."""
        return self._environment

    def receive_data(self, data: bytes) -> int:
        """Add bytes read from the peer; ``b""`` means the peer closed its side. Returns
        :attr:`buffered`, which a driver's flow control watches after every read."""
        if self._state is _State.ERROR:
            return 0  # the connection is dead; nothing it sends matters any more
        if self._eof:
            if data:
                raise LocalProtocolError("data received after end of stream")
        elif data:
            self._buffer += data
        else:
            self._eof = True
        return len(self._buffer)

    def next_event(self) -> Event | NeedData:
        """Return the next event, or :data:`NEED_DATA` when more bytes are needed.

        Raises :class:`RemoteProtocolError` when the peer broke the protocol; after that
        the connection is dead and every later call raises again.
        """
        if self._state is _State.ERROR:
            raise RemoteProtocolError(self._error_reason)
        try:
            if self._state is _State.ENVIRONMENT:
                environment = self._read_environment()
                return self._no_line() if environment is None else environment
            # Each pass consumes one line or returns, so this ends when the buffer does.
            while True:
                line = self._next_line()
                if line is None:
                    return self._no_line()
                if self._state is _State.MULTILINE_REPLY:
                    reply = self._multiline_reply_line(line)
                    if reply is not None:
                        return reply
                else:
                    event = self._reply_line(line)
                    if event is not None:
                        return event
        except RemoteProtocolError as exc:
            self._state = _State.ERROR
            self._error_reason = exc.reason
            self._buffer.clear()
            raise

    def send_command(self, *words: str) -> bytes:
        """Encode a command (see :func:`encode_command`) and expect its reply next.

        Raises :class:`LocalProtocolError` before the environment has been received, while
        a reply is still pending, after end of stream, or for a value that cannot be sent
        safely; the connection's state is then unchanged.
        """
        next_state = _TRANSITIONS[self._state].get(_Input.SEND)
        if next_state is None:
            raise LocalProtocolError(
                _REFUSALS.get((self._state, _Input.SEND), f"command sent while {self._state.value}")
            )
        line = encode_command(*words)
        self._state = next_state
        self._stale_bytes = len(self._buffer)
        return line

    def set_variable(self, name: str, value: str) -> bytes:
        """:meth:`send_command` ``SET VARIABLE name value``; ``name`` must be letters, digits
        and ``_``."""
        _check_variable_name(name)
        return self.send_command("SET VARIABLE", name, value)

    def set_variables(self, *pairs: tuple[str, str]) -> bytes:
        """:meth:`send_command` setting every ``(name, value)`` of ``pairs`` at once: ``SET
        VARIABLE "ARRAY(A,B)" "a,b"``, one round trip instead of one per variable (a command
        cannot follow another before its reply: see :func:`array_value`). Names must be
        letters, digits and ``_``."""
        if not pairs:
            raise LocalProtocolError("no variable to set")
        if len(pairs) == 1:
            _check_variable_name(pairs[0][0])
            return self.send_command("SET VARIABLE", *pairs[0])
        names, values = zip(*pairs, strict=True)
        listed = ",".join(names)
        # One match for the whole list: every session sets two variables this way.
        if _VARIABLE_NAMES_RE.fullmatch(listed) is None:
            raise LocalProtocolError("invalid variable name")
        return self.send_command("SET VARIABLE", f"ARRAY({listed})", array_value(values))

    # ---------------------------------------------------------------- internals

    def _transition(self, event: _Input) -> None:
        next_state = _TRANSITIONS[self._state].get(event)
        if next_state is None:
            raise RemoteProtocolError(
                _REFUSALS.get(
                    (self._state, event), f"{event.value} received while {self._state.value}"
                )
            )
        self._state = next_state

    def _next_line(self) -> bytes | None:
        """Take one complete reply-side line off the buffer (without its line end), or None."""
        buffer = self._buffer
        newline = buffer.find(b"\n", self._scan_from)
        if newline < 0:
            self._scan_from = len(buffer)
            self._check_partial_line()
            return None
        if newline > self._max_line_bytes:
            raise RemoteProtocolError(f"line exceeds {self._max_line_bytes} bytes")
        consumed = newline + 1
        # Asterisk ends lines with a bare "\n"; a "\r" before it is tolerated and dropped.
        end = newline - 1 if newline and buffer[newline - 1] == 0x0D else newline
        line = bytes(buffer[:end])
        # Deleting from the front of a bytearray is O(1) in CPython (it moves a start
        # offset), so consuming line by line does not copy the rest of the buffer.
        del buffer[:consumed]
        self._scan_from = 0
        self._line_is_stale = self._stale_bytes > 0
        if self._line_is_stale:
            self._stale_bytes = max(0, self._stale_bytes - consumed)
        return line

    def _check_partial_line(self) -> None:
        """Apply the limits to a buffer that holds only an unfinished line."""
        # Fail as soon as the partial line is too long: waiting for a newline that may
        # never come is how a peer makes a server buffer without bound.
        size = len(self._buffer)
        in_environment = self._state is _State.ENVIRONMENT
        cut = in_environment and self._cut_overlong_lines
        if size > self._max_line_bytes and not cut:
            raise RemoteProtocolError(f"line exceeds {self._max_line_bytes} bytes")
        if in_environment and self._environment_bytes + size > self._max_environment_bytes:
            raise RemoteProtocolError(f"environment exceeds {self._max_environment_bytes} bytes")
        if size > self._max_line_bytes:
            self._cutting = _line_name(bytes(self._buffer[:MAX_NAME_BYTES]))
            self._drop(size)

    def _no_line(self) -> NeedData | EndOfStream:
        if not self._eof:
            return NEED_DATA
        if self._buffer:
            raise RemoteProtocolError("end of stream before end of line")
        self._transition(_Input.EOF)
        return EndOfStream()

    # -- environment

    def _read_environment(self) -> Environment | None:
        """Parse every complete environment line buffered; the Environment once it ends.

        The whole block normally arrives in one read, so all complete lines are split at
        once and the limits are checked on the block with C-speed sums before the
        per-line loop: the environment is the largest thing parsed per session. Only when
        a limit is broken are lines walked one by one, so that the error reported is the
        one on the earliest line however the bytes were chunked.
        """
        buffer = self._buffer
        if not self._environment_bytes and self._cutting is None:
            # The usual case: the whole block in one read, smaller than one line may be, so no
            # line in it can break a limit. Parsed straight from the buffer.
            end = buffer.find(b"\n\n", 0, self._max_line_bytes)
            if 0 < end <= self._max_environment_bytes - 2 and buffer.find(b"\r", 0, end) < 0:
                self._store_variables_text(buffer[:end].decode("utf-8", "replace"))
                self._environment_bytes = end + 2
                del buffer[: end + 2]
                self._scan_from = 0
                return self._finish_environment()
        if self._cutting is not None:
            newline = buffer.find(b"\n")
            if newline < 0:
                self._check_partial_line()
                self._drop(len(buffer))
                return None
            self._cut(self._cutting, newline + 1)
        last = buffer.rfind(b"\n", self._scan_from)
        if last < 0:
            self._scan_from = len(buffer)
            self._check_partial_line()
            return None
        chunk = bytes(buffer[: last + 1])
        raw_lines = chunk.split(b"\n")
        raw_lines.pop()  # the empty piece after the final "\n"
        # Asterisk ends lines with a bare "\n"; a "\r" before it is tolerated and dropped.
        lines = (
            [line[:-1] if line.endswith(b"\r") else line for line in raw_lines]
            if chunk.find(b"\r") >= 0
            else raw_lines
        )
        try:
            count = lines.index(b"") + 1  # the empty line ends the block
            finished = True
        except ValueError:
            count = len(lines)
            finished = False
        block = raw_lines[:count]
        consumed = sum(map(len, block)) + count
        budget = self._max_environment_bytes - self._environment_bytes
        if consumed > budget or max(map(len, block)) > self._max_line_bytes:
            bad_line, reason = self._first_oversized(block, budget)
            self._store_variables(lines[:bad_line])  # an earlier bad line is reported first
            if not (self._cut_overlong_lines and len(block[bad_line]) > self._max_line_bytes):
                raise RemoteProtocolError(reason)
            upto = sum(map(len, block[: bad_line + 1])) + bad_line + 1
            if upto > budget:
                raise RemoteProtocolError(
                    f"environment exceeds {self._max_environment_bytes} bytes"
                )
            self._environment_bytes += upto - len(block[bad_line]) - 1
            del buffer[: upto - len(block[bad_line]) - 1]
            self._cut(_line_name(block[bad_line][:MAX_NAME_BYTES]), len(block[bad_line]) + 1)
            self._scan_from = 0
            return self._read_environment()
        self._store_variables(lines[: count - 1] if finished else lines)
        self._environment_bytes += consumed
        del buffer[:consumed]
        self._scan_from = 0
        if finished:
            return self._finish_environment()
        self._check_partial_line()
        return None

    def _drop(self, count: int) -> None:
        """Drop ``count`` bytes of an overlong line off the buffer; they count towards the
        environment's size all the same."""
        self._environment_bytes += count
        del self._buffer[:count]
        self._scan_from = 0

    def _cut(self, name: bytes, count: int) -> None:
        """The overlong line ``name`` ends with the ``count`` bytes buffered: drop them, and
        keep the variable, empty, so that names and argument numbers are checked as ever."""
        if self._environment_bytes + count > self._max_environment_bytes:
            raise RemoteProtocolError(f"environment exceeds {self._max_environment_bytes} bytes")
        self._drop(count)
        self._cutting = None
        self._store_variables([name + b": "])
        self._overlong.append(name.decode("ascii"))

    def _first_oversized(self, block: list[bytes], budget: int) -> tuple[int, str]:
        """Index of the first line of ``block`` that breaks a limit, and the reason."""
        total = 0
        for index, line in enumerate(block):
            if len(line) > self._max_line_bytes:
                return index, f"line exceeds {self._max_line_bytes} bytes"
            total += len(line) + 1
            if total > budget:
                return index, f"environment exceeds {self._max_environment_bytes} bytes"
        raise AssertionError("no line of the block breaks a limit")  # pragma: no cover

    def _store_variables(self, lines: list[bytes]) -> None:
        """Add ``name: value`` lines (no empty line, no line end) to the environment."""
        if not lines:
            return
        # Asterisk declares no charset: see _decode(). The block is decoded at once, which
        # gives the same text as line by line: "\n" is ASCII, and UTF-8 replacement never
        # swallows an ASCII byte into a bad sequence.
        self._store_variables_text(b"\n".join(lines).decode("utf-8", "replace"))

    def _store_variables_text(self, text: str) -> None:
        """Add the ``name: value`` lines of ``text`` (decoded, joined by "\n")."""
        variables = self._variables
        for line in text.split("\n"):
            # Split on the FIRST ": " only: values contain colons (agi_request is a URL,
            # IAX2 channels are IAX2/10.0.0.1:4569-1). setup_env() always writes
            # "name: value", so "agi_accountcode: " is an empty value; a bare "name:" (a
            # trailing space lost on the way) is read the same. Nothing else is AGI.
            name, separator, value = line.partition(": ")
            if not separator:
                if not line.endswith(":"):
                    raise RemoteProtocolError('environment line is not "name: value"')
                name = line[:-1]
            if not name or " " in name:
                raise RemoteProtocolError("bad environment variable name")
            if name in variables:
                # Asterisk writes each variable once; with two values for one name, which
                # one a consumer sees must not be up to the sender.
                raise RemoteProtocolError("duplicate environment variable")
            variables[name] = value
            if name.startswith(_ARG_PREFIX):
                self._argument(name[len(_ARG_PREFIX) :], value)

    def _argument(self, number_text: str, value: str) -> None:
        # setup_env() numbers arguments "agi_arg_%d" from 1; only that exact form counts.
        if not (number_text.isascii() and number_text.isdigit()) or number_text[0] == "0":
            raise RemoteProtocolError("bad argument name")
        number = int(number_text)
        if number > self._max_arguments:
            raise RemoteProtocolError(f"more than {self._max_arguments} arguments")
        self._arguments[number] = value

    def _finish_environment(self) -> Environment:
        if not self._variables:
            raise RemoteProtocolError("empty environment")
        arguments = self._arguments
        # Numbers are unique (duplicates were refused) and at least 1, so they are exactly
        # 1..N when the largest equals the count.
        if arguments and max(arguments) != len(arguments):
            raise RemoteProtocolError("gap in agi_arg_N numbering")
        variables = self._variables
        raw_script = variables.get(_SCRIPT_VARIABLE, "")
        # Asterisk passes the "?query" part of the URL through verbatim, never decoded.
        script, has_query, query_text = raw_script.partition("?")
        query = tuple(parse_qsl(query_text, keep_blank_values=True)) if has_query else ()
        environment = Environment(
            variables=types.MappingProxyType(variables),
            arguments=tuple(map(arguments.__getitem__, range(1, len(arguments) + 1))),
            script=script,
            query=query,
            raw_script=raw_script,
            overlong=tuple(self._overlong),
        )
        self._transition(_Input.ENVIRONMENT_END)
        self._environment = environment
        self._variables = {}
        self._arguments = {}
        return environment

    # -- replies

    def _reply_line(self, line: bytes) -> Reply | Hangup | None:
        if line == _HANGUP_LINE:
            self._transition(_Input.HANGUP)
            return Hangup()
        code = line[:3]
        separator = line[3:4]
        if not (len(code) == 3 and code.isdigit() and separator in _REPLY_SEPARATORS):
            raise RemoteProtocolError("malformed reply line")
        if self._line_is_stale:
            raise RemoteProtocolError("reply arrived before its command was sent")
        if separator == b"-":
            self._transition(_Input.MULTILINE_START)
            self._reply_code = code
            self._reply_lines = [_decode(line)]
            return None
        if code[0:1] == b"1":
            # Provisional (1xx), e.g. "100 result=0 Trying...": the real reply follows.
            self._transition(_Input.PROVISIONAL)
            return None
        self._transition(_Input.REPLY)
        return _COMMON_REPLIES.get(line) or _single_line_reply(line)

    def _multiline_reply_line(self, line: bytes) -> Reply | None:
        lines = self._reply_lines
        if len(lines) >= self._max_reply_lines:
            raise RemoteProtocolError(f"multi-line reply exceeds {self._max_reply_lines} lines")
        lines.append(_decode(line))
        code = self._reply_code
        # The block ends at "<code> ..." (res_agi.c: "520 End of proper usage.\n"). The
        # usage text before it is written with "%s" and need not end with "\n", in which
        # case the closing text is glued to its last line: accept that form too.
        if not (line.startswith(code + b" ") or line.endswith(code + b" End of proper usage.")):
            return None
        self._transition(_Input.MULTILINE_END)
        result, data, extra = _split_reply_text(lines[0][4:])
        self._reply_lines = []
        return Reply(code=int(code), result=result, data=data, extra=extra, lines=tuple(lines))
