"""The NoojeeContact client's own HTTP/1.1 transport against real sockets: what it must get
right of keep-alive, framing, limits and failures, each against a peer that does exactly the
one thing under test (the client's tests, tests/test_noojee.py, drive it over real HTTPS)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trustme

from agi_bridge.noojee import transport as transport_module
from agi_bridge.noojee.classify import MAX_RESPONSE_BYTES, exception_result
from agi_bridge.noojee.transport import MAX_HEAD_BYTES, HttpTransport
from tests.bridge_helpers import Handler, answering, peer, raw_http_server

OK = b'HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\n{"Message":"ok","Code":0}'


@pytest.fixture
async def transport() -> AsyncIterator[HttpTransport]:
    transport = HttpTransport(
        verify=False,
        limits=httpx.Limits(max_connections=2, keepalive_expiry=60),
        max_body_bytes=MAX_RESPONSE_BYTES,
    )
    yield transport
    await transport.aclose()


def post(port: int, **timeouts: float) -> httpx.Request:
    extensions = {"timeout": timeouts} if timeouts else {}
    return httpx.Request("POST", f"http://127.0.0.1:{port}/x", extensions=extensions)


async def test_a_huge_body_is_read_only_up_to_the_bound_and_the_next_request_works(
    transport: HttpTransport,
) -> None:
    """A 2 MB error page: the client keeps MAX_RESPONSE_BYTES of it (a hostile or broken
    server cannot make it buffer megabytes), and the next request, on a new connection since
    that one was not read to its end, is answered normally."""
    page = b"<html>" + b"x" * 2_000_000
    huge = b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(page), page)
    fine = b'HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\n{"Message":"ok","Code":0}'
    async with raw_http_server(huge, fine) as port:
        url = f"http://127.0.0.1:{port}/x"
        first = await transport.handle_async_request(httpx.Request("POST", url))
        second = await transport.handle_async_request(httpx.Request("POST", url))
    assert first.status_code == 500
    assert first.content == page[:MAX_RESPONSE_BYTES]
    assert (second.status_code, second.content) == (200, b'{"Message":"ok","Code":0}')


async def test_a_compressed_body_is_passed_on_raw_never_inflated(
    transport: HttpTransport,
) -> None:
    """We ask for identity; a server that gzips anyway (here 10 MB of zeros in ~10 KB) gets
    its bytes passed on as they are: inflating them would buffer megabytes past the bound."""
    bomb = gzip.compress(b"\0" * 10_000_000)
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb)
    async with raw_http_server(answer + bomb) as port:
        url = f"http://127.0.0.1:{port}/x"
        response = await transport.handle_async_request(httpx.Request("POST", url))
    assert response.content == bomb[:MAX_RESPONSE_BYTES]
    assert "content-encoding" not in response.headers


async def test_a_connection_is_kept_alive_for_the_next_request(transport: HttpTransport) -> None:
    async with peer(answering(OK)) as server:
        for _ in range(3):
            response = await transport.handle_async_request(post(server.port))
            assert response.status_code == 200
    assert server.connections == 1


async def test_connection_close_is_honoured(transport: HttpTransport) -> None:
    closing = OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    async with peer(answering(closing)) as server:
        for _ in range(2):
            response = await transport.handle_async_request(post(server.port))
            assert response.content == b'{"Message":"ok","Code":0}'
    assert server.connections == 2


async def test_an_http_1_0_answer_is_not_kept_alive(transport: HttpTransport) -> None:
    old = OK.replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    async with peer(answering(old)) as server:
        for _ in range(2):
            await transport.handle_async_request(post(server.port))
    assert server.connections == 2


async def test_a_body_that_ends_with_the_connection_is_read_whole(
    transport: HttpTransport,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        await writer.drain()
        writer.write(b'{"Message":"ok",')
        writer.write(b'"Code":0}')

    async with peer(handler) as server:
        response = await transport.handle_async_request(post(server.port))
    assert response.content == b'{"Message":"ok","Code":0}'


async def test_an_answer_cut_short_is_a_read_error(transport: HttpTransport) -> None:
    """The length says 100, ten bytes come, then the end: not an answer, and not one that
    never started either (the request may have been acted on)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()

    async with peer(handler) as server:
        with pytest.raises(httpx.ReadError):
            await transport.handle_async_request(post(server.port))


