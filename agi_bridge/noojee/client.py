"""NoojeeContact recording client: stop and start recordings over the documented REST API.

The contract is NoojeeContact's REST API documentation ("07.0 Start Recording", "08.0 Stop
Recording", "01.0/01.1 Authentication"). In short:

* ``POST <base>/CallManagementAPI/stop|start`` with every parameter in the query string and an
  empty ``application/x-www-form-urlencoded`` body ("The API will only accept POST requests").
* Authentication is either ``apiKey=<key>`` or a ``timeStamp`` from ``POST <base>/Time`` plus
  ``hash = sha256(key + ":" + timeStamp)``; the key itself never travels in the hash scheme.
* Answers are ``{"Message": ..., "Code": n}``: 0 success, > 0 warning, < 0 error. Non-2xx
  answers are errors whose body is undocumented (a 404 comes back as an HTML page); a 2xx
  that is not that JSON (nor empty) confirms nothing.

Design:

* One shared httpx transport, built once and called directly with :class:`httpx.Request`
  objects (no :class:`httpx.AsyncClient`: its layers are unused here, and cost a fifth more
  CPU per request). By default :class:`~agi_bridge.noojee.transport.HttpTransport`: a
  keep-alive pool sized by ``max_connections``, HTTP/1.1 only, an explicit
  :class:`httpx.Timeout` for every phase, and no proxy variables from the environment, which
  could silently route calls away from the whitelisted source address NoojeeContact insists
  on. Tests pass an :class:`httpx.MockTransport` instead.
* :meth:`NoojeeClient.send` never raises for anything the network or the server does: every
  outcome is a :class:`NoojeeResult` whose ``kind`` says whose fault it was and whose
  ``transient`` says whether retrying later may help (timeouts, transport errors, 5xx and 429).
  Cancellation always propagates. A whole ``send`` (including a time-stamp fetch and the one
  retry after ``Expired TimeStamp``) is bounded by ``connect_timeout + request_timeout``.
* The hash scheme's pair and its single-flight renewal live in :mod:`~agi_bridge.noojee.auth`;
  what each answer or exception means, and the hygiene of every message, in
  :mod:`~agi_bridge.noojee.classify`.
* The module logs nothing of its own (the server logs results with context it owns), but it
  keeps the one line :class:`httpx.AsyncClient` logs at INFO on the ``httpx`` logger for every
  request, whose URL carries ``apiKey`` or ``hash``. Importing this module therefore attaches a
  filter to the ``httpx`` logger that redacts those values (it costs nothing while INFO is
  disabled, the default).
* Per-request work is kept small because the benchmark runs this thousands of times per second:
  the action URLs are parsed once (a request only sets its query string, see _with_query), the
  auth suffix and the headers are precomputed, requests carry their empty body as a stream and
  responses come back read; the common answer (a short JSON object) is classified once, then
  looked up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import re
import ssl
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self, cast
from urllib.parse import quote

import httpx

from agi_bridge import defaults
from agi_bridge.noojee.auth import HashAuth, HashPair
from agi_bridge.noojee.classify import (
    MAX_RESPONSE_BYTES,
    classify_response,
    exception_result,
    is_expired,
)
from agi_bridge.noojee.transport import HttpTransport
from agi_bridge.redact import redact_url
from agi_bridge.tls import client_context
from agi_bridge.vocabulary import ACTIONS, NoojeeResult, RecordingRequest, ResultKind

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_REQUEST_TIMEOUT",
    "NoojeeClient",
]

AuthScheme = Literal["apikey", "hash"]

# --- Limits and timeouts -------------------------------------------------------------------

# The settings' defaults (one source, agi_bridge/defaults.py, where each value is explained).
DEFAULT_CONNECT_TIMEOUT: Final = defaults.NOOJEE_CONNECT_TIMEOUT
DEFAULT_REQUEST_TIMEOUT: Final = defaults.NOOJEE_TIMEOUT
DEFAULT_MAX_CONNECTIONS: Final = defaults.NOOJEE_MAX_CONNECTIONS
# Close idle pooled connections before the server does, so a request is not sent on a socket
# the server is closing at that moment. Apache httpd's default KeepAliveTimeout is 5 s and
# Tomcat's connectionTimeout 20 s; 4 s stays under both.
KEEPALIVE_EXPIRY: Final = 4.0


# Answers whose Retry-After header we honour (RFC 9110: 503 and 429 carry it that way).
RETRY_AFTER_STATUSES: Final = frozenset({429, 503})
# Longest Retry-After taken from a header (a day): the worker bounds it further by
# retry_max_delay; this only keeps a silly value from overflowing anything.
MAX_RETRY_AFTER: Final = 86400.0

_TIME_PATH: Final = "Time"
_HEADERS: Final[dict[str, str]] = {
    # The docs: an empty body sent as a form; the parameters ride in the query string.
    "Content-Type": "application/x-www-form-urlencoded",
    "Accept": "application/json, text/plain;q=0.9, */*;q=0.1",
    # Identity only: nothing to gain compressing 50 bytes, and no decompression bombs.
    "Accept-Encoding": "identity",
    "User-Agent": "agi-bridge (NoojeeContact recording client)",
}
# The body of every request: empty (a stream, so that httpx does not encode one).
_EMPTY: Final = httpx.ByteStream(b"")


# --- Logging ---------------------------------------------------------------------------


class _RedactHttpxUrls(logging.Filter):
    """Rewrite httpx's "HTTP Request: POST <url> ..." records so the URL has no secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(
                redact_url(arg) if isinstance(arg, httpx.URL | str) else arg for arg in args
            )
        if isinstance(record.msg, str) and "=" in record.msg:
            record.msg = redact_url(record.msg)
        return True


