"""A NoojeeContact simulator: the recording API over real HTTP/1.1 (optionally TLS).

It implements NoojeeContact's documented REST API closely enough to be the
backend of our tests (instead of mocks), of local demos (``agi-bridge simulate-noojee``) and of
the benchmark:

* ``POST <prefix>/Time`` answers ``text/plain`` epoch milliseconds. Every issued time stamp is
  remembered: it may be used within 10 s of issue, and then for 1 hour after its first use
  (NoojeeContact "01.1 Authentication - Hash method"); otherwise the answer is
  ``{"Message":"Expired TimeStamp","Code":-1}``.
* ``POST <prefix>/CallManagementAPI/stop|start`` takes its parameters from the query string (a
  form body is accepted too; query values win, as with a servlet's ``getParameter``).
  ``apiKey`` must equal the configured key, or ``timeStamp`` plus ``hash`` must be the exact
  lowercase sha256 of ``key:timeStamp``; anything else answers ``Authentication failed`` with
  HTTP 200 and Code -1, as the vendor documentation implies.
* Other methods answer 405 with JSON, unknown paths an HTML 404 page like the real servlet
  container does.

Design: one ``asyncio`` streams task per connection drives an :class:`h11.Connection` (the
protocol core has no I/O; this module only feeds it bytes). Connections are keep-alive and
tracked, so :meth:`NoojeeSimulator.stop` closes them all and leaves no task behind. Failure
modes are switched at run time (:meth:`NoojeeSimulator.set_failure`): 500, 503, slow answers,
HTML 404s, refused connections (the listening socket really closes and later re-listens on the
same port) and connections closed without an answer. Every API request is recorded as a frozen
:class:`ReceivedRequest`; tests wait for them with :meth:`NoojeeSimulator.wait_for`, which wakes
on arrival instead of polling or sleeping.

A small control API on the same listener serves a simulator running as a separate process:
``GET /_sim/received``, ``POST /_sim/failure?mode=http_500&delay=2[&duration=5]``,
``POST /_sim/latency?seconds=0.1`` and ``POST /_sim/reset``. It is unauthenticated: the
simulator is a test tool, bind it to loopback. Control requests are not recorded and are
exempt from failure modes and latency (except ``refuse``, which closes the listener: use
``duration`` to have the simulator come back by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import html
import json
import math
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, Self, TextIO
from urllib.parse import parse_qsl

import h11

from agi_bridge.redact import MASK, SECRET_PARAMETERS, scrub

__all__ = [
    "Action",
    "FailureMode",
    "NoojeeSimulator",
    "ReceivedRequest",
    "SimulatorConfig",
    "run_simulator",
]

Action = Literal["start", "stop"]
AuthVerdict = Literal["apikey", "hash", "none", "bad"]

# --- Limits and timeouts -------------------------------------------------------------------

# h11's own default and what most servers allow for a request head (nginx 8-32 KiB, Tomcat 8 KiB
# by default): the API's requests are a few hundred bytes.
MAX_HEADER_BYTES: Final = 16 * 1024
# Form bodies are optional and tiny; anything bigger is refused with 413.
MAX_BODY_BYTES: Final = 64 * 1024
# More parameters than any legitimate call carries; parse_qsl refuses beyond this.
MAX_PARAMS: Final = 64
# One read from a socket: large enough to take many pipelined requests at once.
READ_CHUNK: Final = 64 * 1024
# Idle keep-alive connections are closed after this, like Tomcat's 20 s connectionTimeout.
KEEPALIVE_IDLE_TIMEOUT: Final = 20.0
# A client that started a request must finish sending it within this (slowloris guard).
REQUEST_READ_TIMEOUT: Final = 10.0
# Time a client gets to finish the TLS handshake before the connection is dropped.
TLS_HANDSHAKE_TIMEOUT: Final = 10.0
# Graceful close (TLS close_notify, flushing the last answer) before the socket is aborted.
CLOSE_GRACE: Final = 1.0
# Listen backlog: the benchmark opens hundreds of connections at once.
LISTEN_BACKLOG: Final = 1024
# Bound memory when the benchmark pushes millions of requests through: the oldest records are
# dropped in chunks of a tenth once this many are held (tests stay far below it).
DEFAULT_MAX_RECORDS: Final = 200_000
# The documented validity of a time stamp: 10 s before its first use, 1 hour after it.
TIMESTAMP_FRESH_SECONDS: Final = 10.0
TIMESTAMP_USED_SECONDS: Final = 3600.0
# Issued time stamps are pruned of expired ones whenever this many are held.
TIMESTAMP_PRUNE_AT: Final = 4096

SERVER_HEADER: Final = b"NoojeeSimulator/1"
CONTROL_PREFIX: Final = "/_sim/"


class FailureMode(enum.StrEnum):
    """Ways the simulator can misbehave, switched at run time."""

    NONE = "none"
    HTTP_500 = "http_500"  # text/plain 500, no JSON
    HTTP_503 = "http_503"  # text/plain 503, no JSON
    SLOW = "slow"  # sleep ``delay`` seconds before answering
    HTML_404 = "html_404"  # every call answers the servlet container's HTML 404 page
    REFUSE = "refuse"  # listener closed: connections are refused
    RESET = "reset"  # read the request, then close the connection without an answer
    LOGIN_PAGE = "login_page"  # 200 with a single-sign-on gateway's HTML login page
    CUT_OFF_JSON = "cut_off_json"  # 200 with NoojeeContact's JSON cut short


def _default_agents() -> Mapping[str, frozenset[Action]]:
    return MappingProxyType(
        {
            "Fred": frozenset({"start", "stop"}),
            "Wilma": frozenset({"start", "stop"}),
            "Barney": frozenset({"start"}),  # may start but not stop recordings
            "Pebbles": frozenset(),  # may do neither
        }
    )


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Everything that describes the simulated NoojeeContact; built once, never changed."""

    api_key: str = "sim-key"
    agents: Mapping[str, frozenset[Action]] = field(default_factory=_default_agents)
    prefix: str = "/servicemanager/rest"
    clock: Callable[[], float] = time.time  # wall clock: it issues epoch milliseconds
    # Stop on these ids answers Code 1 "Call is not being recorded" (a warning, not an error).
    not_recording: frozenset[str] = frozenset({"999"})
    # These ids answer Code -1 "Call not found".
    unknown_calls: frozenset[str] = frozenset({"404"})
    max_records: int = DEFAULT_MAX_RECORDS

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ValueError("api_key must not be empty")
        prefix = "/" + self.prefix.strip("/") if self.prefix.strip("/") else ""
        object.__setattr__(self, "prefix", prefix)
        if prefix.startswith(CONTROL_PREFIX.rstrip("/")):
            raise ValueError(f"prefix must not live under {CONTROL_PREFIX}")
        if self.max_records < 1:
            raise ValueError("max_records must be at least 1")


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as the simulator saw it, and how it answered."""

    method: str
    path: str
    params: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    auth: AuthVerdict
    answered_code: int | None  # the JSON Code answered, None when the answer had none
    http_status: int  # 0 when the connection was closed without an answer
    at: float  # the config clock when the request arrived

    def to_json(self, *, redact: bool = False) -> dict[str, Any]:
        """A JSON-able dict; ``redact`` masks what :mod:`agi_bridge.redact` masks (the
        secret parameters' values, and the key and a hash wherever they appear)."""
        params = dict(self.params)
        if redact:
            secrets = [self.params[name] for name in self.params if name.casefold() == "apikey"]
            params = {
                name: MASK if name.casefold() in SECRET_PARAMETERS else scrub(value, secrets)
                for name, value in params.items()
            }
        return {
            "method": self.method,
            "path": self.path,
            "params": params,
            "headers": dict(self.headers),
            "body": self.body.decode("utf-8", "replace"),
            "auth": self.auth,
            "answered_code": self.answered_code,
            "http_status": self.http_status,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    content_type: bytes
    code: int | None = None
    close: bool = False  # close the connection after answering
    reset: bool = False  # close the connection instead of answering
    delay: float = 0.0
    allow: bytes = b"POST"  # the Allow header of a 405


def _json_answer(message: str, code: int, status: int = 200) -> _Answer:
    body = json.dumps({"Message": message, "Code": code}, separators=(",", ":")).encode()
    return _Answer(status, body, b"application/json", code)


_JSON: Final = b"application/json"
_TEXT: Final = b"text/plain; charset=utf-8"
_HTML: Final = b"text/html; charset=utf-8"
_AUTH_FAILED: Final = _json_answer("Authentication failed", -1)
_EXPIRED: Final = _json_answer("Expired TimeStamp", -1)
_NEED_EXTEN: Final = _json_answer("extenOrUniqueId required", -1)
_NEED_AGENT: Final = _json_answer("agentLoginName required", -1)
_UNKNOWN_AGENT: Final = _json_answer("Unknown agent", -1)
_DENIED: Final = _json_answer("Permission denied", -1)
_NO_CALL: Final = _json_answer("Call not found", -1)
_NOT_RECORDING: Final = _json_answer("Call is not being recorded", 1)
_DONE: Final[dict[str, _Answer]] = {
    "stop": _json_answer("Recording stopped", 0),
    "start": _json_answer("Recording started", 0),
}
_NOT_ALLOWED: Final = _Answer(405, b'{"Message":"Method Not Allowed","Code":-1}', _JSON, -1)
_HTTP_500: Final = _Answer(500, b"Internal Server Error", _TEXT)
_HTTP_503: Final = _Answer(503, b"Service Unavailable", _TEXT)
_RESET: Final = _Answer(0, b"", b"", reset=True)
_LOGIN_PAGE: Final = _Answer(
    200,
    b"<!doctype html><html><head><title>Sign in</title></head><body><form method=post>"
    b"<label>User name <input name=user></label><label>Password <input type=password "
    b"name=password></label></form></body></html>",
    _HTML,
)
# What a proxy cutting the body short leaves of a refusal: not JSON any more.
_CUT_OFF_JSON: Final = _Answer(200, b'{"Code": -1, "Message": "Permission den', _JSON)
_BAD_REQUEST: Final = _Answer(400, b"Bad Request", _TEXT, close=True)
_TOO_LARGE: Final = _Answer(413, b"Payload Too Large", _TEXT, close=True)


def _html_404(path: str) -> _Answer:
    """The shape of a Tomcat error page: title, inline CSS, the path, no query string."""
    where = html.escape(path)
    page = (
        '<!doctype html><html lang="en"><head><title>HTTP Status 404 - Not Found</title>'
        '<style type="text/css">body {font-family:Tahoma,Arial,sans-serif;} '
        "h1 {color:white;background-color:#525D76;}</style></head><body>"
        '<h1>HTTP Status 404 - Not Found</h1><hr class="line" /><p><b>Type</b> Status Report</p>'
        f"<p><b>Message</b> {where}</p><p><b>Description</b> The origin server did not find a "
        "current representation for the target resource or is not willing to disclose that "
        'one exists.</p><hr class="line" /><h3>Apache Tomcat</h3></body></html>'
    )
    return _Answer(404, page.encode(), _HTML)


class _Refused(Exception):
    """The request cannot be parsed or is too large: answer it and close."""

    def __init__(self, answer: _Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


class NoojeeSimulator:
    """The simulated server. ``start()`` it, point a client at ``base_url``, ``stop()`` it."""

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        on_request: Callable[[ReceivedRequest], None] | None = None,
    ) -> None:
        self.config: Final = config if config is not None else SimulatorConfig()
        self.received: list[ReceivedRequest] = []
        # Seconds added before every API answer (not control answers).
        self.latency = 0.0
        self._on_request = on_request
        self._mode = FailureMode.NONE
        self._delay = 0.0
        self._revert: asyncio.TimerHandle | None = None
        # Created by a waiter, set (and dropped) when a request arrives or the mode changes.
        self._changed: asyncio.Event | None = None
        # Time stamps issued: value -> [issued at, first used at or None].
        self._stamps: dict[str, list[float | None]] = {}
        self._last_stamp = 0
        self._server: asyncio.Server | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._host = "127.0.0.1"
        self._port = 0
        self._ssl: ssl.SSLContext | None = None
        self._started = False
        self._stopping = False
        prefix = self.config.prefix
        self._time_path: Final = f"{prefix}/Time"
        self._action_paths: Final[dict[str, Action]] = {
            f"{prefix}/CallManagementAPI/stop": "stop",
            f"{prefix}/CallManagementAPI/start": "start",
        }

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> Self:
        """Listen on ``host:port`` (0: any free port) and serve until :meth:`stop`."""
        if self._started:
            raise RuntimeError("simulator already started")
        self._host, self._ssl = host, ssl_context
        sock = self._listen_socket(host, port)
        self._port = sock.getsockname()[1]
        if self._mode is FailureMode.REFUSE:
            sock.close()  # refusing from the start: the port is known, nothing listens
        else:
            self._server = await self._serve_on(sock)
        self._started = True
        self._stopping = False
        return self

    async def stop(self) -> None:
        """Close the listener and every connection; wait until their tasks are gone."""
        self._stopping = True
        if self._revert is not None:
            self._revert.cancel()
            self._revert = None
        if self._listen_task is not None:
            await asyncio.gather(self._listen_task, return_exceptions=True)
            self._listen_task = None
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = self._drop_connections(except_current=False)
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        self._started = False

    async def __aenter__(self) -> Self:
        if not self._started:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (stays the same across ``refuse`` and back)."""
        return self._port

    @property
    def base_url(self) -> str:
        """What a client uses as its base URL, e.g. ``https://127.0.0.1:PORT/servicemanager/rest``."""
        scheme = "https" if self._ssl is not None else "http"
        # A wildcard bind address is not something to connect to: name loopback instead.
        wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104
        host = wildcard.get(self._host, self._host)
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self._port}{self.config.prefix}"

    def _listen_socket(self, host: str, port: int) -> socket.socket:
        """Bind and listen synchronously, so that ``set_failure`` can re-listen at once."""
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def _serve_on(self, sock: socket.socket) -> asyncio.Server:
        return await asyncio.start_server(
            self._serve_connection,
            sock=sock,
            ssl=self._ssl,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if self._ssl is not None else None,
            backlog=LISTEN_BACKLOG,
        )

    def _drop_connections(self, *, except_current: bool) -> list[asyncio.Task[Any]]:
        """Abort every connection (but the caller's) and cancel its task; return the tasks."""
        current = asyncio.current_task() if except_current else None
        tasks = []
        for task, writer in list(self._connections.items()):
            if task is current:
                continue
            writer.transport.abort()
            task.cancel()
            tasks.append(task)
        return tasks

    # --- failure modes -----------------------------------------------------------------------

    @property
    def failure_mode(self) -> FailureMode:
        """The current failure mode."""
        return self._mode

    def set_failure(
        self, mode: FailureMode, *, delay: float = 0.0, duration: float | None = None
    ) -> None:
        """Switch the failure mode now; ``duration`` seconds later, switch back to NONE.

        ``delay`` is the wait of ``SLOW``. ``REFUSE`` closes the listening socket and every
        connection at once; leaving it binds the same port again before this returns.
        """
        mode = FailureMode(mode)
        for name, seconds in (("delay", delay), ("duration", duration or 0.0)):
            if not math.isfinite(seconds) or seconds < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0")
        if self._revert is not None:
            self._revert.cancel()
            self._revert = None
        previous, self._mode, self._delay = self._mode, mode, delay
        self._wake()
        if self._started and not self._stopping:
            if mode is FailureMode.REFUSE and previous is not FailureMode.REFUSE:
                self._close_listener()
            elif mode is not FailureMode.REFUSE and previous is FailureMode.REFUSE:
                self._reopen_listener()
        if duration is not None:
            self._revert = asyncio.get_running_loop().call_later(
                duration, self.set_failure, FailureMode.NONE
            )

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()  # closes the listening socket synchronously
            self._server = None
        self._drop_connections(except_current=True)

    def _reopen_listener(self) -> None:
        # Listening now means connections queue in the backlog until the server accepts them.
        sock = self._listen_socket(self._host, self._port)

        async def serve() -> None:
            try:
                server = await self._serve_on(sock)
            except BaseException:
                sock.close()
                raise
            if self._stopping or self._mode is FailureMode.REFUSE:
                # Stopped or refusing again while this started (one loop turn at most).
                server.close()
                return
            self._server = server

        previous = self._listen_task
        self._listen_task = asyncio.get_running_loop().create_task(self._after(previous, serve))

    @staticmethod
    async def _after(
        previous: asyncio.Task[None] | None, work: Callable[[], Awaitable[None]]
    ) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        await work()

    # --- records -----------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every recorded request."""
        self.received.clear()

    def reset(self) -> None:
        """Forget the records, leave any failure mode, remove added latency."""
        self.clear()
        self.latency = 0.0
        self.set_failure(FailureMode.NONE)

    async def wait_for(
        self,
        count: int,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 (the documented test-helper signature)
        predicate: Callable[[ReceivedRequest], bool] | None = None,
    ) -> list[ReceivedRequest]:
        """Wait until ``count`` recorded requests match ``predicate``; return all that match."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    matches = [r for r in self.received if predicate is None or predicate(r)]
                    if len(matches) >= count:
                        return matches
                    await self._next_change()
        except TimeoutError:
            seen = [f"{r.method} {r.path} {r.http_status}" for r in self.received[-10:]]
            raise TimeoutError(
                f"waited {timeout:g} s for {count} requests, {len(matches)} matched; "
                f"last seen: {seen}"
            ) from None

    async def wait_mode(self, mode: FailureMode, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until the failure mode is ``mode`` (e.g. after ``set_failure(duration=...)``)."""
        async with asyncio.timeout(timeout):
            while self._mode is not mode:
                await self._next_change()

    async def _next_change(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    def _wake(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    def _record(self, request: ReceivedRequest) -> None:
        received = self.received
        received.append(request)
        if len(received) > self.config.max_records:
            del received[: max(1, self.config.max_records // 10)]
        self._wake()
        if self._on_request is not None:
            self._on_request(request)

    # --- HTTP --------------------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """The root of a connection's task, started by ``asyncio.start_server``."""
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # Only we cancel these tasks (stop, refuse), and the only meaning is "drop this
            # connection", which is done. Ending normally matters: asyncio.streams in Python
            # 3.11 calls task.exception() on the finished task and logs a cancelled one as an
            # unhandled error. Nothing awaits this task for its result.
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or self._stopping or self._mode is FailureMode.REFUSE:
            writer.transport.abort()  # accepted while shutting down or refusing
            return
        self._connections[task] = writer
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        graceful = True
        try:
            while True:
                try:
                    got = await self._read_request(conn, reader, writer)
                except _Refused as refused:
                    if conn.our_state is h11.SEND_RESPONSE or conn.our_state is h11.IDLE:
                        await self._write(conn, writer, refused.answer, head=False)
                    break
                if got is None:
                    break
                event, body = got
                answer, after = self._answer(event, body)
                if answer.reset:
                    graceful = False
                    break
                if answer.delay > 0:
                    await asyncio.sleep(answer.delay)
                await self._write(conn, writer, answer, head=event.method == b"HEAD")
                if after is not None:
                    after()
                if answer.close or conn.our_state is not h11.DONE:
                    break
                if conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, OSError, h11.ProtocolError):
            graceful = False  # the peer went away or spoke garbage mid-answer: nothing to say
        finally:
            self._connections.pop(task, None)
            if graceful and not writer.transport.is_closing():
                await self._close(writer)
            else:
                writer.transport.abort()

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await writer.wait_closed()
        except (TimeoutError, OSError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request, bytes] | None:
        """The next complete request and its body, or None at end of stream or idle timeout."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Refused(_BAD_REQUEST) from exc
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    go_on = h11.InformationalResponse(status_code=100, headers=[])
                    writer.write(_send(conn, go_on))
                wait = KEEPALIVE_IDLE_TIMEOUT if request is None else REQUEST_READ_TIMEOUT
                try:
                    async with asyncio.timeout(wait):
                        data = await reader.read(READ_CHUNK)
                except TimeoutError:
                    return None
                conn.receive_data(data)  # b"" is end of stream; h11 tells us if it was early
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    raise _Refused(_TOO_LARGE)
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None  # h11 guarantees Request comes first
                return request, bytes(body)
            else:  # ConnectionClosed (or PAUSED, which cannot happen before EndOfMessage)
                return None

    async def _write(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, answer: _Answer, *, head: bool
    ) -> None:
        headers = [
            (b"Server", SERVER_HEADER),
            (b"Content-Type", answer.content_type),
            (b"Content-Length", str(len(answer.body)).encode()),
        ]
        if answer.close:
            headers.append((b"Connection", b"close"))
        if answer.status == 405:
            headers.append((b"Allow", answer.allow))
        out = _send(conn, h11.Response(status_code=answer.status, headers=headers))
        if not head and answer.body:
            out += _send(conn, h11.Data(data=answer.body))
        out += _send(conn, h11.EndOfMessage())
        if writer.transport.is_closing():
            raise ConnectionResetError("connection closed before the answer")
        writer.write(out)
        await writer.drain()

    def _answer(self, event: h11.Request, body: bytes) -> tuple[_Answer, Callable[[], None] | None]:
        """Decide the answer and record the request (before any delay, so waiters see it)."""
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("utf-8", "replace")
        path, _, query = target.partition("?")
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}
        try:
            params = _params(query, body, headers.get("content-type", ""))
        except ValueError:
            return _BAD_REQUEST, None
        if path.startswith(CONTROL_PREFIX):
            return self._control(method, path, params)

        auth: AuthVerdict = "none"
        mode = self._mode
        if mode is FailureMode.HTTP_500:
            answer = _HTTP_500
        elif mode is FailureMode.HTTP_503:
            answer = _HTTP_503
        elif mode is FailureMode.HTML_404:
            answer = _html_404(path)
        elif mode is FailureMode.RESET:
            answer = _RESET
        elif mode is FailureMode.LOGIN_PAGE:
            answer = _LOGIN_PAGE
        elif mode is FailureMode.CUT_OFF_JSON:
            answer = _CUT_OFF_JSON
        elif path == self._time_path or path in self._action_paths:
            if method != "POST":
                answer = _NOT_ALLOWED
            elif path == self._time_path:
                answer = _Answer(200, self._issue_stamp().encode(), _TEXT)
            else:
                auth, answer = self._call(self._action_paths[path], params)
        else:
            answer = _html_404(path)
        if mode is FailureMode.SLOW or self.latency > 0:
            delay = self.latency + (self._delay if mode is FailureMode.SLOW else 0.0)
            answer = _Answer(
                answer.status,
                answer.body,
                answer.content_type,
                answer.code,
                answer.close,
                answer.reset,
                delay,
            )
        self._record(
            ReceivedRequest(
                method=method,
                path=path,
                params=params,
                headers=headers,
                body=body,
                auth=auth,
                answered_code=answer.code,
                http_status=answer.status,
                at=self.config.clock(),
            )
        )
        return answer, None

    # --- the API -----------------------------------------------------------------------------

    def _issue_stamp(self) -> str:
        now = self.config.clock()
        stamp = max(int(now * 1000), self._last_stamp + 1)  # unique even within a millisecond
        self._last_stamp = stamp
        if len(self._stamps) >= TIMESTAMP_PRUNE_AT:
            self._prune_stamps(now)
        value = str(stamp)
        self._stamps[value] = [now, None]
        return value

    def _prune_stamps(self, now: float) -> None:
        for value, (issued, used) in list(self._stamps.items()):
            assert issued is not None
            if (used is None and now - issued > TIMESTAMP_FRESH_SECONDS) or (
                used is not None and now - used > TIMESTAMP_USED_SECONDS
            ):
                del self._stamps[value]

    def _authenticate(self, params: Mapping[str, str]) -> tuple[AuthVerdict, _Answer | None]:
        key = self.config.api_key
        api_key = params.get("apiKey")
        if api_key is not None:
            if hmac.compare_digest(api_key.encode(), key.encode()):
                return "apikey", None
            return "bad", _AUTH_FAILED
        stamp, digest = params.get("timeStamp"), params.get("hash")
        if stamp is None or digest is None:
            return "none", _AUTH_FAILED
        expected = hashlib.sha256(f"{key}:{stamp}".encode()).hexdigest()
        # Exact lowercase match: stricter than the real server may be, so the client is
        # proven to send what the docs show.
        if not hmac.compare_digest(digest.encode(), expected.encode()):
            return "bad", _AUTH_FAILED
        state = self._stamps.get(stamp)
        now = self.config.clock()
        if state is None:
            return "bad", _EXPIRED  # never issued here (or long forgotten)
        issued, used = state
        assert issued is not None
        if used is None:
            if now - issued > TIMESTAMP_FRESH_SECONDS:
                return "bad", _EXPIRED
            state[1] = now
        elif now - used > TIMESTAMP_USED_SECONDS:
            return "bad", _EXPIRED
        return "hash", None

    def _call(self, action: Action, params: Mapping[str, str]) -> tuple[AuthVerdict, _Answer]:
        auth, refusal = self._authenticate(params)
        if refusal is not None:
            return auth, refusal
        exten = params.get("extenOrUniqueId", "")
        if not exten:
            return auth, _NEED_EXTEN
        agent = params.get("agentLoginName")
        if agent is None or agent == "":
            if action == "stop":
                return auth, _NEED_AGENT
        else:
            rights = self.config.agents.get(agent)
            if rights is None:
                return auth, _UNKNOWN_AGENT
            if action not in rights:
                return auth, _DENIED
        if exten in self.config.unknown_calls:
            return auth, _NO_CALL
        if action == "stop" and exten in self.config.not_recording:
            return auth, _NOT_RECORDING
        return auth, _DONE[action]

    # --- control API -------------------------------------------------------------------------

    def _control(
        self, method: str, path: str, params: Mapping[str, str]
    ) -> tuple[_Answer, Callable[[], None] | None]:
        name = path[len(CONTROL_PREFIX) :]
        if name == "received":
            if method != "GET":
                return _NOT_ALLOWED_GET, None
            data = [r.to_json() for r in self.received]
            return _Answer(200, json.dumps(data).encode(), _JSON), None
        if name not in ("failure", "latency", "reset"):
            return _html_404(path), None
        if method != "POST":
            return _NOT_ALLOWED, None
        try:
            if name == "reset":
                return _control_ok("reset"), self.reset
            if name == "latency":
                seconds = _seconds(params.get("seconds", "0"))

                def set_latency() -> None:
                    self.latency = seconds

                return _control_ok(f"latency {seconds:g}"), set_latency
            mode = FailureMode(params.get("mode", ""))
            delay = _seconds(params.get("delay", "0"))
            duration = _seconds(params["duration"]) if "duration" in params else None
        except ValueError as exc:
            body = json.dumps({"Message": f"bad control request: {exc}", "Code": -1}).encode()
            return _Answer(400, body, _JSON, -1), None

        def switch() -> None:
            self.set_failure(mode, delay=delay, duration=duration)

        # Switch after answering: refuse closes connections, this one included.
        answer = _control_ok(f"failure {mode.value}")
        if mode is FailureMode.REFUSE:
            answer = _Answer(answer.status, answer.body, answer.content_type, 0, close=True)
        return answer, switch


_NOT_ALLOWED_GET: Final = _Answer(
    405, b'{"Message":"Method Not Allowed","Code":-1}', _JSON, -1, allow=b"GET"
)


def _send(conn: h11.Connection, event: h11.Event) -> bytes:
    data = conn.send(event)
    assert data is not None  # None only for ConnectionClosed, which we never send
    return data


def _control_ok(what: str) -> _Answer:
    return _json_answer(f"ok: {what}", 0)


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a number of seconds >= 0")
    return value


def _params(query: str, body: bytes, content_type: str) -> dict[str, str]:
    """Query parameters, then form body parameters; the first value of a name wins."""
    params: dict[str, str] = {}
    if query:
        for name, value in parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_PARAMS):
            params.setdefault(name, value)
    if body and content_type.lower().startswith("application/x-www-form-urlencoded"):
        form = body.decode("utf-8", "replace")
        for name, value in parse_qsl(form, keep_blank_values=True, max_num_fields=MAX_PARAMS):
            params.setdefault(name, value)
    return params


# --- stand-alone process -------------------------------------------------------------------


async def run_simulator(
    *,
    listen_host: str,
    listen_port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    config: SimulatorConfig,
    record: Path | None,
    ready: Callable[[NoojeeSimulator], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (then return) or cancelled; print one JSON line per API
    request (and append it to ``record``).

    Secrets (apiKey, hash) are redacted in those lines; ``GET /_sim/received`` shows them in
    full for tests. A ``simulator.listening`` line goes to stderr once the port is bound, and
    ``ready`` (if given) is called with the running simulator.
    """
    ssl_context: ssl.SSLContext | None = None
    if tls_cert is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(tls_cert, tls_key)
    elif tls_key is not None:
        raise ValueError("tls_key needs tls_cert")
    sink: TextIO | None = record.open("a", encoding="utf-8") if record is not None else None

    def emit(request: ReceivedRequest) -> None:
        line = json.dumps(request.to_json(redact=True), separators=(",", ":"))
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if sink is not None:
            sink.write(line + "\n")
            sink.flush()

    try:
        # Handlers first: a signal that arrives right after the listening line must count.
        with _stop_signals() as stopped:
            async with await NoojeeSimulator(config, on_request=emit).start(
                listen_host, listen_port, ssl_context
            ) as simulator:
                sys.stderr.write(
                    json.dumps({"event": "simulator.listening", "base_url": simulator.base_url})
                    + "\n"
                )
                sys.stderr.flush()
                if ready is not None:
                    ready(simulator)
                signame = await stopped
                sys.stderr.write(json.dumps({"event": "simulator.stopping", "signal": signame}))
                sys.stderr.write("\n")
    finally:
        if sink is not None:
            sink.close()


@contextlib.contextmanager
def _stop_signals() -> Iterator[asyncio.Future[str]]:
    """A future set to the name of the first SIGTERM/SIGINT while the block runs. As a
    container's process 1 the simulator gets no default action for SIGTERM (the kernel drops
    it), so without a handler `docker stop` waits its whole timeout, then kills (status 137)."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()

    def on_signal(name: str) -> None:
        if not received.done():  # a second signal before the first is handled
            received.set_result(name)

    stop_signals = (signal.SIGTERM, signal.SIGINT)
    for signum in stop_signals:
        loop.add_signal_handler(signum, on_signal, signum.name)
    try:
        yield received
    finally:
        for signum in stop_signals:
            loop.remove_signal_handler(signum)
