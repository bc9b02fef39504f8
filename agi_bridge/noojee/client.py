"""NoojeeContact recording client: stop and start recordings over the documented REST API.

The contract is NoojeeContact's REST API documentation ("07.0 Start Recording", "08.0 Stop
Recording", "01.0/01.1 Authentication"). In short:

* ``POST <base>/CallManagementAPI/stop|start`` with every parameter in the query string and an
  empty ``application/x-www-form-urlencoded`` body ("The API will only accept POST requests").
* Authentication is either ``apiKey=<key>`` or a ``timeStamp`` from ``POST <base>/Time`` plus
  ``hash = sha256(key + ":" + timeStamp)``; the key itself never travels in the hash scheme.
* Answers are ``{"Message": ..., "Code": n}``: 0 success, > 0 warning, < 0 error. Non-2xx
  answers are errors whose body is undocumented (a 404 comes back as an HTML page).

Design:

* One shared httpx transport, built once and called directly with :class:`httpx.Request`
  objects (no :class:`httpx.AsyncClient`: its layers are unused here, and cost a fifth more
  CPU per request). By default :class:`~agi_bridge.noojee.transport.AiohttpTransport`: a
  keep-alive pool sized by ``max_connections``, HTTP/1.1 only, an explicit
  :class:`httpx.Timeout` for every phase, and no proxy variables from the environment, which
  could silently route calls away from the whitelisted source address NoojeeContact insists
  on. Tests pass an :class:`httpx.MockTransport` instead.
* :meth:`NoojeeClient.send` never raises for anything the network or the server does: every
  outcome is a :class:`NoojeeResult` whose ``kind`` says whose fault it was and whose
  ``transient`` says whether retrying later may help (timeouts, transport errors, 5xx and 429).
  Cancellation always propagates. A whole ``send`` (including a time-stamp fetch and the one
  retry after ``Expired TimeStamp``) is bounded by ``connect_timeout + request_timeout``.
* The hash scheme keeps one (timeStamp, hash) pair shared by all concurrent requests. Fetching
  a new pair is single-flight behind one :class:`asyncio.Lock` (the docs mention a limit of 5
  concurrent authentication attempts); callers that queued behind a failed fetch share its
  result instead of hammering ``/Time`` one after another.
* The module logs nothing of its own (the server logs results with context it owns), but it
  keeps the one line :class:`httpx.AsyncClient` logs at INFO on the ``httpx`` logger for every
  request, whose URL carries ``apiKey`` or ``hash``. Importing this module therefore attaches a
  filter to the ``httpx`` logger that redacts those values (it costs nothing while INFO is
  disabled, the default).
* Result messages are single-line, printable, at most 200 characters, free of ``"`` and
  ``\\`` (so they fit in an AGI ``SET VARIABLE`` argument), and scrubbed of secrets by
  :mod:`agi_bridge.redact`, whatever the server or an exception string echoes back.
* Per-request work is kept small because the benchmark runs this thousands of times per second:
  URLs prefixes, the auth suffix and the headers are precomputed; the common answer (a short
  JSON object) takes the fast path through the classifier.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import os
import re
import ssl
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar, cast
from urllib.parse import quote

import httpx

from agi_bridge.noojee.transport import AiohttpTransport
from agi_bridge.redact import redact_url, scrub
from agi_bridge.tls import client_context
from agi_bridge.vocabulary import MESSAGE_MAX_CHARS, NoojeeResult, RecordingRequest, ResultKind

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_REQUEST_TIMEOUT",
    "NoojeeClient",
    "classify_response",
]

AuthScheme = Literal["apikey", "hash"]

# --- Limits and timeouts -------------------------------------------------------------------

# Connecting is a TCP plus TLS handshake to a server on the same site or a nearby data centre:
# 2 s is many round trips; longer only keeps an Asterisk channel waiting on a dead host.
DEFAULT_CONNECT_TIMEOUT: Final = 2.0
# Per read/write/pool wait. NoojeeContact answers recording calls in milliseconds; 5 s covers
# a loaded server while still telling the dialplan something before a caller notices.
DEFAULT_REQUEST_TIMEOUT: Final = 5.0
# Keep-alive pool size: far more than the concurrent recording changes one PBX produces, small
# enough that a flood cannot exhaust the server's connector threads (Tomcat's default is 200).
DEFAULT_MAX_CONNECTIONS: Final = 100
# Close idle pooled connections before the server does, so a request is not sent on a socket
# the server is closing at that moment. Apache httpd's default KeepAliveTimeout is 5 s and
# Tomcat's connectionTimeout 20 s; 4 s stays under both.
KEEPALIVE_EXPIRY: Final = 4.0

# Hash scheme ("01.1 Authentication - Hash method"): a fresh pair is valid for 10 s before its
# first use, then for 1 hour after it. We stop using a pair earlier than the server would
# reject it: 2 s covers the /Time round trip and the trip of the request that first uses it,
# 5 min covers clock-rate differences and long-running retries. Expiry is still handled
# reactively (one refresh and retry on "Expired TimeStamp").
HASH_FRESH_WINDOW: Final = 8.0
HASH_USED_LIFETIME: Final = 55 * 60.0

# Answers are ~50 bytes of JSON and error pages a few KiB; an excerpt needs only the start.
# Reading stops here so a broken or hostile server cannot make us buffer megabytes.
MAX_RESPONSE_BYTES: Final = 64 * 1024
# An epoch in milliseconds has 13 digits; anything much longer is not a time stamp.
MAX_TIME_BODY_CHARS: Final = 32
# Excerpts of unexpected bodies: enough to recognise "Service Unavailable" or a servlet error.
EXCERPT_MAX_CHARS: Final = 80

_PATHS: Final[dict[str, str]] = {
    "stop": "CallManagementAPI/stop",
    "start": "CallManagementAPI/start",
}
_TIME_PATH: Final = "Time"
_HEADERS: Final[dict[str, str]] = {
    # The docs: an empty body sent as a form; the parameters ride in the query string.
    "Content-Type": "application/x-www-form-urlencoded",
    "Accept": "application/json, text/plain;q=0.9, */*;q=0.1",
    # Identity only: nothing to gain compressing 50 bytes, and no decompression bombs.
    "Accept-Encoding": "identity",
    "User-Agent": "agi-bridge (NoojeeContact recording client)",
}
_EMPTY: Final = b""


# --- Text hygiene --------------------------------------------------------------------------

# Whole blocks whose text is noise in an excerpt: the head (servlet error pages repeat its
# title in an h1, and carry inline CSS), scripts, styles and comments.
_HTML_NOISE_RE: Final = re.compile(r"(?is)<(head|script|style)\b.*?</\1\s*>|<!--.*?-->")
_HTML_TAG_RE: Final = re.compile(r"<[^>]*>")
_SPACES_RE: Final = re.compile(r"\s+")
# '"' and '\' would break the quoting of an AGI SET VARIABLE argument.
_QUOTES: Final = str.maketrans({'"': "'", "\\": "/"})


def _clean(text: str, limit: int) -> str:
    """One printable line without quotes or backslashes, at most ``limit`` characters."""
    if "<" in text:
        text = _HTML_NOISE_RE.sub(" ", text)
        text = _HTML_TAG_RE.sub(" ", text)
    if "&" in text:
        text = html.unescape(text)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = _SPACES_RE.sub(" ", text).strip().translate(_QUOTES)
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


def _message(text: str, secret: str | None, limit: int = MESSAGE_MAX_CHARS) -> str:
    return _clean(scrub(text, (secret,) if secret else ()), limit)


def _excerpt(body: bytes, secret: str | None) -> str:
    # Undocumented bodies: decode leniently, a stray byte must not cost the whole excerpt.
    return _message(body[:MAX_RESPONSE_BYTES].decode("utf-8", "replace"), secret, EXCERPT_MAX_CHARS)


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


# --- Response classification ---------------------------------------------------------------

_E = TypeVar("_E", bound=BaseException)
# A Java server may serialise the code as a string; accept that, but only plain integers.
_CODE_STRING_RE: Final = re.compile(r"\s*-?\d{1,9}\s*")
# NoojeeContact's wording for an unknown call is undocumented ("Call not found" is what its
# simulator and the field answer): the call must be named, so that "Agent not found", a real
# configuration error, stays an API_ERROR.
_NO_SUCH_CALL_RE: Final = re.compile(r"(?i)\bcall\b.*\bnot found\b|\bno such call\b")


def _json_envelope(body: bytes) -> tuple[int | None, str | None] | None:
    """``(Code, Message)`` if the body is a JSON object, else None; never raises."""
    stripped = body.lstrip()
    if not stripped.startswith(b"{"):
        return None
    try:
        doc: Any = json.loads(stripped)
    except (ValueError, RecursionError):  # also UnicodeDecodeError; RecursionError: deep nesting
        return None
    if not isinstance(doc, dict):
        return None
    raw_code = doc.get("Code")
    code: int | None = None
    if isinstance(raw_code, int) and not isinstance(raw_code, bool):
        code = raw_code
    elif isinstance(raw_code, str) and _CODE_STRING_RE.fullmatch(raw_code):
        code = int(raw_code)
    raw_message = doc.get("Message")
    message = raw_message if isinstance(raw_message, str) else None
    return code, message


def classify_response(status: int, body: bytes, *, secret: str | None = None) -> NoojeeResult:
    """Turn one HTTP answer into a result, exactly as the API reference says.

    2xx with Code 0 or with a non-JSON body: OK. Code > 0 with 2xx: WARNING. Code < 0 with any
    status: API_ERROR carrying Message. Any other non-2xx: HTTP_ERROR carrying the status and a
    short sanitised excerpt of the body. ``secret`` is scrubbed from every message.
    """
    envelope = _json_envelope(body)
    success = 200 <= status < 300
    if envelope is not None:
        code, raw = envelope
        if code is not None and (code < 0 or success):
            text = _message(raw, secret) if raw else ""
            if code < 0:
                no_call = _NO_SUCH_CALL_RE.search(text) is not None
                kind = ResultKind.NOT_FOUND if no_call else ResultKind.API_ERROR
                return NoojeeResult(kind, text or f"Code {code}", code, status)
            kind = ResultKind.OK if code == 0 else ResultKind.WARNING
            return NoojeeResult(kind, text or f"Code {code}", code, status)
    if success:
        if envelope is not None:
            if envelope[1]:
                return NoojeeResult(ResultKind.OK, _message(envelope[1], secret), None, status)
            detail = f"JSON without a Code: {_excerpt(body, secret)}"
        else:
            excerpt = _excerpt(body, secret)
            detail = f"a non-JSON body: {excerpt}" if excerpt else "an empty body"
        return NoojeeResult(ResultKind.OK, f"HTTP {status} with {detail}", None, status)
    if envelope is not None and envelope[1]:
        excerpt = _message(envelope[1], secret, EXCERPT_MAX_CHARS)
    else:
        excerpt = _excerpt(body, secret)
    text = f"HTTP {status}: {excerpt}" if excerpt else f"HTTP {status} (empty body)"
    return NoojeeResult(ResultKind.HTTP_ERROR, text, envelope[0] if envelope else None, status)


def _is_expired(result: NoojeeResult) -> bool:
    # The docs' exact answer: {"Message":"Expired TimeStamp","Code":-1}.
    return result.kind is ResultKind.API_ERROR and result.message.casefold() == "expired timestamp"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first: httpx wraps httpcore, which wraps the socket
    error; anyio's connect wraps per-address errors in an exception group."""
    found: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found.append(current)
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
        else:
            current = current.__cause__ or current.__context__
    return found


