"""An httpx transport for the NoojeeContact client: HTTP/1.1 keep-alive connections, each
carrying one request at a time, the answers parsed by httptools (llhttp, Node.js's parser, in C).

The client sends one kind of request to one server: a POST with an empty body, answered by a
few dozen bytes. What that needs of HTTP is framing done right (Content-Length, chunked, a body
that ends with the connection, 1xx, keep-alive or not), which is llhttp's, and a pool of
connections, which is what this module adds: an asyncio.Protocol per connection, no streams, no
task per request, one timer per request.

Why not aiohttp (the transport until issue 19's eleventh round): its client machinery (session,
request and response objects, header multidicts, its own timers) did for a 50-byte answer what
we then undid to hand httpx a response. ``NoojeeClient.send`` cost 84 us of CPU per request on
it against 54 us on this one, same TLS, same loop (``bench/http_client.py --aiohttp-transport``);
a sync stop went from 0.24 to 0.15 ms (bench/README.md, "Eleventh round"). Why not httpcore
(httpx's own): over ten times aiohttp's.

Errors are httpx's, chosen for what they tell the client (agi_bridge.noojee.classify): a
ConnectError, ConnectTimeout or PoolTimeout means no byte of the request left, so a start may be
tried again; anything after the request was written may have reached NoojeeContact.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import ssl
from collections import deque
from operator import attrgetter
from typing import Final

import aiohappyeyeballs
import httptools
import httpx

# What httpx reports as the protocol of a response (this transport speaks HTTP/1.1 only).
_EXTENSIONS: Final = {"http_version": b"HTTP/1.1"}
# httpx's default port for each scheme (a URL without one), and the schemes we speak.
_DEFAULT_PORTS: Final = {"https": 443, "http": 80}
# What an answer may hold besides its body: the status line, headers, chunk framing and
# trailers. NoojeeContact's are a few hundred bytes, and aiohttp allowed 128 header lines of
# 8 KiB. More is a broken or hostile server: httptools would not stop it (it buffers a header
# or a trailer however long), this does.
MAX_HEAD_BYTES: Final = 64 * 1024
# How long the first address of a name that resolves to several (IPv6 and IPv4, say) is given
# before the next is tried alongside (RFC 8305's recommended 250 ms, aiohttp's default): a
# broken IPv6 route must not cost the whole connect timeout.
HAPPY_EYEBALLS_DELAY: Final = 0.25

Origin = tuple[str, str, int]  # scheme, host, port


def _whole_response(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, request: httpx.Request
) -> httpx.Response:
    """The response as ``httpx.Response(content=body)`` gives it (read, closed), without
    running the body through httpx's decoders again: that costs 13 us per request, a body
    already read whole and never decompressed needs none of it. tests/test_noojee.py checks
    it against a response httpx builds itself
    (test_a_response_is_the_one_httpx_builds_from_the_same_answer)."""
    # The headers as httpx.Headers holds them (raw name, lowercased name, value), given
    # whole: from a list, httpx normalises each name and value in a Python call of its own,
    # and checks the list against an abstract Mapping first (eight calls for three headers).
    parsed = httpx.Headers.__new__(httpx.Headers)
    parsed._list = [(name, name.lower(), value) for name, value in headers]
    parsed._encoding = None  # found from the bytes when asked, as httpx does
    response = httpx.Response(
        status,
        headers=parsed,
        stream=httpx.ByteStream(body),
        request=request,
        extensions=_EXTENSIONS,
    )
    response._content = body
    response.is_stream_consumed = response.is_closed = True
    return response


class _Answer:
    """What the connection has read of the current answer."""

    __slots__ = ("body", "complete", "headers", "size", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False  # headers read (the body follows)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to one origin; one request at a time."""

    def __init__(
        self, pool: HttpTransport, origin: Origin, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._pool = pool
        self.origin = origin
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._answer = _Answer()
        self._waiter: asyncio.Future[_Answer] | None = None
        self._received = 0  # bytes of the current answer
        self.reusable = True  # open, in step, and keep-alive
        self.closed = False
        self.idle_since = 0.0

    # --- the transport's side -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: this connection is out of step
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:  # also an upgrade (101), which we never ask
            self.fail(httpx.RemoteProtocolError(f"not an HTTP answer: {exc}"), exc)
            return
        if self._received - self._answer.size > MAX_HEAD_BYTES and not waiter.done():
            message = f"answer's head, framing and trailers over {MAX_HEAD_BYTES} bytes"
            self.fail(httpx.RemoteProtocolError(message), None)

    def eof_received(self) -> bool:
        self.reusable = False  # idle, it must not be handed out before connection_lost
        return False  # the transport closes: connection_lost decides what the end means

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        answer = self._answer
        if answer.complete and exc is None and _ends_with_connection(answer):
            self._finish()  # HTTP/1.0 style: the body ends when the server closes
        elif not self._received:
            message = "Server disconnected without sending a response."
            self.fail(httpx.RemoteProtocolError(message), exc)
        else:
            self.fail(httpx.ReadError("the connection closed in the middle of the answer"), exc)

    # --- httptools' callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # A second answer in the same bytes, or its first bytes: this connection is out of
            # step (the rest of it must not complete as the next request's answer).
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        answer = self._answer
        if not answer.complete:  # not a trailer: those are dropped
            answer.headers.append((name, value))

    def on_headers_complete(self) -> None:
        answer = self._answer
        answer.status = self._parser.get_status_code()
        answer.complete = True

    def on_body(self, chunk: bytes) -> None:
        answer = self._answer
        room = self._pool.max_body_bytes - answer.size
        if len(chunk) <= room:
            answer.body.append(chunk)
            answer.size += len(chunk)
        else:
            # The rest is not read: the answer is what fits, and the connection goes.
            answer.body.append(chunk[:room])
            answer.size += room
            self._finish()
            self.close()

    def on_message_complete(self) -> None:
        if self._answer.status < 200:
            self._answer = _Answer()  # 1xx: informational, the answer follows
            return
        if not self._parser.should_keep_alive():
            self.reusable = False
        self._finish()

    # --- the request's side ---------------------------------------------------------------

    async def exchange(self, data: bytes, read_timeout: float | None) -> _Answer:
        """Send ``data`` (a whole request) and wait for the whole answer, at most
        ``read_timeout`` seconds."""
        assert self.transport is not None
        waiter: asyncio.Future[_Answer] = self._loop.create_future()
        self._waiter = waiter
        self._answer = _Answer()
        self._received = 0
        timer = (
            None
            if read_timeout is None
            else self._loop.call_later(read_timeout, self._expire, read_timeout)
        )
        self.transport.write(data)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    def _expire(self, seconds: float) -> None:
        self.fail(httpx.ReadTimeout(f"no answer within {seconds:g} s"), None)

    def _finish(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self._answer)
            # Whatever else these bytes hold is parsed into another, never into the answer.
            self._answer = _Answer()

    def fail(self, error: httpx.TransportError, cause: BaseException | None = None) -> None:
        """Close, and the request waiting for an answer here (if any) gets ``error``."""
        self.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            error.__cause__ = cause
            waiter.set_exception(error)

    def close(self) -> None:
        self.reusable = False
        if not self.closed:
            self.closed = True
            self._pool.closed(self)
            if self.transport is not None:
                self.transport.close()


class HttpTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections, at most ``limits.max_connections`` open, an idle one
    reused for at most ``limits.keepalive_expiry`` seconds.

    Bodies are read whole, up to ``max_body_bytes`` (the rest is dropped with the
    connection), so the response handed back is complete and needs no closing; they are
    never decompressed (we ask for identity, and a Content-Encoding is dropped: httpx would
    inflate the bytes whole, and a few KiB of gzip can become megabytes past the bound).

    httpx's timeouts (the request's ``timeout`` extension): ``connect`` bounds the TCP connect
    and the TLS handshake, ``pool`` the wait for a connection at the limit, ``read`` the whole
    answer from the moment the request is written (an answer of a few dozen bytes comes in one
    read, so per read and in all are the same here); ``write`` is not used: the request is
    handed to the socket whole, and a server that does not read it does not answer either.
    """

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool,
        limits: httpx.Limits,
        max_body_bytes: int,
        headers: httpx.Headers | None = None,
    ) -> None:
        """``headers``: those every request of the caller carries; their bytes are built once
        and sent for any request that carries exactly these (a request with others sends its
        own)."""
        self._usual_headers: Final = None if headers is None else list(headers._list)
        self._usual_block: Final = b"" if headers is None else _header_block(headers.raw)
        if isinstance(verify, ssl.SSLContext):
            context = verify
        else:
            context = ssl.create_default_context()  # the system's CAs, as aiohttp and curl
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        self._ssl: Final = context
        self._max_connections: Final = limits.max_connections or 0  # 0: no limit
        expiry = limits.keepalive_expiry
        self._keepalive: Final = math.inf if expiry is None else expiry
        self.max_body_bytes: Final = max_body_bytes
        self._idle: dict[Origin, deque[_Connection]] = {}  # the last released on the right
        self._connections: set[_Connection] = set()
        self._connecting = 0
        # Requests hold a slot from before they take a connection until they give it back;
        # at the limit a freed slot passes to the longest waiting, in turn.
        self._in_use = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._check_open()
        loop = asyncio.get_running_loop()
        url = request.url
        scheme = url.scheme
        default_port = _DEFAULT_PORTS.get(scheme)
        if default_port is None:
            raise httpx.UnsupportedProtocol(f"not an http(s) URL: {scheme!r}")
        origin = (scheme, url.raw_host.decode("ascii"), url.port or default_port)
        phases = request.extensions.get("timeout", {})
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            # A body in memory (our client's: an empty one), taken from its stream.
            data = self._request_bytes(request, url.raw_path, bytes(stream._stream))
        else:
            data = self._request_bytes(request, url.raw_path, await request.aread(), whole=False)
        await self._take_slot(loop, phases.get("pool"))
        try:
            connection = await self._connection(loop, origin, phases.get("connect"))
            try:
                answer = await connection.exchange(data, phases.get("read"))
            except BaseException:
                connection.close()  # cancelled or failed: a late answer must not meet the next
                raise
            self._release(loop, connection)
        finally:
            self._give_slot()
        headers = answer.headers
        if any(name.lower() == b"content-encoding" for name, _ in headers):
            headers = [h for h in headers if h[0].lower() != b"content-encoding"]
        return _whole_response(answer.status, headers, b"".join(answer.body), request)

    def _check_open(self) -> None:
        if self._closed:
            # A late caller after shutdown must not open connections nobody will close.
            raise RuntimeError("the NoojeeContact transport is closed")

    def _request_bytes(
        self, request: httpx.Request, target: bytes, body: bytes, *, whole: bool = True
    ) -> bytes:
        """The request as it goes on the wire; ``whole``: the body as the request's headers
        frame it (else it was streamed, and is sent whole now, with its length)."""
        if _TOKEN(target) is None:
            raise httpx.LocalProtocolError(f"not a request target: {target!r}")
        if whole and request.headers._list == self._usual_headers:
            block = self._usual_block
        else:
            raw = request.headers.raw
            if body or not whole:
                framing = (b"content-length", b"transfer-encoding")
                raw = [(name, value) for name, value in raw if name.lower() not in framing]
                raw.append((b"Content-Length", b"%d" % len(body)))
            block = _header_block(raw)
        method = request.method.encode("ascii")
        return b"%s %s HTTP/1.1\r\n%s\r\n%s" % (method, target, block, body)

    async def _take_slot(self, loop: asyncio.AbstractEventLoop, within: float | None) -> None:
        """A slot, at once when fewer than the limit are in use and nobody waits; else the
        next freed, within ``within`` seconds in all: PoolTimeout."""
        limit = self._max_connections
        if not self._slot_waiters and (not limit or self._in_use < limit):
            self._in_use += 1
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout(within):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give_slot()  # handed one just as we gave up: it passes on
            else:
                with contextlib.suppress(ValueError):  # or already taken off by _give_slot
                    self._slot_waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(f"no free connection within {within:g} s") from exc
            raise
        # Handed a slot: _in_use already counts it.

    def _give_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot is the waiter's now
                return
        self._in_use -= 1

    async def _connection(
        self, loop: asyncio.AbstractEventLoop, origin: Origin, connect_within: float | None
    ) -> _Connection:
        """With a slot in hand: an idle connection to ``origin``, or a new one."""
        self._check_open()
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.reusable and loop.time() - connection.idle_since < self._keepalive:
                return connection
            connection.close()
        limit = self._max_connections
        if limit and len(self._connections) + self._connecting >= limit:
            # Fewer than the limit are busy (this request holds a slot and no connection), so
            # the others are idle, to other origins: the one idle longest makes room.
            oldest = min(
                (queue[0] for queue in self._idle.values() if queue),
                key=attrgetter("idle_since"),
                default=None,
            )
            if oldest is not None:
                oldest.close()
        connection = await self._connect(loop, origin, connect_within)
        if self._closed:  # closed while this one was being made
            connection.close()
            self._check_open()
        return connection

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, origin: Origin, within: float | None
    ) -> _Connection:
        scheme, host, port = origin
        context = self._ssl if scheme == "https" else None
        self._connecting += 1
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(within):
                sock = await _socket_to(loop, host, port)
                try:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(self, origin, loop),
                        sock=sock,
                        ssl=context,
                        server_hostname=host if context is not None else None,
                    )
                except BaseException:
                    # The transport made of sock owns it and closes it: closing the descriptor
                    # here would free its number under a transport still registered with the
                    # loop (asyncio's TLS one shutting down politely). End the connection.
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    raise
        except BaseException as exc:
            if connection is not None:
                connection.close()  # made just as the wait ended
            if isinstance(exc, TimeoutError) and exc.errno is None:  # ours, not ETIMEDOUT
                raise httpx.ConnectTimeout(f"no connection within {within:g} s") from exc
            if isinstance(exc, OSError):  # refused, unreachable, unknown host, TLS, certificate
                raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
            raise
        finally:
            self._connecting -= 1
        if connection.closed:  # the server spoke or hung up before it was asked anything
            raise httpx.ConnectError("the server closed the connection as it was made")
        self._connections.add(connection)
        return connection

    def _release(self, loop: asyncio.AbstractEventLoop, connection: _Connection) -> None:
        if not connection.reusable:
            connection.close()
            return
        connection.idle_since = loop.time()
        idle = self._idle.get(connection.origin)
        if idle is None:
            idle = self._idle[connection.origin] = deque()
        idle.append(connection)

    def closed(self, connection: _Connection) -> None:
        """``connection`` closed: it is neither open nor idle any more."""
        self._connections.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    async def aclose(self) -> None:
        """Close every connection; requests still waiting for a slot or an answer fail."""
        self._closed = True
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError("the NoojeeContact transport is closed"))
        for connection in tuple(self._connections):
            connection.fail(httpx.ReadError("the transport was closed before the answer came"))


async def _socket_to(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected socket to ``host``: its addresses tried as RFC 8305 says (Happy Eyeballs),
    as aiohttp does, since loop.create_connection on uvloop tries them one after another."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    try:
        return await aiohappyeyeballs.start_connection(
            infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
        )
    except RuntimeError as exc:  # what the loop says of a descriptor it still watches
        raise OSError(f"cannot connect: {exc}") from exc


# What a request target may hold: visible ASCII, no space or control (httpx's parser allows no
# other, and the client's own query is percent-encoded); anything else could split the request.
_TOKEN: Final = re.compile(rb"[\x21-\x7e]+").fullmatch
# What a header name or value may hold on one line (RFC 9110 field-value: no CR, LF or NUL).
_FIELD: Final = re.compile(rb"[^\r\n\0]*").fullmatch


def _header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """``name: value`` lines, each ended by CRLF, as HTTP/1.1 writes them."""
    for name, value in headers:
        if not name or _TOKEN(name) is None or b":" in name or _FIELD(value) is None:
            raise httpx.LocalProtocolError(f"not a header line: {name!r}")
    return b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)


def _ends_with_connection(answer: _Answer) -> bool:
    """Whether the answer's body is framed by the end of the connection (neither a length
    nor chunks), so that a clean close completes it rather than cutting it short."""
    names = {name.lower() for name, _ in answer.headers}
    return b"content-length" not in names and b"transfer-encoding" not in names
