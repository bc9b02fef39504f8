"""What a NoojeeContact answer means: each HTTP answer or exception becomes a
:class:`~agi_bridge.vocabulary.NoojeeResult` whose ``kind`` says whose fault it was and whose
``transient`` says whether retrying later may help.

The rules are the API reference's ("{"Message": ..., "Code": n}": 0 success, > 0 warning,
< 0 error; non-2xx answers are errors whose body is undocumented). Every message leaves here
as one printable line of at most :data:`~agi_bridge.vocabulary.MESSAGE_MAX_CHARS` characters,
free of ``"`` and ``\\`` (so it fits in an AGI ``SET VARIABLE`` argument) and scrubbed of
secrets by :mod:`agi_bridge.redact`, whatever the server or an exception string echoes back.
The common answer (a short JSON object) takes the fast path: this runs for every request.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import ssl
from typing import Any, Final, TypeVar

import httpx

from agi_bridge.redact import scrub
from agi_bridge.vocabulary import MESSAGE_MAX_CHARS, NoojeeResult, ResultKind

__all__ = [
    "EXCERPT_MAX_CHARS",
    "MAX_RESPONSE_BYTES",
    "body_excerpt",
    "classify_response",
    "clean_line",
    "exception_result",
    "is_expired",
    "safe_message",
]

# Answers are ~50 bytes of JSON and error pages a few KiB; an excerpt needs only the start.
# Reading stops here so a broken or hostile server cannot make us buffer megabytes.
MAX_RESPONSE_BYTES: Final = 64 * 1024
# Excerpts of unexpected bodies: enough to recognise "Service Unavailable" or a servlet error.
EXCERPT_MAX_CHARS: Final = 80


# --- Text hygiene --------------------------------------------------------------------------

# Whole blocks whose text is noise in an excerpt: the head (servlet error pages repeat its
# title in an h1, and carry inline CSS), scripts, styles and comments.
_HTML_NOISE_RE: Final = re.compile(r"(?is)<(head|script|style)\b.*?</\1\s*>|<!--.*?-->")
_HTML_TAG_RE: Final = re.compile(r"<[^>]*>")
_SPACES_RE: Final = re.compile(r"\s+")
# '"' and '\' would break the quoting of an AGI SET VARIABLE argument.
_QUOTES: Final = str.maketrans({'"': "'", "\\": "/"})


def clean_line(text: str, limit: int) -> str:
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


def safe_message(text: str, secret: str | None, limit: int = MESSAGE_MAX_CHARS) -> str:
    """``text`` without ``secret`` (nor any other secret :mod:`agi_bridge.redact` knows), as
    one clean line of at most ``limit`` characters."""
    return clean_line(scrub(text, (secret,) if secret else ()), limit)


def body_excerpt(body: bytes, secret: str | None) -> str:
    """The start of an undocumented body as a clean line, for a message."""
    # Decoded leniently: a stray byte must not cost the whole excerpt.
    text = body[:MAX_RESPONSE_BYTES].decode("utf-8", "replace")
    return safe_message(text, secret, EXCERPT_MAX_CHARS)


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
    """Turn one HTTP answer into a result, exactly as the API reference says (see _classify).

    A result depends on nothing but its arguments and is immutable, and answers repeat
    ("Recording stopped" all day): a small answer is classified once, then looked up (JSON
    parsing and message hygiene cost about a twentieth of the HTTP leg)."""
    if len(body) <= CACHED_BODY_BYTES:
        return _classify_small(status, body, secret)
    return _classify(status, body, secret)


def _classify(status: int, body: bytes, secret: str | None) -> NoojeeResult:
    """Turn one HTTP answer into a result, exactly as the API reference says.

    2xx with Code 0, or with an empty body (the docs' "HTTP 200 on success"): OK. Code > 0 with
    2xx: WARNING. Code < 0 with any status: API_ERROR carrying Message. Any other 2xx (HTML
    from a proxy or a login gateway, cut-off or invalid JSON, JSON without Code): UNEXPECTED,
    nothing confirmed. Any other non-2xx: HTTP_ERROR carrying the status and a short sanitised
    excerpt of the body. ``secret`` is scrubbed from every message.
    """
    envelope = _json_envelope(body)
    success = 200 <= status < 300
    if envelope is not None:
        code, raw = envelope
        if code is not None and (code < 0 or success):
            text = safe_message(raw, secret) if raw else ""
            if code < 0:
                no_call = _NO_SUCH_CALL_RE.search(text) is not None
                kind = ResultKind.NOT_FOUND if no_call else ResultKind.API_ERROR
                return NoojeeResult(kind, text or f"Code {code}", code, status)
            kind = ResultKind.OK if code == 0 else ResultKind.WARNING
            return NoojeeResult(kind, text or f"Code {code}", code, status)
    if success:
        if not body.strip():
            return NoojeeResult(ResultKind.OK, f"HTTP {status} with an empty body", None, status)
        what = "JSON without a Code" if envelope is not None else "a body that is not its JSON"
        excerpt = body_excerpt(body, secret) or "(unprintable)"
        return NoojeeResult(
            ResultKind.UNEXPECTED,
            f"unexpected answer, HTTP {status} with {what}: {excerpt}",
            None,
            status,
        )
    if envelope is not None and envelope[1]:
        excerpt = safe_message(envelope[1], secret, EXCERPT_MAX_CHARS)
    else:
        excerpt = body_excerpt(body, secret)
    text = f"HTTP {status}: {excerpt}" if excerpt else f"HTTP {status} (empty body)"
    return NoojeeResult(ResultKind.HTTP_ERROR, text, envelope[0] if envelope else None, status)


# Distinct small answers remembered: NoojeeContact's few messages, with room to spare; an answer
# echoing a per-call value only cycles through them. Bodies up to CACHED_BODY_BYTES (a JSON
# envelope is ~50) keep that memory small whatever the server sends.
CACHED_ANSWERS: Final = 64
CACHED_BODY_BYTES: Final = 512
_classify_small: Final = functools.lru_cache(maxsize=CACHED_ANSWERS)(_classify)


def is_expired(result: NoojeeResult) -> bool:
    """The hash scheme's pair was refused as too old: fetch a new one and repeat."""
    # The docs' exact answer: {"Message":"Expired TimeStamp","Code":-1}.
    return result.kind is ResultKind.API_ERROR and result.message.casefold() == "expired timestamp"


# --- Exception mapping ---------------------------------------------------------------------


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


# Failures that happen before a byte of the request leaves: connecting (refused, no route, TLS
# handshake or certificate), waiting for a pooled connection, a request that cannot be written
# (a URL scheme or a header the transport refuses). Anything later may have reached
# NoojeeContact, even a reset (it may come after the server acted).
_BEFORE_SENDING: Final = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.LocalProtocolError,
    httpx.UnsupportedProtocol,
)


def exception_result(exc: Exception, secret: str | None, timeouts: httpx.Timeout) -> NoojeeResult:
    """Map an exception raised by httpx or the socket layer to a result."""
    unsent = isinstance(exc, _BEFORE_SENDING)
    if isinstance(exc, httpx.TimeoutException):
        phase = _TIMEOUT_PHASES.get(type(exc), "waiting")
        limit = timeouts.connect if isinstance(exc, httpx.ConnectTimeout) else timeouts.read
        return NoojeeResult(ResultKind.TIMEOUT, f"timed out {phase} ({limit:g} s)", unsent=unsent)
    if isinstance(exc, TimeoutError):  # a socket-level timeout httpx did not map
        return NoojeeResult(ResultKind.TIMEOUT, "timed out (socket)")
    verify = _find_in_chain(exc, ssl.SSLCertVerificationError)
    if verify is not None:
        reason = verify.verify_message or verify.reason or "certificate rejected"
        return NoojeeResult(
            ResultKind.TRANSPORT,
            safe_message(f"TLS certificate verification failed: {reason}", secret),
            tls_verify_failed=True,
            unsent=unsent,
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
    return NoojeeResult(ResultKind.TRANSPORT, safe_message(text, secret), unsent=unsent)