def _find_in_chain(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of ``kind`` along the chain of causes."""
    for link in _chain(exc):
        if isinstance(link, kind):
            return link
    return None


def _os_reason(exc: BaseException) -> str | None:
    """The innermost errno as text ("Connection refused"), if any link carries one."""
    for link in reversed(_chain(exc)):
        # SSLError's errno is an OpenSSL code, not an errno: its reason is told elsewhere.
        if isinstance(link, OSError) and link.errno and not isinstance(link, ssl.SSLError):
            if link.errno < 0:  # resolver (getaddrinfo) codes: only strerror knows them
                return link.strerror or None
            return os.strerror(link.errno)
    return None


_TIMEOUT_PHASES: Final[dict[type[httpx.TimeoutException], str]] = {
    httpx.ConnectTimeout: "connecting",
    httpx.ReadTimeout: "waiting for the answer",
    httpx.WriteTimeout: "sending the request",
    httpx.PoolTimeout: "waiting for a free connection",
}


def _exception_result(exc: Exception, secret: str | None, timeouts: httpx.Timeout) -> NoojeeResult:
    """Map an exception raised by httpx or the socket layer to a result."""
    if isinstance(exc, httpx.TimeoutException):
        phase = _TIMEOUT_PHASES.get(type(exc), "waiting")
        limit = timeouts.connect if isinstance(exc, httpx.ConnectTimeout) else timeouts.read
        return NoojeeResult(ResultKind.TIMEOUT, f"timed out {phase} ({limit:g} s)")
    if isinstance(exc, TimeoutError):  # a socket-level timeout httpx did not map
        return NoojeeResult(ResultKind.TIMEOUT, "timed out (socket)")
    verify = _find_in_chain(exc, ssl.SSLCertVerificationError)
    if verify is not None:
        reason = verify.verify_message or verify.reason or "certificate rejected"
        return NoojeeResult(
            ResultKind.TRANSPORT,
            _message(f"TLS certificate verification failed: {reason}", secret),
            tls_verify_failed=True,
        )
    tls = _find_in_chain(exc, ssl.SSLError)
    if isinstance(exc, httpx.RemoteProtocolError) and "without sending" in str(exc):
        text = "server closed the connection without answering"
    elif tls is not None:
        text = f"TLS failure: {tls.reason or tls}"
    elif isinstance(exc, httpx.ConnectError):
        text = f"cannot connect: {_os_reason(exc) or exc or type(exc).__name__}"
    else:
        detail = _os_reason(exc) or str(exc)
        text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return NoojeeResult(ResultKind.TRANSPORT, _message(text, secret))


# --- The client ----------------------------------------------------------------------------


class _HashPair:
    """A (timeStamp, hash) pair from ``/Time`` and when it was fetched and first used."""

    __slots__ = ("fetched_at", "first_used_at", "query")

    def __init__(self, query: str, fetched_at: float) -> None:
        self.query = query  # "&timeStamp=...&hash=..."
        self.fetched_at = fetched_at
        self.first_used_at: float | None = None

    def take(self, now: float) -> bool:
        """Mark the pair used at ``now`` if it is still safely valid; False if it is not."""
        first = self.first_used_at
        if first is None:
            if now - self.fetched_at >= HASH_FRESH_WINDOW:
                return False
            self.first_used_at = now
            return True
        return now - first < HASH_USED_LIFETIME


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
        self._urls: Final = {action: f"{base}{path}?" for action, path in _PATHS.items()}
        self._time_url: Final = base + _TIME_PATH
        self._hash: Final = auth == "hash"
        self._key: Final = api_key
        self._apikey_query: Final = "&apiKey=" + quote(api_key, safe="")
        self._clock: Final = clock
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
        if transport is None:
            # aiohttp's connection pool under httpx's API (see agi_bridge.noojee.transport).
            transport = AiohttpTransport(
                verify=verify_arg, limits=limits, max_body_bytes=MAX_RESPONSE_BYTES
            )
        # The transport is called directly, without an httpx.AsyncClient around it: the
        # client's layers (URL merging, auth and redirect flows, cookies) do nothing for us
        # and cost about 0.1 ms of CPU per request (bench/http_client.py: 644 against 533 us;
        # 0.25 ms over the httpx-aiohttp transport this client used before).
        self._transport: Final = transport
        self._headers: Final = httpx.Headers(_HEADERS)
        self._extensions: Final = {"timeout": self._timeout.as_dict()}

        self._pair: _HashPair | None = None
        self._auth_lock: Final = asyncio.Lock()
        self._auth_attempts = 0  # completed /Time fetches, successful or not
        self._auth_failure: NoojeeResult | None = None  # result of the last fetch if it failed

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
        try:
            async with asyncio.timeout(self._deadline):
                result, pair = await self._attempt(request)
                if pair is not None and _is_expired(result):
                    # The docs: on "Expired TimeStamp" fetch a new time stamp and repeat. Only
                    # drop the pair if nobody replaced it meanwhile; retry exactly once.
                    if self._pair is pair:
                        self._pair = None
                    result, _ = await self._attempt(request)
                return result
        except TimeoutError:
            return NoojeeResult(ResultKind.TIMEOUT, f"no answer within {self._deadline:g} s")

    async def _attempt(self, request: RecordingRequest) -> tuple[NoojeeResult, _HashPair | None]:
        pair: _HashPair | None = None
        if self._hash:
            got = await self._current_pair()
            if isinstance(got, NoojeeResult):
                return got, None
            pair = got
            auth = pair.query
        else:
            auth = self._apikey_query
        # surrogateescape: values decoded that way from AGI bytes go back out as those bytes.
        parts = [
            self._urls[request.action],
            "extenOrUniqueId=",
            quote(request.exten_or_uniqueid, safe="", errors="surrogateescape"),
        ]
        if request.agent is not None:
            parts += ("&agentLoginName=", quote(request.agent, safe="", errors="surrogateescape"))
        if request.tag is not None and request.action == "start":
            parts += ("&tag=", quote(request.tag, safe="", errors="surrogateescape"))
        parts.append(auth)
        status, body, failure = await self._post("".join(parts))
        if failure is not None:
            return failure, pair
        return classify_response(status, body, secret=self._key), pair

    async def _post(self, url: str) -> tuple[int, bytes, NoojeeResult | None]:
        """POST with an empty form body; (status, body, None) or (0, b"", failure)."""
        try:
            request = httpx.Request(
                "POST", url, headers=self._headers, content=_EMPTY, extensions=self._extensions
            )
            response = await self._transport.handle_async_request(request)
            try:
                length = response.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) <= MAX_RESPONSE_BYTES:
                    body = await response.aread()
                else:
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
            return 0, _EMPTY, _exception_result(exc, self._key, self._timeout)
        return response.status_code, body, None

    async def _current_pair(self) -> _HashPair | NoojeeResult:
        """A usable hash pair, fetching one (single-flight) when needed."""
        pair = self._pair
        if pair is not None and pair.take(self._clock()):
            return pair
        attempts = self._auth_attempts
        async with self._auth_lock:
            if self._auth_attempts != attempts:
                # Somebody fetched while we queued: share their pair, or their failure.
                pair = self._pair
                if pair is not None and pair.take(self._clock()):
                    return pair
                if self._auth_failure is not None:
                    return self._auth_failure
            got = await self._fetch_pair()
            self._auth_attempts += 1
            if isinstance(got, NoojeeResult):
                self._pair, self._auth_failure = None, got
                return got
            self._pair, self._auth_failure = got, None
            got.take(self._clock())
            return got

    async def _fetch_pair(self) -> _HashPair | NoojeeResult:
        # Measured before the request: the server's 10 s start somewhere during it.
        fetched_at = self._clock()
        status, body, failure = await self._post(self._time_url)
        if failure is None and not 200 <= status < 300:
            failure = classify_response(status, body, secret=self._key)
        if failure is None:
            raw = body.strip()  # the docs: a bare long integer; tolerate surrounding whitespace
            text = raw.decode("ascii", "replace") if len(raw) <= MAX_TIME_BODY_CHARS else ""
            if not (text.isascii() and text.isdigit()):
                excerpt = _excerpt(body, self._key) or "empty body"
                failure = NoojeeResult(
                    ResultKind.API_ERROR,
                    f"Time answered no epoch milliseconds: {excerpt}",
                    None,
                    status,
                )
            else:
                digest = hashlib.sha256(f"{self._key}:{text}".encode()).hexdigest()
                return _HashPair(f"&timeStamp={text}&hash={digest}", fetched_at)
        message = _clean(f"Time: {failure.message}", MESSAGE_MAX_CHARS)
        return NoojeeResult(
            failure.kind, message, failure.code, failure.http_status, failure.tls_verify_failed
        )


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
