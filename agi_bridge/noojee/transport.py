"""An httpx transport over aiohttp's connection pool, cut to what the NoojeeContact client needs.

Why not httpcore (httpx's own transport): its pool costs about twice the CPU per request and
re-scans its queue for every request, which a hangup burst turns into seconds of hold time.
Why not the ``httpx-aiohttp`` package: it wraps every response body in an async generator
behind httpx's streaming layer (a cost per request for a 50-byte answer) and maps every
``aiohttp.ClientConnectionError`` (refused, reset, server gone) to ``httpx.ConnectTimeout``.
This one reads the body, bounded, before it returns, and maps aiohttp's errors to the httpx
exception that says what happened, with the socket or TLS error chained as the cause.
``bench/http_client.py`` measures the three.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Sequence
from typing import Final

import aiohttp
import httpx

# What httpx reports as the protocol of a response (aiohttp speaks HTTP/1.1 only).
_EXTENSIONS: Final = {"http_version": b"HTTP/1.1"}


def _mapped(exc: aiohttp.ClientError | TimeoutError) -> httpx.TransportError:
    """The httpx exception for an aiohttp one, its cause set to the error that says why (not
    aiohttp's TLS errors: they subclass ssl's but lack their fields). Order matters: aiohttp's
    classes overlap (a connect timeout is also a ServerTimeoutError, a certificate error a
    ConnectorError)."""
    mapped: httpx.TransportError
    cause: BaseException = exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        mapped = httpx.ConnectTimeout(str(exc) or "connect timeout")
    elif isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        mapped = httpx.ReadTimeout(str(exc) or "read timeout")
    elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
        mapped = httpx.ConnectError(str(exc))
        cause = exc.certificate_error  # ssl.SSLCertVerificationError, with its reason
    elif isinstance(exc, aiohttp.ClientConnectorError):
        mapped = httpx.ConnectError(str(exc))
        cause = exc.os_error  # ECONNREFUSED, or the ssl.SSLError of a failed handshake
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        mapped = httpx.RemoteProtocolError("Server disconnected without sending a response.")
    elif isinstance(exc, aiohttp.ClientResponseError):
        mapped = httpx.RemoteProtocolError(str(exc))  # not HTTP: a garbage status line
    else:
        mapped = httpx.ReadError(str(exc) or type(exc).__name__)  # reset, payload error...
    mapped.__cause__ = cause
    return mapped


def _whole_response(
    status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes, request: httpx.Request
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


@functools.lru_cache(maxsize=8)
def _client_timeout(
    connect: float | None, read: float | None, pool: float | None
) -> aiohttp.ClientTimeout:
    """aiohttp's timeouts for httpx's phases, built once per set of values (a client sends
    every request with the same ones; building them cost 1.9 us a request)."""
    # aiohttp's "connect" covers the wait for a pooled connection and the connect.
    total_connect = None if connect is None or pool is None else connect + pool
    return aiohttp.ClientTimeout(
        total=None, connect=total_connect, sock_connect=connect, sock_read=read
    )


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (a keep-alive pool), opened on first use inside the event loop.

    Bodies are read whole, up to ``max_body_bytes`` (the rest is dropped with the
    connection), so the response handed back is complete and needs no closing; they are
    never decompressed (see handle_async_request).
    """

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool,
        limits: httpx.Limits,
        max_body_bytes: int,
        headers: httpx.Headers | None = None,
    ) -> None:
        """``headers``: those every request of the caller carries, sent as the aiohttp
        session's own: a request that carries exactly these hands aiohttp none to convert,
        merge and check one by one (2% of a stop's CPU); any other sends its own over them."""
        self._headers: Final = headers
        # As httpx.Headers holds them: compared with a request's own without building its
        # .raw list (a property and a comprehension per request).
        self._usual_headers: Final = None if headers is None else list(headers._list)
        self._ssl: Final = verify if isinstance(verify, ssl.SSLContext) else None
        self._verify: Final = verify is not False
        self._limits: Final = limits
        self._max_body_bytes: Final = max_body_bytes
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            # A late caller after shutdown must not open a pool that nobody will close.
            raise RuntimeError("the NoojeeContact transport is closed")
        connector = aiohttp.TCPConnector(
            limit=self._limits.max_connections or 0,
            keepalive_timeout=self._limits.keepalive_expiry,
            ssl=self._ssl if self._ssl is not None else self._verify,
        )
        # trust_env=False: proxy variables in a daemon's environment must not route calls
        # away from the source address NoojeeContact has whitelisted.
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers=None if self._headers is None else self._headers.multi_items(),
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        headers = (
            None  # the session's own
            if request.headers._list == self._usual_headers
            else [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in request.headers.raw
            ]
        )
        phases = request.extensions.get("timeout", {})
        # A body in memory (our client's requests: an empty one) is taken from its stream:
        # request.content needs Request.read(), which tests whether it ran by catching an
        # AttributeError, a cost per request; iterating the stream is a generator's.
        stream = request.stream
        content = bytes(stream._stream) if isinstance(stream, httpx.ByteStream) else request.content
        try:
            async with session.request(
                request.method,
                str(request.url),
                headers=headers,
                data=content or None,
                allow_redirects=False,
                timeout=_client_timeout(
                    phases.get("connect"), phases.get("read"), phases.get("pool")
                ),
            ) as response:
                body = await self._read(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            mapped = _mapped(exc)
            raise mapped from mapped.__cause__
        answer_headers = response.raw_headers
        if "Content-Encoding" in response.headers:
            # We ask for identity. A server that compresses anyway gets its bytes passed on as
            # they are: httpx would inflate them whole here, and a few KiB of gzip can become
            # megabytes past max_body_bytes.
            answer_headers = tuple(h for h in answer_headers if h[0].lower() != b"content-encoding")
        return _whole_response(response.status, answer_headers, body, request)

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self._max_body_bytes
        content = response.content
        # A short answer has usually arrived whole with its headers: taken as it is, without
        # awaiting a read that would find it there (and a second one that would find the end).
        chunks = [content.read_nowait(limit)]
        size = len(chunks[0])
        while size < limit and not content.at_eof() and (chunk := await content.read(limit - size)):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