async def test_a_close_before_any_answer_says_so(transport: HttpTransport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    async with peer(handler) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await transport.handle_async_request(post(server.port))


async def test_an_informational_answer_is_skipped(transport: HttpTransport) -> None:
    async with peer(answering(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as server:
        response = await transport.handle_async_request(post(server.port))
    assert (response.status_code, response.content) == (200, b'{"Message":"ok","Code":0}')


async def test_garbage_is_a_protocol_error(transport: HttpTransport) -> None:
    async with peer(answering(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="not an HTTP answer"):
            await transport.handle_async_request(post(server.port))


async def test_bytes_nobody_asked_for_drop_the_connection(transport: HttpTransport) -> None:
    """An answer followed by bytes of no request: the connection is out of step, and the next
    request goes on a new one, where it gets its own answer."""
    async with peer(answering(OK + b"HTTP/1.1 500 Stray\r\nContent-Length: 0\r\n\r\n")) as server:
        first = await transport.handle_async_request(post(server.port))
        second = await transport.handle_async_request(post(server.port))
    assert (first.status_code, second.status_code) == (200, 200)
    assert server.connections == 2


def late_on_the_first_connection(
    release: asyncio.Event, seen: asyncio.Event | None = None
) -> Handler:
    """The first connection answers only once ``release`` is set, with a 500 (``seen`` is set
    when its request has come); any other answers at once, 200."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            await reader.readuntil(b"\r\n\r\n")
            if seen is not None:
                seen.set()
            await release.wait()
            writer.write(b"HTTP/1.1 500 Late\r\nContent-Length: 0\r\n\r\n")
        await answering(OK)(reader, writer)

    return handler


async def test_no_answer_within_the_read_timeout(transport: HttpTransport) -> None:
    """Within the timeout and a generous margin; the connection is dropped, so its late answer
    cannot be read as the next request's."""
    release = asyncio.Event()
    async with peer(late_on_the_first_connection(release)) as server:
        with pytest.raises(httpx.ReadTimeout):
            await asyncio.wait_for(
                transport.handle_async_request(post(server.port, read=0.2)), timeout=5
            )
        release.set()
        response = await transport.handle_async_request(post(server.port))
    assert response.status_code == 200
    assert server.connections == 2


async def test_a_cancelled_request_drops_its_connection(transport: HttpTransport) -> None:
    release, seen = asyncio.Event(), asyncio.Event()
    async with peer(late_on_the_first_connection(release, seen)) as server:
        request = asyncio.create_task(transport.handle_async_request(post(server.port)))
        await seen.wait()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        release.set()
        response = await transport.handle_async_request(post(server.port))
    assert response.status_code == 200
    assert server.connections == 2


async def test_at_the_limit_a_request_waits_for_a_connection() -> None:
    """One connection allowed: the second request waits for the first's to be free, then goes
    on it; with a pool timeout shorter than that wait it gives up, saying so."""
    release = asyncio.Event()
    seen = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            seen.set()
            await release.wait()
            writer.write(OK)
            await writer.drain()

    transport = HttpTransport(
        verify=False, limits=httpx.Limits(max_connections=1), max_body_bytes=MAX_RESPONSE_BYTES
    )
    try:
        async with peer(handler) as server:
            first = asyncio.create_task(transport.handle_async_request(post(server.port)))
            await seen.wait()
            with pytest.raises(httpx.PoolTimeout):
                await transport.handle_async_request(post(server.port, pool=0.1))
            second = asyncio.create_task(transport.handle_async_request(post(server.port)))
            release.set()
            responses = await asyncio.gather(first, second)
        assert [r.status_code for r in responses] == [200, 200]
        assert server.connections == 1
    finally:
        await transport.aclose()


async def test_a_header_that_would_split_the_request_is_refused(
    transport: HttpTransport,
) -> None:
    """httpx passes a value with CR LF as it is: written, it would be a header of its own."""
    async with peer(answering(OK)) as server:
        request = httpx.Request(
            "POST", f"http://127.0.0.1:{server.port}/x", headers={"X": "a\r\nInjected: 1"}
        )
        with pytest.raises(httpx.LocalProtocolError):
            await transport.handle_async_request(request)
    assert server.connections == 0


async def test_a_refused_connection_is_a_connect_error(transport: HttpTransport) -> None:
    async with peer(answering(OK)) as server:
        port = server.port
    with pytest.raises(httpx.ConnectError) as raised:
        await transport.handle_async_request(post(port))
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)


async def test_a_closed_transport_opens_nothing(transport: HttpTransport) -> None:
    await transport.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(post(1))


def endless_after(prefix: bytes) -> Handler:
    """Answer ``prefix``, then a header line that never ends."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(prefix + b"X-Endless: ")
        while True:
            writer.write(b"x" * 16384)
            await writer.drain()

    return handler


async def test_an_endless_head_is_refused(transport: HttpTransport) -> None:
    """A header that never ends: refused once the head passes its bound, not buffered on."""
    async with peer(endless_after(b"HTTP/1.1 200 OK\r\n")) as server:
        with pytest.raises(httpx.RemoteProtocolError, match=f"over {MAX_HEAD_BYTES} bytes"):
            await transport.handle_async_request(post(server.port))


async def test_idle_connections_expire_unless_told_never_to() -> None:
    """An idle connection older than keepalive_expiry is not used again; with None, it is."""
    for expiry, connections in ((0.0, 2), (None, 1)):
        transport = HttpTransport(
            verify=False,
            limits=httpx.Limits(keepalive_expiry=expiry),
            max_body_bytes=MAX_RESPONSE_BYTES,
        )
        try:
            async with peer(answering(OK)) as server:
                for _ in range(2):
                    await transport.handle_async_request(post(server.port))
            assert server.connections == connections
        finally:
            await transport.aclose()


async def test_only_http_and_https_are_spoken(transport: HttpTransport) -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        await transport.handle_async_request(httpx.Request("POST", "ftp://127.0.0.1/x"))


# --- what a review found: each of these failed before its fix ----------------------------


async def test_a_stray_answer_split_across_reads_never_answers_the_next_request(
    transport: HttpTransport,
) -> None:
    """The answer, then the start of one nobody asked for; its end comes only after the next
    request: on the same connection it would complete as that request's answer."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections > 1:
            await answering(OK)(reader, writer)
            return
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK + b"HTTP/1.1 500 Stray\r\nContent-Length: 0\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # a second request on this connection: a bug
        writer.write(b"\r\n" + OK)
        await writer.drain()

    async with peer(handler) as server:
        first = await transport.handle_async_request(post(server.port))
        second = await transport.handle_async_request(post(server.port))
    assert (first.status_code, second.status_code) == (200, 200)
    assert server.connections == 2


async def test_trailers_are_neither_headers_nor_unbounded(transport: HttpTransport) -> None:
    """Trailers after a chunked body are dropped; an endless one is refused like a long head
    (httptools buffers it whole, however long)."""
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
    async with peer(answering(chunked + b"X-Trailer: t\r\n\r\n")) as server:
        response = await transport.handle_async_request(post(server.port))
    assert response.content == b"ok"
    assert "x-trailer" not in response.headers
    async with peer(endless_after(chunked)) as server:
        with pytest.raises(httpx.RemoteProtocolError, match=f"over {MAX_HEAD_BYTES} bytes"):
            await transport.handle_async_request(post(server.port))


async def test_a_body_of_exactly_the_bound_keeps_its_connection() -> None:
    body = b"x" * 100
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + body
    transport = HttpTransport(verify=False, limits=httpx.Limits(), max_body_bytes=100)
    try:
        async with peer(answering(answer)) as server:
            for _ in range(2):
                response = await transport.handle_async_request(post(server.port))
                assert response.content == body
        assert server.connections == 1
    finally:
        await transport.aclose()


async def test_aclose_ends_requests_in_flight_and_waiting_and_leaves_nothing_open() -> None:
    """One request waits for its answer, one for a connection: both end with an error that
    says the transport closed, and no connection is left or made afterwards."""
    seen = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        seen.set()
        await reader.read()  # until the bridge's side closes

    transport = HttpTransport(
        verify=False, limits=httpx.Limits(max_connections=1), max_body_bytes=MAX_RESPONSE_BYTES
    )
    async with peer(handler) as server:
        in_flight = asyncio.create_task(transport.handle_async_request(post(server.port)))
        await seen.wait()
        waiting = asyncio.create_task(transport.handle_async_request(post(server.port)))
        await _until_waiting_for_a_slot(transport)
        await transport.aclose()
        with pytest.raises(httpx.ReadError, match="transport was closed"):
            await in_flight
        with pytest.raises(RuntimeError, match="closed"):
            await waiting
    assert server.connections == 1


async def _until_waiting_for_a_slot(transport: HttpTransport, count: int = 1) -> None:
    """Return once ``count`` requests of ``transport`` have queued for a slot: a callback
    scheduled after the tasks created so far have run to their first wait (the loop runs
    callbacks in the order they were scheduled)."""
    queued = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(queued.set_result, None)
    await queued
    assert len(transport._slot_waiters) == count


@pytest.fixture
async def one_slot() -> AsyncIterator[HttpTransport]:
    """A transport whose single slot is taken (by the test)."""
    transport = HttpTransport(
        verify=False, limits=httpx.Limits(max_connections=1), max_body_bytes=MAX_RESPONSE_BYTES
    )
    await transport._take_slot(asyncio.get_running_loop(), None)
    yield transport
    await transport.aclose()


async def two_waiters(transport: HttpTransport) -> tuple[asyncio.Task[None], ...]:
    """Two requests queued for a slot, in this order."""
    loop = asyncio.get_running_loop()
    waiters = []
    for count in (1, 2):
        waiters.append(asyncio.create_task(transport._take_slot(loop, None)))
        await _until_waiting_for_a_slot(transport, count)
    return tuple(waiters)


async def test_slots_go_in_turn_not_to_whoever_asks_last(one_slot: HttpTransport) -> None:
    first, later = await two_waiters(one_slot)
    one_slot._give_slot()
    await first
    assert not later.done()
    one_slot._give_slot()
    await later
    assert one_slot._in_use == 1


async def test_a_waiter_cancelled_as_a_slot_frees_leaves_no_trace(one_slot: HttpTransport) -> None:
    """Cancelled, then its waiter taken off by the slot's release before it runs: it ends
    cancelled (not with the deque's ValueError) and the slot goes to the next."""
    cancelled, after = await two_waiters(one_slot)
    cancelled.cancel()
    one_slot._give_slot()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await after
    assert (one_slot._in_use, list(one_slot._slot_waiters)) == (1, [])


async def test_a_waiter_handed_a_slot_as_it_is_cancelled_passes_it_on(
    one_slot: HttpTransport,
) -> None:
    cancelled, after = await two_waiters(one_slot)
    one_slot._give_slot()  # to the first waiter, which has not run yet
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await after
    assert (one_slot._in_use, list(one_slot._slot_waiters)) == (1, [])


async def test_the_pool_timeout_bounds_the_whole_wait(one_slot: HttpTransport) -> None:
    """Within the pool timeout and a generous margin, however many times a slot frees and
    goes to someone queued first."""
    loop = asyncio.get_running_loop()
    ahead = asyncio.create_task(one_slot._take_slot(loop, None))
    await _until_waiting_for_a_slot(one_slot)
    with pytest.raises(httpx.PoolTimeout):
        await asyncio.wait_for(one_slot._take_slot(loop, 0.2), timeout=5)
    one_slot._give_slot()
    await ahead


async def test_a_name_with_a_dead_first_address_connects_to_the_next(
    transport: HttpTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first address never answers (a listener whose queue is full drops the SYN); the
    second is tried after HAPPY_EYEBALLS_DELAY, well within the connect timeout, as aiohttp
    did, rather than after it."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)  # room for one connection not accepted yet: the filler's
    filler = [socket.create_connection(full.getsockname())]
    try:
        async with peer(answering(OK)) as server:
            loop = asyncio.get_running_loop()
            addresses = [full.getsockname(), ("127.0.0.1", server.port)]

            async def resolve(*_: object, **__: object) -> list[tuple[Any, ...]]:
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", a) for a in addresses]

            monkeypatch.setattr(loop, "getaddrinfo", resolve)
            request = httpx.Request(
                "POST",
                "http://noojee.test/x",
                extensions={"timeout": {"connect": 5.0}},
            )
            response = await transport.handle_async_request(request)
        assert response.status_code == 200
    finally:
        for sock in (*filler, full):
            sock.close()


async def test_what_the_transport_refuses_to_write_was_never_sent(
    transport: HttpTransport,
) -> None:
    """A request the transport will not put on the wire is, to the client, one that never left
    (a start may be tried again), like a refused connection."""
    refused = []
    for request in (
        httpx.Request("POST", "ftp://127.0.0.1/x"),
        httpx.Request("POST", "http://127.0.0.1:1/x", headers={"X": "a\r\nInjected: 1"}),
    ):
        with pytest.raises(httpx.TransportError) as raised:
            await transport.handle_async_request(request)
        refused.append(exception_result(raised.value, None, httpx.Timeout(1.0)))
    assert [result.unsent for result in refused] == [True, True]


# --- what a second review found ----------------------------------------------------------


async def test_a_server_that_speaks_first_and_hangs_up_never_fills_the_pool(
    tls_ca: trustme.CA,
) -> None:
    """An overloaded server answers 503 the moment the TLS handshake ends, then closes: its
    bytes can close the connection before the connect returns it, and that connection must
    not take a place in the limit (with one place, every later request then failed with a
    ValueError, read as "may have been sent")."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.maximum_version = ssl.TLSVersion.TLSv1_2  # the answer rides with the handshake's end
    tls_ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    tls_ca.configure_trust(client)
    listener = socket.create_server(("127.0.0.1", 0))
    busy = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    over = threading.Event()

    def serve() -> None:
        while True:
            connection, _ = listener.accept()
            if over.is_set():
                connection.close()
                return
            with (
                contextlib.suppress(OSError),
                connection,
                server.wrap_socket(connection, server_side=True) as tls,
            ):
                tls.sendall(busy)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    transport = HttpTransport(
        verify=client, limits=httpx.Limits(max_connections=1), max_body_bytes=MAX_RESPONSE_BYTES
    )
    port = listener.getsockname()[1]
    outcomes: list[int | str] = []
    try:
        for _ in range(10):
            request = httpx.Request(
                "POST", f"https://127.0.0.1:{port}/x", extensions={"timeout": {"pool": 1.0}}
            )
            try:
                outcomes.append((await transport.handle_async_request(request)).status_code)
            except httpx.TransportError as exc:
                outcomes.append(type(exc).__name__)
        assert not [c for c in transport._connections if c.closed]
    finally:
        await transport.aclose()
        over.set()
        socket.create_connection(listener.getsockname()).close()  # accept() returns, and ends
        await asyncio.to_thread(thread.join, 5)
        listener.close()
    assert set(outcomes) <= {503, "ConnectError", "RemoteProtocolError"}, outcomes


async def test_a_connect_cancelled_as_its_handshake_ends_leaves_no_descriptor_behind(
    server_ssl_context: ssl.SSLContext, tls_ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled just as the TLS handshake completes, the connection is ended through its
    transport, which owns the socket: closing the descriptor under it (still registered with
    the loop while TLS shuts down) made the next connect fail with the loop's RuntimeError."""
    client = ssl.create_default_context()
    tls_ca.configure_trust(client)
    to_cancel: list[asyncio.Task[httpx.Response]] = []

    class CancelledAsMade(transport_module._Connection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            while to_cancel:
                to_cancel.pop().cancel()

    monkeypatch.setattr(transport_module, "_Connection", CancelledAsMade)
    server = await asyncio.start_server(answering(OK), "127.0.0.1", 0, ssl=server_ssl_context)
    transport = HttpTransport(
        verify=client, limits=httpx.Limits(max_connections=4), max_body_bytes=MAX_RESPONSE_BYTES
    )
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"
    try:
        first = asyncio.create_task(transport.handle_async_request(httpx.Request("POST", url)))
        to_cancel.append(first)
        with pytest.raises(asyncio.CancelledError):
            await first
        response = await transport.handle_async_request(httpx.Request("POST", url))
        assert response.status_code == 200
    finally:
        await transport.aclose()
        server.close()