_HTTPX_FILTER: Final = _RedactHttpxUrls()
_HTTPX_LOG: Final = logging.getLogger("httpx")
_HTTPX_LOG.addFilter(_HTTPX_FILTER)  # once, at import


# --- The client ----------------------------------------------------------------------------


class NoojeeClient:
    """Stop and start recordings; one instance (one connection pool) per process."""

    def __init__(
        self,
        *,
        base_url: str,
        auth: AuthScheme,
        api_key: str,
        ca_file: Path | None = None,
        verify: bool = True,
        tls_strict: bool = True,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if auth not in ("apikey", "hash"):
            raise ValueError(f"auth must be 'apikey' or 'hash', not {auth!r}")
        if not api_key:
            raise ValueError("api_key must not be empty")
        if connect_timeout <= 0 or request_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL, not {redact_url(base_url)!r}")
        if url.query or url.fragment:
            raise ValueError("base_url must not carry a query string or fragment")

        base = str(url).rstrip("/") + "/"
        self.base_url: Final = base
        # Parsed once: a request only adds its query string (see _with_query).
        self._urls: Final = {
            action: httpx.URL(base + rules.api_path) for action, rules in ACTIONS.items()
        }
        self._time_url: Final = httpx.URL(base + _TIME_PATH)
        self._key: Final = api_key
        self._apikey_query: Final = "&apiKey=" + quote(api_key, safe="")
        # The whole send(), /Time fetch and one retry included, ends within this budget.
        self._deadline: Final = connect_timeout + request_timeout

        self._timeout: Final = httpx.Timeout(
            connect=connect_timeout,
            read=request_timeout,
            write=request_timeout,
            pool=request_timeout,
        )
        verify_arg: ssl.SSLContext | bool = verify
        if verify and (ca_file is not None or not tls_strict):
            # Trust exactly the operator's CA (typical for an on-premises NoojeeContact);
            # tls_strict=False clears only Python 3.13's strict X.509 flag (agi_bridge.tls).
            verify_arg = client_context(ca_file, strict=tls_strict)
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        # The headers httpx would add to each request itself (Host, Content-Length), given
        # here once: requests are built from a stream, which skips httpx's body encoding.
        self._headers: Final = httpx.Headers(
            {"Host": url.netloc.decode("ascii"), "Content-Length": "0", **_HEADERS}
        )
        if transport is None:
            # Our own keep-alive pool under httpx's API (see agi_bridge.noojee.transport).
            transport = HttpTransport(
                verify=verify_arg,
                limits=limits,
                max_body_bytes=MAX_RESPONSE_BYTES,
                headers=self._headers,
            )
        # The transport is called directly, without an httpx.AsyncClient around it: the
        # client's layers (URL merging, auth and redirect flows, cookies) do nothing for us
        # and cost about 0.1 ms of CPU per request (measured in bench/README.md).
        self._transport: Final = transport
        self._extensions: Final = {"timeout": self._timeout.as_dict()}

        self._auth: Final = (
            HashAuth(key=api_key, fetch_time=self._post_time, clock=clock)
            if auth == "hash"
            else None
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        await self._transport.aclose()

    async def send(self, request: RecordingRequest) -> NoojeeResult:
        """Perform one stop/start call. Never raises for network or server trouble."""
        # The deadline is what asyncio.timeout() does, written out: a timer that cancels this
        # task, and a cancellation that was ours (and no one else's) becomes the result. The
        # Timeout object and its context-manager calls cost every request six Python calls.
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None  # a coroutine runs in a task
        cancelling = task.cancelling()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = loop.call_at(loop.time() + self._deadline, expire)
        try:
            result, pair = await self._attempt(request)
            if pair is not None and self._auth is not None and is_expired(result):
                # The docs: on "Expired TimeStamp" fetch a new time stamp and repeat, exactly
                # once.
                self._auth.expired(pair)
                result, _ = await self._attempt(request)
        except asyncio.CancelledError:
            if expired and task.uncancel() <= cancelling:
                return NoojeeResult(ResultKind.TIMEOUT, f"no answer within {self._deadline:g} s")
            raise
        finally:
            timer.cancel()
        return result

    async def _attempt(self, request: RecordingRequest) -> tuple[NoojeeResult, HashPair | None]:
        pair: HashPair | None = None
        if self._auth is not None:
            got = await self._auth.pair()
            if isinstance(got, NoojeeResult):
                # No time stamp, so the request itself was never sent.
                return replace(got, unsent=True), None
            pair = got
            auth = pair.query
        else:
            auth = self._apikey_query
        parts = ["extenOrUniqueId=", _quoted(request.target)]
        if request.agent is not None:
            parts += ("&agentLoginName=", _quoted(request.agent))
        if request.tag is not None and ACTIONS[request.action].takes_tag:
            parts += ("&tag=", _quoted(request.tag))
        parts.append(auth)
        url = _with_query(self._urls[request.action], "".join(parts))
        status, body, failure, retry_after = await self._exchange(url)
        if failure is not None:
            return failure, pair
        result = classify_response(status, body, secret=self._key)
        if retry_after is not None and result.transient:
            message = f"{result.message} (Retry-After {retry_after:g} s)"
            result = dataclasses.replace(result, message=message, retry_after=retry_after)
        return result, pair

    async def _exchange(
        self, url: httpx.URL
    ) -> tuple[int, bytes, NoojeeResult | None, float | None]:
        """POST with an empty form body; (status, body, None, Retry-After in seconds or None)
        or (0, b"", failure, None)."""
        try:
            request = httpx.Request(
                "POST", url, headers=self._headers, stream=_EMPTY, extensions=self._extensions
            )
            response = await self._transport.handle_async_request(request)
            if response.is_closed:
                # Read whole by the transport already (ours reads it, bounded).
                body = response.content[:MAX_RESPONSE_BYTES]
            else:
                try:
                    body = await _read_limited(response)
                finally:
                    await response.aclose()
            if _HTTPX_LOG.isEnabledFor(logging.INFO):
                # The line httpx.AsyncClient would have logged (redacted by _HTTPX_FILTER).
                _HTTPX_LOG.info(
                    'HTTP Request: %s %s "%s %d %s"',
                    request.method,
                    request.url,
                    response.http_version,
                    response.status_code,
                    response.reason_phrase,
                )
        except (httpx.HTTPError, OSError, ValueError) as exc:
            # httpx.HTTPError: everything the transport maps (timeouts, connect, read,
            # protocol...). OSError and ValueError: socket and SSL errors that escape the
            # mapping, bad framing or encoding reported by the response decoders. Our own
            # deadline never lands here: it is a CancelledError, which propagates.
            return 0, b"", exception_result(exc, self._key, self._timeout), None
        status = response.status_code
        retry_after = None
        if status in RETRY_AFTER_STATUSES:
            retry_after = retry_after_seconds(response.headers.get("retry-after"), time.time())
        return status, body, None, retry_after

    async def _post_time(self) -> tuple[int, bytes, NoojeeResult | None]:
        status, body, failure, _ = await self._exchange(self._time_url)
        return status, body, failure


# What quote() leaves as it is (RFC 3986's unreserved characters): a uniqueid, an extension or
# a login is usually nothing else, and then needs no quoting at all.
_UNRESERVED: Final = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


def _quoted(value: str) -> str:
    """``value`` percent-encoded for a query string; surrogateescape: values decoded that way
    from AGI bytes go back out as those bytes. One C-level match first: quote() is two Python
    calls, and every request quotes two or three values."""
    if _UNRESERVED(value) is not None:
        return value
    return quote(value, safe="", errors="surrogateescape")


def _with_query(url: httpx.URL, query: str) -> httpx.URL:
    """``url`` with ``query`` (percent-encoded already) as its query string.

    httpx.URL(str) parses and validates the whole URL again, about 25 us per request (a
    tenth of the HTTP leg, bench/README.md); this replaces one field of the parsed form that
    httpx.URL holds (a named tuple). tests/test_noojee.py checks that the result is what
    httpx's own parsing gives, so an httpx that changes that form fails there, not here."""
    copy = httpx.URL.__new__(httpx.URL)
    copy._uri_reference = url._uri_reference._replace(query=query)
    return copy


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After header's delay in seconds (delta-seconds or an HTTP date, RFC 9110
    10.2.3), at most :data:`MAX_RETRY_AFTER`; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)


async def _read_limited(response: httpx.Response) -> bytes:
    """Read at most ``MAX_RESPONSE_BYTES`` of a body of unknown or excessive length."""
    chunks: list[bytes] = []
    size = 0
    # aiter_bytes() is an async generator (typed as an iterator): close it when we stop early.
    stream = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
    async with aclosing(stream):
        async for chunk in stream:
            chunks.append(chunk)
            size += len(chunk)
            if size >= MAX_RESPONSE_BYTES:
                break
    return b"".join(chunks)[:MAX_RESPONSE_BYTES]
