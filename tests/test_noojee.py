"""The NoojeeContact client against the simulator, over real HTTPS on loopback.

The simulator is the backend (no mocks) wherever it can produce the situation; a handful of
tests use an ``httpx.MockTransport`` for answers no sane server gives (a non-integer ``/Time``,
error pages that echo the key back) to pin down the client's hygiene.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agi_bridge.noojee.auth import HASH_USED_LIFETIME
from agi_bridge.noojee.classify import EXCERPT_MAX_CHARS, classify_response
from agi_bridge.noojee.client import MAX_RETRY_AFTER, NoojeeClient, _quoted, retry_after_seconds
from agi_bridge.noojee.transport import _whole_response
from agi_bridge.redact import redact_url
from agi_bridge.testing.simulator import (
    FailureMode,
    NoojeeSimulator,
    ReceivedRequest,
    SimulatorConfig,
    run_simulator,
)
from agi_bridge.vocabulary import MESSAGE_MAX_CHARS, NoojeeResult, RecordingRequest, ResultKind
from tests.bridge_helpers import raw_http_server
from tests.clock import FakeClock

KEY = "f863246a-973e-11e6-8784-08002718f5b5"
PREFIX = "/servicemanager/rest"
STOP_PATH = f"{PREFIX}/CallManagementAPI/stop"
START_PATH = f"{PREFIX}/CallManagementAPI/start"
TIME_PATH = f"{PREFIX}/Time"
STOP_410 = RecordingRequest("stop", "410", agent="Fred")


MakeClient = Callable[..., Awaitable[NoojeeClient]]


@pytest.fixture
def sim_clock() -> FakeClock:
    """The simulator's wall clock (epoch seconds)."""
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def client_clock() -> FakeClock:
    """The client's monotonic clock."""
    return FakeClock(1_000.0)


async def test_a_body_in_many_chunks_is_read_whole() -> None:
    """A chunked answer in several pieces arrives whole (the transport reads until the end,
    not one chunk)."""
    pieces = [b'{"Message":', b'"Recording ', b'stopped",', b'"Code":0}']
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    async with (
        raw_http_server(answer) as port,
        NoojeeClient(
            base_url=f"http://127.0.0.1:{port}/rest", auth="apikey", api_key=KEY
        ) as client,
    ):
        result = await client.send(STOP_410)
    assert result.kind is ResultKind.OK
    assert result.message == "Recording stopped"


@pytest.fixture
async def sim(
    server_ssl_context: ssl.SSLContext, sim_clock: FakeClock
) -> AsyncIterator[NoojeeSimulator]:
    """A simulator serving HTTPS on a free loopback port."""
    config = SimulatorConfig(api_key=KEY, clock=sim_clock)
    async with await NoojeeSimulator(config).start(ssl_context=server_ssl_context) as simulator:
        yield simulator


@pytest.fixture
async def make_client(
    sim: NoojeeSimulator, ca_file: Path, client_clock: FakeClock
) -> AsyncIterator[MakeClient]:
    """Build clients for ``sim`` (closed at the end of the test)."""
    async with AsyncExitStack() as stack:

        async def make(**overrides: Any) -> NoojeeClient:
            options: dict[str, Any] = {
                "base_url": sim.base_url,
                "auth": "apikey",
                "api_key": KEY,
                "ca_file": ca_file,
                "clock": client_clock,
            }
            options.update(overrides)
            return await stack.enter_async_context(NoojeeClient(**options))

        yield make


def _hash(timestamp: str) -> str:
    return hashlib.sha256(f"{KEY}:{timestamp}".encode()).hexdigest()


def _assert_clean(result: NoojeeResult) -> None:
    assert KEY not in result.message
    assert len(result.message) <= MESSAGE_MAX_CHARS
    assert result.message.isprintable()
    assert '"' not in result.message
    assert "\\" not in result.message


# --- the documented calls ------------------------------------------------------------------


async def test_stop_with_api_key_sends_the_documented_request(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """Stop is a POST with every parameter in the query string and an empty form body."""
    client = await make_client()
    result = await client.send(STOP_410)
    assert result == NoojeeResult(ResultKind.OK, "Recording stopped", 0, 200)
    assert result.ok
    assert not result.transient
    [seen] = sim.received
    assert seen.method == "POST"
    assert seen.path == STOP_PATH
    assert seen.params == {"extenOrUniqueId": "410", "agentLoginName": "Fred", "apiKey": KEY}
    assert seen.body == b""
    assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
    assert seen.headers["content-length"] == "0"
    # Built once by the transport (see HttpTransport): on every request.
    assert seen.headers["accept-encoding"] == "identity"  # no compressed answers
    assert seen.headers["accept"].startswith("application/json")
    assert seen.headers["user-agent"].startswith("agi-bridge")
    assert seen.auth == "apikey"
    assert (seen.http_status, seen.answered_code) == (200, 0)


async def test_start_with_api_key_sends_agent_and_tag(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """Start carries the optional agent and tag, quoted so that any value survives."""
    client = await make_client()
    result = await client.send(
        RecordingRequest("start", "12347811.214", agent="Wilma", tag="ref 42&x=1/ü")
    )
    assert result == NoojeeResult(ResultKind.OK, "Recording started", 0, 200)
    [seen] = sim.received
    assert seen.path == START_PATH
    assert seen.params == {
        "extenOrUniqueId": "12347811.214",
        "agentLoginName": "Wilma",
        "tag": "ref 42&x=1/ü",
        "apiKey": KEY,
    }
    assert seen.body == b""


async def test_optional_parameters_are_omitted_when_none(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """Start without agent or tag sends neither; stop never sends a tag."""
    client = await make_client()
    assert (await client.send(RecordingRequest("start", "410"))).ok
    assert (await client.send(RecordingRequest("stop", "410", agent="Fred", tag="t"))).ok
    start, stop = sim.received
    assert start.params == {"extenOrUniqueId": "410", "apiKey": KEY}
    assert stop.params == {"extenOrUniqueId": "410", "agentLoginName": "Fred", "apiKey": KEY}


@pytest.mark.parametrize("action", ["stop", "start"])
async def test_hash_scheme_sends_a_valid_hash_and_never_the_key(
    sim: NoojeeSimulator, make_client: MakeClient, action: str
) -> None:
    """Hash auth POSTs /Time, then sends timeStamp and sha256(key:timeStamp); no key at all."""
    client = await make_client(auth="hash")
    result = await client.send(RecordingRequest(action, "410", agent="Fred"))  # type: ignore[arg-type]
    assert result.kind is ResultKind.OK
    time_call, call = sim.received
    assert (time_call.method, time_call.path, time_call.body) == ("POST", TIME_PATH, b"")
    assert time_call.params == {}
    assert call.method == "POST"
    assert call.path == f"{PREFIX}/CallManagementAPI/{action}"
    assert set(call.params) == {"extenOrUniqueId", "agentLoginName", "timeStamp", "hash"}
    stamp = call.params["timeStamp"]
    assert stamp == str(int(sim.config.clock() * 1000))
    assert call.params["hash"] == _hash(stamp)
    assert call.auth == "hash"
    for request in sim.received:
        assert "apiKey" not in request.params
        everything = [request.path, *request.params.values(), *request.headers.values()]
        assert all(KEY not in text for text in everything)
        assert KEY.encode() not in request.body


async def test_hash_pair_is_reused_across_requests(
    sim: NoojeeSimulator, make_client: MakeClient, client_clock: FakeClock
) -> None:
    """N requests within the pair's lifetime cost exactly one /Time."""
    client = await make_client(auth="hash")
    for n in range(6):
        client_clock.advance(60.0)
        action = "stop" if n % 2 else "start"
        assert (await client.send(RecordingRequest(action, str(500 + n), agent="Fred"))).ok
    assert [r.path for r in sim.received].count(TIME_PATH) == 1
    assert len({r.params.get("timeStamp") for r in sim.received[1:]}) == 1


async def test_hash_pair_fetch_is_single_flight(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """Concurrent first requests share one /Time fetch instead of racing for pairs."""
    sim.latency = 0.02  # keep /Time in flight while the others queue
    client = await make_client(auth="hash")
    requests = [RecordingRequest("stop", str(n), agent="Fred") for n in range(30)]
    results = await asyncio.gather(*(client.send(r) for r in requests))
    assert all(r.kind is ResultKind.OK for r in results)
    assert [r.path for r in sim.received].count(TIME_PATH) == 1
    assert len(sim.received) == 31


async def test_expired_timestamp_fetches_a_new_pair_and_retries_once(
    sim: NoojeeSimulator, make_client: MakeClient, sim_clock: FakeClock, client_clock: FakeClock
) -> None:
    """'Expired TimeStamp' drops the pair, fetches a new one and repeats the request."""
    client = await make_client(auth="hash")
    assert (await client.send(STOP_410)).ok
    sim_clock.advance(3601.0)  # the server says: used over an hour ago
    client_clock.advance(60.0)  # the client still thinks it is fresh
    result = await client.send(STOP_410)
    assert result == NoojeeResult(ResultKind.OK, "Recording stopped", 0, 200)
    paths = [r.path for r in sim.received]
    assert paths == [TIME_PATH, STOP_PATH, STOP_PATH, TIME_PATH, STOP_PATH]
    expired = sim.received[2]
    assert (expired.answered_code, expired.auth) == (-1, "bad")
    assert sim.received[4].params["timeStamp"] != sim.received[1].params["timeStamp"]
    assert sim.received[4].auth == "hash"


async def test_expired_again_after_the_retry_is_an_api_error(
    server_ssl_context: ssl.SSLContext, ca_file: Path
) -> None:
    """The retry happens once: a second 'Expired TimeStamp' is reported, not looped on."""
    clock = FakeClock(1_700_000_000.0)

    def racing_clock() -> float:
        clock.advance(11.0)  # every stamp is stale by the time it is first used
        return clock.now

    config = SimulatorConfig(api_key=KEY, clock=racing_clock)
    async with (
        await NoojeeSimulator(config).start(ssl_context=server_ssl_context) as sim,
        NoojeeClient(base_url=sim.base_url, auth="hash", api_key=KEY, ca_file=ca_file) as client,
    ):
        result = await client.send(STOP_410)
    assert result == NoojeeResult(ResultKind.API_ERROR, "Expired TimeStamp", -1, 200)
    assert not result.transient
    assert [r.path for r in sim.received] == [TIME_PATH, STOP_PATH, TIME_PATH, STOP_PATH]


async def test_pair_is_renewed_before_the_server_would_expire_it(
    sim: NoojeeSimulator, make_client: MakeClient, client_clock: FakeClock
) -> None:
    """Past the client's safety margin a new pair is fetched up front, with no failed call."""
    client = await make_client(auth="hash")
    assert (await client.send(STOP_410)).ok
    client_clock.advance(HASH_USED_LIFETIME + 1.0)
    assert (await client.send(STOP_410)).ok
    assert [r.path for r in sim.received] == [TIME_PATH, STOP_PATH, TIME_PATH, STOP_PATH]
    assert all(r.answered_code in (None, 0) for r in sim.received)


# --- classification ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (
            RecordingRequest("stop", "999", agent="Fred"),
            NoojeeResult(ResultKind.WARNING, "Call is not being recorded", 1, 200),
        ),
        (
            RecordingRequest("stop", "410", agent="Dino"),
            NoojeeResult(ResultKind.API_ERROR, "Unknown agent", -1, 200),
        ),
        (
            RecordingRequest("stop", "410", agent="Barney"),
            NoojeeResult(ResultKind.API_ERROR, "Permission denied", -1, 200),
        ),
        (
            RecordingRequest("stop", "410"),
            NoojeeResult(ResultKind.API_ERROR, "agentLoginName required", -1, 200),
        ),
        (
            RecordingRequest("start", ""),
            NoojeeResult(ResultKind.API_ERROR, "extenOrUniqueId required", -1, 200),
        ),
        (
            RecordingRequest("start", "404"),
            NoojeeResult(ResultKind.NOT_FOUND, "Call not found", -1, 200),
        ),
    ],
)
async def test_json_codes_are_classified(
    make_client: MakeClient, request_: RecordingRequest, expected: NoojeeResult
) -> None:
    """Code > 0 is a warning (still ok), Code < 0 an API error carrying Message (permanent;
    NOT_FOUND when it names the call unknown)."""
    client = await make_client()
    result = await client.send(request_)
    assert result == expected
    assert result.ok is (expected.kind is ResultKind.WARNING)
    assert not result.transient


async def test_bad_api_key_is_an_api_error(sim: NoojeeSimulator, make_client: MakeClient) -> None:
    """A wrong key answers 'Authentication failed' with HTTP 200, reported as an API error."""
    client = await make_client(api_key="wrong-key")
    result = await client.send(STOP_410)
    assert result == NoojeeResult(ResultKind.API_ERROR, "Authentication failed", -1, 200)
    assert sim.received[0].auth == "bad"


@pytest.mark.parametrize(
    ("mode", "status", "transient", "text"),
    [
        (FailureMode.HTTP_500, 500, True, "HTTP 500: Internal Server Error"),
        (FailureMode.HTTP_503, 503, True, "HTTP 503: Service Unavailable"),
        (FailureMode.HTML_404, 404, False, "HTTP 404: HTTP Status 404 - Not Found Type"),
    ],
)
async def test_http_errors_carry_status_and_a_sanitised_excerpt(
    sim: NoojeeSimulator,
    make_client: MakeClient,
    mode: FailureMode,
    status: int,
    transient: bool,
    text: str,
) -> None:
    """Non-2xx answers are HTTP errors: 5xx transient, 404 not; HTML tags never leak through."""
    client = await make_client()
    sim.set_failure(mode)
    result = await client.send(STOP_410)
    assert result.kind is ResultKind.HTTP_ERROR
    assert result.http_status == status
    assert result.transient is transient
    assert result.message.startswith(text)
    assert "<" not in result.message
    assert "font-family" not in result.message  # the page's CSS is not an excerpt
    assert len(result.message) <= len(f"HTTP {status}: ") + EXCERPT_MAX_CHARS
    _assert_clean(result)


async def test_refused_connection_is_transient_and_the_port_comes_back(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """REFUSE really closes the listener (even pooled connections); NONE re-listens on it."""
    client = await make_client()
    assert (await client.send(STOP_410)).ok  # leaves a pooled keep-alive connection
    port = sim.port
    sim.set_failure(FailureMode.REFUSE)
    first = await client.send(STOP_410)  # on the pooled connection, just aborted
    second = await client.send(STOP_410)  # on a new connection, which is refused
    for result in (first, second):
        assert result.kind is ResultKind.TRANSPORT
        assert result.transient
        assert not result.tls_verify_failed
        _assert_clean(result)
    assert "refused" in second.message
    sim.set_failure(FailureMode.NONE)
    assert (await client.send(STOP_410)).ok
    assert sim.port == port


async def test_reset_connection_is_transient(sim: NoojeeSimulator, make_client: MakeClient) -> None:
    """A connection closed without an answer is a transient transport failure."""
    client = await make_client()
    sim.set_failure(FailureMode.RESET)
    result = await client.send(STOP_410)
    assert result.kind is ResultKind.TRANSPORT
    assert result.transient
    [seen] = await sim.wait_for(1)
    assert (seen.path, seen.http_status, seen.answered_code) == (STOP_PATH, 0, None)


async def test_slow_answer_times_out(sim: NoojeeSimulator, make_client: MakeClient) -> None:
    """An answer slower than request_timeout is a transient TIMEOUT, not a hang."""
    client = await make_client(request_timeout=0.2)
    sim.set_failure(FailureMode.SLOW, delay=30.0)
    result = await client.send(STOP_410)
    assert result.kind is ResultKind.TIMEOUT
    assert result.transient
    assert not result.ok
    await sim.wait_for(1)


async def test_whole_send_is_bounded_by_one_deadline(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """/Time plus the call together cannot outlast connect_timeout + request_timeout."""
    # Each answer alone is 0.2 s within request_timeout, the two together 0.2 s past the
    # deadline: margins a loaded box keeps (the connect timeout also covers the new TLS
    # connection after the cancellation).
    client = await make_client(auth="hash", connect_timeout=0.4, request_timeout=1.0)
    sim.set_failure(FailureMode.SLOW, delay=0.8)
    result = await client.send(STOP_410)
    assert result == NoojeeResult(ResultKind.TIMEOUT, "no answer within 1.4 s")
    assert result.transient
    assert [r.path for r in await sim.wait_for(2)] == [TIME_PATH, STOP_PATH]
    sim.set_failure(FailureMode.NONE)
    assert (await client.send(STOP_410)).ok  # the pool survived the cancellation


async def test_latency_below_the_timeout_still_succeeds(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """Added latency delays the answer without changing it."""
    client = await make_client(request_timeout=2.0)
    sim.latency = 0.05
    assert (await client.send(STOP_410)).kind is ResultKind.OK


async def test_cancellation_propagates(sim: NoojeeSimulator, make_client: MakeClient) -> None:
    """send() turns failures into results but never swallows cancellation."""
    client = await make_client()
    sim.set_failure(FailureMode.SLOW, delay=30.0)
    task = asyncio.create_task(client.send(STOP_410))
    await sim.wait_for(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_tls_verification_failure_is_permanent(sim: NoojeeSimulator) -> None:
    """Without the CA the certificate is rejected: a transport error that needs an operator."""
    async with NoojeeClient(base_url=sim.base_url, auth="apikey", api_key=KEY) as client:
        result = await client.send(STOP_410)
    assert result.kind is ResultKind.TRANSPORT
    assert result.tls_verify_failed
    assert not result.transient
    assert "certificate verification failed" in result.message
    assert sim.received == []
    _assert_clean(result)


async def test_verify_false_skips_certificate_checks(sim: NoojeeSimulator) -> None:
    """verify=False connects to a server whose CA is unknown (lab setups only)."""
    async with NoojeeClient(
        base_url=sim.base_url, auth="apikey", api_key=KEY, verify=False
    ) as client:
        assert (await client.send(STOP_410)).ok


async def test_time_failure_is_reported_with_its_cause(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """A failed /Time fetch is the request's result, prefixed so the operator knows where."""
    client = await make_client(auth="hash")
    sim.set_failure(FailureMode.HTTP_503)
    result = await client.send(STOP_410)
    assert result.kind is ResultKind.HTTP_ERROR
    assert result.message.startswith("Time: HTTP 503")
    assert result.transient
    assert [r.path for r in sim.received] == [TIME_PATH]
    sim.set_failure(FailureMode.NONE)
    assert (await client.send(STOP_410)).ok


@pytest.mark.parametrize("base_suffix", ["", "/"])
async def test_base_url_with_or_without_trailing_slash(
    sim: NoojeeSimulator, ca_file: Path, base_suffix: str
) -> None:
    """The API path is joined to the base with exactly one slash."""
    async with NoojeeClient(
        base_url=sim.base_url + base_suffix, auth="apikey", api_key=KEY, ca_file=ca_file
    ) as client:
        assert (await client.send(STOP_410)).ok
    assert sim.received[0].path == STOP_PATH


@pytest.mark.parametrize(
    "options",
    [
        {"base_url": "ftp://example.com/rest"},
        {"base_url": "https://example.com/rest?apiKey=x"},
        {"api_key": ""},
        {"auth": "basic"},
        {"request_timeout": 0},
        {"max_connections": 0},
    ],
)
def test_bad_configuration_is_rejected_at_construction(options: dict[str, Any]) -> None:
    """Configuration mistakes raise ValueError up front, never at the first call."""
    settings_: dict[str, Any] = {
        "base_url": "https://example.com/servicemanager/rest",
        "auth": "apikey",
        "api_key": KEY,
    }
    settings_.update(options)
    with pytest.raises(ValueError, match=r".") as info:
        NoojeeClient(**settings_)
    assert KEY not in str(info.value)


def test_unknown_action_is_rejected() -> None:
    """A RecordingRequest with an action other than start/stop cannot be built."""
    with pytest.raises(ValueError, match="action"):
        RecordingRequest("pause", "410")  # type: ignore[arg-type]


# --- hygiene: transports that misbehave in ways the simulator does not -----------------------


async def _send_via(handler: Callable[[httpx.Request], httpx.Response], auth: str) -> NoojeeResult:
    transport = httpx.MockTransport(handler)
    async with NoojeeClient(
        base_url="https://noojee.example/servicemanager/rest",
        auth=auth,  # type: ignore[arg-type]
        api_key=KEY,
        transport=transport,
    ) as client:
        return await client.send(STOP_410)


@pytest.mark.parametrize(
    ("body", "excerpt"),
    [
        ("<html>login page</html>", "login page"),
        ("", "empty body"),
        ("-1392356108888", "-1392356108888"),
        ("1392356108888 " + " " * 40 + "x", "1392356108888 x"),
    ],
)
async def test_non_integer_time_body_is_an_error_result(body: str, excerpt: str) -> None:
    """A /Time body that is not epoch milliseconds is an error result, not an exception."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=body)

    result = await _send_via(handler, "hash")
    assert result.kind is ResultKind.API_ERROR
    assert not result.transient
    assert result.message == f"Time: Time answered no epoch milliseconds: {excerpt}"


async def test_time_body_whitespace_is_tolerated() -> None:
    """Whitespace around the /Time integer is ignored; the hash covers the bare digits."""
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if request.url.path.endswith("/Time"):
            return httpx.Response(200, text=" 1392356108888\r\n")
        return httpx.Response(200, json={"Message": "Recording stopped", "Code": 0})

    assert (await _send_via(handler, "hash")).ok
    assert calls[1].url.params["timeStamp"] == "1392356108888"
    assert calls[1].url.params["hash"] == _hash("1392356108888")


@pytest.mark.parametrize("auth", ["apikey", "hash"])
async def test_echoed_secrets_never_reach_the_message(auth: str) -> None:
    """An error page that echoes the request URL has the key and hash scrubbed."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/Time"):
            return httpx.Response(200, text="1392356108888")
        echo = f"<p>Bad request {request.url} hash {_hash('1392356108888')} key {KEY}</p>"
        return httpx.Response(400, text=echo)

    result = await _send_via(handler, auth)
    assert result.kind is ResultKind.HTTP_ERROR
    assert not result.transient
    assert _hash("1392356108888") not in result.message
    _assert_clean(result)


@pytest.mark.parametrize("auth", ["apikey", "hash"])
async def test_httpx_request_log_lines_are_redacted(
    sim: NoojeeSimulator, make_client: MakeClient, caplog: pytest.LogCaptureFixture, auth: str
) -> None:
    """httpx logs each request URL at INFO; the key and hash in it are redacted."""
    caplog.set_level(logging.INFO, logger="httpx")
    client = await make_client(auth=auth)
    assert (await client.send(STOP_410)).ok
    lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert any("CallManagementAPI/stop" in line for line in lines)
    assert all(KEY not in line for line in lines)
    stop = sim.received[-1]
    secret = stop.params.get("hash") or stop.params["apiKey"]
    assert all(secret not in line for line in lines)


def test_percent_encoded_key_is_scrubbed_too() -> None:
    """A key with reserved characters is also scrubbed in its URL-encoded form."""
    key = "k&y=/sëcret"
    body = f"no route for /stop?x=1&apiKey={quote(key, safe='')} (key {key})".encode()
    result = classify_response(404, body, secret=key)
    assert key not in result.message
    assert quote(key, safe="") not in result.message


async def test_tls_to_a_plain_http_port_is_a_transient_tls_failure() -> None:
    """Speaking TLS to a plain-HTTP port fails the handshake: transport, not verification."""
    async with NoojeeSimulator(SimulatorConfig(api_key=KEY)) as sim:
        url = sim.base_url.replace("http://", "https://")
        async with NoojeeClient(base_url=url, auth="apikey", api_key=KEY) as client:
            result = await client.send(STOP_410)
    assert result.kind is ResultKind.TRANSPORT
    assert result.message.startswith("TLS failure: ")
    assert not result.tls_verify_failed
    assert result.transient


async def test_exception_text_with_the_url_is_scrubbed() -> None:
    """Exception strings that contain the URL lose the key before they become a message."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {request.url}", request=request)

    result = await _send_via(handler, "apikey")
    assert result.kind is ResultKind.TRANSPORT
    assert result.transient
    assert "apiKey=***" in result.message
    _assert_clean(result)


def test_redact_url_hides_key_and_hash() -> None:
    """redact_url replaces apiKey and hash values, and keeps everything else readable."""
    url = f"https://h/servicemanager/rest/CallManagementAPI/stop?extenOrUniqueId=410&apiKey={KEY}"
    assert redact_url(url) == url.replace(KEY, "***")
    hashed = httpx.URL("https://h/x", params={"timeStamp": "1", "hash": _hash("1")})
    assert redact_url(hashed) == "https://h/x?timeStamp=1&hash=***"
    assert redact_url("https://user:secret@h/x") == "https://user:***@h/x"


_VALUES = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(target=_VALUES, agent=_VALUES, tag=_VALUES)
def test_request_url_is_the_one_httpx_parses_from_its_text(
    target: str, agent: str, tag: str
) -> None:
    """The URL the client builds without parsing it again (the query set in httpx.URL's parsed
    form) is the one httpx.URL makes of the same text, and carries every value intact."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"Message": "ok", "Code": 0})

    async def start() -> NoojeeResult:
        async with NoojeeClient(
            base_url="https://noojee.example:8443/servicemanager/rest/",
            auth="apikey",
            api_key=KEY,
            transport=httpx.MockTransport(handler),
        ) as client:
            return await client.send(RecordingRequest("start", target, agent=agent, tag=tag))

    assert asyncio.run(start()).ok
    [request] = seen
    parsed = httpx.URL(str(request.url))
    assert request.url == parsed
    assert (request.url.raw_path, request.url.query) == (parsed.raw_path, parsed.query)
    assert request.url.path == START_PATH
    assert dict(request.url.params) == {
        "extenOrUniqueId": target,
        "agentLoginName": agent,
        "tag": tag,
        "apiKey": KEY,
    }
    assert request.headers["host"] == "noojee.example:8443"


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=30) | st.from_regex(r"[A-Za-z0-9_.~-]*", fullmatch=True))
def test_a_value_is_quoted_as_quote_does_it(value: str) -> None:
    """The client's quoting (a value of unreserved characters left as it is, without calling
    quote()) gives what quote() gives, surrogates from AGI's bytes included."""
    assert _quoted(value) == quote(value, safe="", errors="surrogateescape")


@settings(max_examples=200, deadline=None)
@given(key=st.text(min_size=1, max_size=40))
def test_redact_url_hides_any_key(key: str) -> None:
    """Whatever the key, the redacted URL carries *** as the apiKey value."""
    url = httpx.URL("https://h/CallManagementAPI/stop", params={"x": "1", "apiKey": key})
    assert httpx.URL(redact_url(url)).params["apiKey"] == "***"


def test_a_repeated_answer_is_classified_for_its_own_secret() -> None:
    """Answers classified once and looked up again still scrub the secret they are given, and
    a large answer (not remembered) is classified like a small one."""
    body = b'{"Message":"bad key sesame","Code":-1}'
    assert classify_response(200, body, secret="sesame").message == "bad key ***"
    assert classify_response(200, body, secret="other").message == "bad key sesame"
    assert classify_response(200, body, secret="sesame").message == "bad key ***"
    padded = body[:-1] + b" " * 1000 + b"}"
    assert classify_response(200, padded, secret="sesame") == classify_response(
        200, body, secret="sesame"
    )


@settings(max_examples=300, deadline=None)
@given(status=st.integers(100, 599), body=st.binary(max_size=600))
def test_classify_response_never_raises_and_messages_stay_clean(status: int, body: bytes) -> None:
    """Any status and body yield a result with a short, printable, quote-free message."""
    result = classify_response(status, body, secret=KEY)
    assert isinstance(result.kind, ResultKind)
    # Only NoojeeContact's answer confirms: its JSON with a Code of 0 or more, or nothing.
    envelope = classify_response(200, body)
    confirming = (envelope.code is not None and envelope.code >= 0) or not body.strip()
    assert result.ok is (200 <= status < 300 and confirming)
    _assert_clean(result)


@pytest.mark.parametrize(
    ("status", "body", "kind", "code", "message"),
    [
        (200, b'{"Message":"Channel Hungup","Code":0}', ResultKind.OK, 0, "Channel Hungup"),
        (200, b'{"Message":"odd","Code":"2"}', ResultKind.WARNING, 2, "odd"),
        (
            200,
            b"done",
            ResultKind.UNEXPECTED,
            None,
            "unexpected answer, HTTP 200 with a body that is not its JSON: done",
        ),
        (
            200,
            b'{"Code": -1, "Message": "Permission den',
            ResultKind.UNEXPECTED,
            None,
            "unexpected answer, HTTP 200 with a body that is not its JSON: "
            "{'Code': -1, 'Message': 'Permission den",
        ),
        (
            200,
            b'{"Message":"Recording stopped"}',
            ResultKind.UNEXPECTED,
            None,
            "unexpected answer, HTTP 200 with JSON without a Code: {'Message':'Recording stopped'}",
        ),
        (
            200,
            b"<html><head><title>Sign in</title></head><body><form>Password</form></body></html>",
            ResultKind.UNEXPECTED,
            None,
            "unexpected answer, HTTP 200 with a body that is not its JSON: Password",
        ),
        (204, b"", ResultKind.OK, None, "HTTP 204 with an empty body"),
        (500, b'{"Message":"Boom","Code":-3}', ResultKind.API_ERROR, -3, "Boom"),
        (200, b'{"Message":"Call not found","Code":-1}', ResultKind.NOT_FOUND, -1, None),
        (200, b'{"Message":"No such call","Code":-2}', ResultKind.NOT_FOUND, -2, None),
        (200, b'{"Message":"Agent not found","Code":-1}', ResultKind.API_ERROR, -1, None),
        (502, b"\x00bad\tgate\nway\x7f", ResultKind.HTTP_ERROR, None, "HTTP 502: bad gate way"),
        (200, b"[" * 100_000, ResultKind.UNEXPECTED, None, None),
        (
            400,
            b'say "hi" \\ <b>now</b> &amp; then',
            ResultKind.HTTP_ERROR,
            None,
            "HTTP 400: say 'hi' / now & then",
        ),
    ],
)
def test_classify_response_table(
    status: int, body: bytes, kind: ResultKind, code: int | None, message: str | None
) -> None:
    """The reference's rules, including nested JSON and control characters, case by case."""
    result = classify_response(status, body)
    assert (result.kind, result.code, result.http_status) == (kind, code, status)
    if message is not None:
        assert result.message == message
    _assert_clean(result)


def test_long_excerpts_are_cut() -> None:
    """An excerpt is cut to its limit, a server Message to the message limit."""
    page = classify_response(503, b"x" * 5000)
    assert page.message == "HTTP 503: " + "x" * (EXCERPT_MAX_CHARS - 3) + "..."
    chatty = classify_response(200, json.dumps({"Message": "y" * 500, "Code": 1}).encode())
    assert len(chatty.message) == MESSAGE_MAX_CHARS


async def test_no_result_message_contains_the_key(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """Across every failure mode and both schemes, the key never appears in a message."""
    results: list[NoojeeResult] = []
    for auth in ("apikey", "hash"):
        client = await make_client(auth=auth, request_timeout=0.2)
        for mode in FailureMode:
            sim.set_failure(mode, delay=5.0)
            results.append(await client.send(STOP_410))
        sim.set_failure(FailureMode.NONE)
    assert {r.kind for r in results} >= {
        ResultKind.OK,
        ResultKind.HTTP_ERROR,
        ResultKind.TIMEOUT,
        ResultKind.TRANSPORT,
    }
    for result in results:
        _assert_clean(result)


# --- the simulator itself ------------------------------------------------------------------


async def test_failure_modes_switch_at_run_time(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """Each mode takes effect on the next request; NONE restores normal answers."""
    client = await make_client()
    kinds = []
    for mode in (FailureMode.HTTP_500, FailureMode.NONE, FailureMode.RESET, FailureMode.NONE):
        sim.set_failure(mode)
        assert sim.failure_mode is mode
        kinds.append((await client.send(STOP_410)).kind)
    assert kinds == [ResultKind.HTTP_ERROR, ResultKind.OK, ResultKind.TRANSPORT, ResultKind.OK]


async def test_control_api(sim: NoojeeSimulator, ca_file: Path, make_client: MakeClient) -> None:
    """/_sim/received lists requests; /_sim/failure and /_sim/reset switch the simulator."""
    root = sim.base_url.removesuffix(PREFIX)
    client = await make_client()
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_file)) as http:
        assert (await client.send(STOP_410)).ok
        listed = (await http.get(f"{root}/_sim/received")).json()
        assert [(r["path"], r["params"]["apiKey"]) for r in listed] == [(STOP_PATH, KEY)]
        answer = await http.post(f"{root}/_sim/failure", params={"mode": "http_503"})
        assert answer.json() == {"Message": "ok: failure http_503", "Code": 0}
        assert sim.failure_mode is FailureMode.HTTP_503
        assert (await client.send(STOP_410)).http_status == 503
        latency = await http.post(f"{root}/_sim/latency", params={"seconds": "0.01"})
        assert latency.status_code == 200
        assert sim.latency == pytest.approx(0.01)
        assert (await http.post(f"{root}/_sim/reset")).status_code == 200
        assert (sim.failure_mode, sim.received, sim.latency) == (FailureMode.NONE, [], 0.0)
        bad = await http.post(f"{root}/_sim/failure", params={"mode": "explode"})
        assert bad.status_code == 400
        wrong_method = await http.post(f"{root}/_sim/received")
        assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "GET")
    assert (await client.send(STOP_410)).ok


async def test_control_api_refuse_with_duration_comes_back(
    sim: NoojeeSimulator, ca_file: Path, make_client: MakeClient
) -> None:
    """refuse over the control API answers first, then refuses until its duration ends."""
    root = sim.base_url.removesuffix(PREFIX)
    client = await make_client()
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_file)) as http:
        answer = await http.post(
            f"{root}/_sim/failure", params={"mode": "refuse", "duration": "0.2"}
        )
    assert answer.status_code == 200
    assert sim.failure_mode is FailureMode.REFUSE
    assert (await client.send(STOP_410)).kind is ResultKind.TRANSPORT
    await sim.wait_mode(FailureMode.NONE)
    assert (await client.send(STOP_410)).ok


async def test_simulator_http_details(sim: NoojeeSimulator, ca_file: Path) -> None:
    """Non-POST answers 405 JSON, unknown paths an HTML 404, a form body counts as params."""
    root = sim.base_url.removesuffix(PREFIX)
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_file)) as http:
        get = await http.get(f"{sim.base_url}/CallManagementAPI/stop")
        assert (get.status_code, get.headers["allow"]) == (405, "POST")
        assert get.json() == {"Message": "Method Not Allowed", "Code": -1}
        missing = await http.post(f"{root}/nowhere?apiKey={KEY}")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("text/html")
        assert KEY not in missing.text
        form = await http.post(
            f"{sim.base_url}/CallManagementAPI/start?extenOrUniqueId=410",
            data={"apiKey": KEY, "extenOrUniqueId": "ignored", "tag": "t1"},
        )
        assert form.json() == {"Message": "Recording started", "Code": 0}
    started = sim.received[-1]
    assert started.params == {"extenOrUniqueId": "410", "apiKey": KEY, "tag": "t1"}
    assert [r.http_status for r in sim.received] == [405, 404, 200]


async def test_simulator_checks_hash_and_issued_timestamps(
    sim: NoojeeSimulator, ca_file: Path, sim_clock: FakeClock
) -> None:
    """Wrong hashes fail authentication; stamps never issued or left unused for 10 s expire."""
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_file)) as http:

        async def call(stamp: str, digest: str) -> Any:
            params = {"extenOrUniqueId": "410", "agentLoginName": "Fred"}
            params |= {"timeStamp": stamp, "hash": digest}
            return (await http.post(f"{sim.base_url}/CallManagementAPI/stop", params=params)).json()

        stamp = (await http.post(f"{sim.base_url}/Time")).text
        assert await call(stamp, _hash(stamp).upper()) == {
            "Message": "Authentication failed",
            "Code": -1,
        }
        assert await call("12345", _hash("12345")) == {"Message": "Expired TimeStamp", "Code": -1}
        sim_clock.advance(10.5)
        assert await call(stamp, _hash(stamp)) == {"Message": "Expired TimeStamp", "Code": -1}
        fresh = (await http.post(f"{sim.base_url}/Time")).text
        assert (await call(fresh, _hash(fresh)))["Code"] == 0
        sim_clock.advance(3599.0)  # an hour after first use: still valid
        assert (await call(fresh, _hash(fresh)))["Code"] == 0
    assert [r.auth for r in sim.received] == ["none", "bad", "bad", "bad", "none", "hash", "hash"]


async def test_simulator_answers_garbage_with_400_and_closes() -> None:
    """A request h11 cannot parse gets a 400 and a closed connection, not a hung task."""
    async with NoojeeSimulator(SimulatorConfig(api_key=KEY)) as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert sim.received == []


async def test_simulator_keeps_connections_alive_and_stop_leaves_no_tasks() -> None:
    """Several requests share one connection; stop() closes idle ones and ends their tasks."""
    before = asyncio.all_tasks()
    sim = await NoojeeSimulator(SimulatorConfig(api_key=KEY)).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    request = (
        f"POST {STOP_PATH}?extenOrUniqueId=410&agentLoginName=Fred&apiKey={KEY} HTTP/1.1\r\n"
        "Host: x\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    writer.write(request * 3)  # pipelined on one keep-alive connection
    answers = b""
    while answers.count(b'"Code":0}') < 3:
        answers += await reader.read(65536)
    assert answers.count(b"HTTP/1.1 200 ") == 3
    assert len(asyncio.all_tasks() - before) == 1  # one connection task
    await sim.stop()
    assert asyncio.all_tasks() - before == set()
    assert await reader.read() == b""  # closed by stop()
    writer.close()
    await writer.wait_closed()


async def test_wait_for_filters_and_times_out(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """wait_for wakes on arrivals, applies the predicate and reports what it saw on timeout."""
    client = await make_client()
    waiter = asyncio.create_task(sim.wait_for(2, predicate=lambda r: r.path == START_PATH))
    await client.send(STOP_410)
    await client.send(RecordingRequest("start", "1"))
    await client.send(RecordingRequest("start", "2"))
    starts = await waiter
    assert [r.params["extenOrUniqueId"] for r in starts] == ["1", "2"]
    with pytest.raises(TimeoutError, match="waited"):
        await sim.wait_for(10, timeout=0.05)
    sim.clear()
    assert sim.received == []


async def test_run_simulator_prints_redacted_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stand-alone runner prints and records one redacted JSON line per request."""
    record = tmp_path / "requests.jsonl"
    ready: asyncio.Future[NoojeeSimulator] = asyncio.get_running_loop().create_future()
    runner = asyncio.create_task(
        run_simulator(
            listen_host="127.0.0.1",
            listen_port=0,
            tls_cert=None,
            tls_key=None,
            config=SimulatorConfig(api_key=KEY),
            record=record,
            ready=ready.set_result,
        )
    )
    sim = await ready
    assert sim.base_url.startswith("http://127.0.0.1:")
    async with NoojeeClient(base_url=sim.base_url, auth="apikey", api_key=KEY) as client:
        assert (await client.send(STOP_410)).ok
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    out, err = capsys.readouterr()
    [line] = out.splitlines()
    assert json.loads(line)["params"] == {
        "extenOrUniqueId": "410",
        "agentLoginName": "Fred",
        "apiKey": "***",
    }
    assert KEY not in out
    assert record.read_text().splitlines() == [line]
    assert json.loads(err.splitlines()[0])["event"] == "simulator.listening"


# SIGTERM to the finished process: a stop signal ends it at once, this only bounds a hang.
SIMULATOR_EXIT_DEADLINE = 10.0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_simulate_noojee_process_exits_0_on_stop_signal(signum: signal.Signals) -> None:
    """`agi-bridge simulate-noojee` ends with status 0 on SIGTERM/SIGINT, as docker stop needs."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bridge", "simulate-noojee", "--listen", "127.0.0.1:0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        async with asyncio.timeout(SIMULATOR_EXIT_DEADLINE):
            listening = json.loads(await process.stderr.readline())
            assert listening["event"] == "simulator.listening", listening
            process.send_signal(signum)
            rest = (await process.stderr.read()).decode()
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, rest
    assert json.loads(rest.splitlines()[-1]) == {
        "event": "simulator.stopping",
        "signal": signum.name,
    }


def test_received_request_is_frozen() -> None:
    """Recorded requests cannot be altered after the fact."""
    seen = ReceivedRequest("POST", "/", {}, {}, b"", "none", None, 404, 0.0)
    with pytest.raises(AttributeError):
        seen.path = "/x"  # type: ignore[misc]


async def test_garbage_instead_of_http_is_a_transient_transport_error() -> None:
    """A peer answering something that is not HTTP (a broken proxy): send() returns a
    transient TRANSPORT result instead of raising, and the key is not in the message."""

    async with (
        raw_http_server() as port,
        NoojeeClient(
            base_url=f"http://127.0.0.1:{port}/rest", auth="apikey", api_key=KEY
        ) as client,
    ):
        result = await client.send(STOP_410)
    assert result.kind is ResultKind.TRANSPORT
    assert result.transient
    assert KEY not in result.message


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("30", 30.0),
        (" 0 ", 0.0),
        ("Wed, 02 Dec 2026 00:01:00 GMT", 60.0),  # an HTTP date, a minute after "now"
        ("Wed, 02 Dec 2026 00:00:00 GMT", 0.0),  # already past
        ("999999999", MAX_RETRY_AFTER),
        ("soon", None),
        ("-5", None),
        (None, None),
    ],
)
def test_retry_after_is_read_as_seconds_or_a_date_and_bounded(
    header: str | None, seconds: float | None
) -> None:
    """Retry-After as delta-seconds or an HTTP date, at most a day; unreadable means none."""
    now = 1796169600.0  # Wed, 02 Dec 2026 00:00:00 GMT
    assert retry_after_seconds(header, now) == seconds


@pytest.mark.parametrize(
    ("mode", "uncertain"),
    [
        (FailureMode.REFUSE, False),  # nothing reached NoojeeContact: a start may be resent
        (FailureMode.RESET, True),  # read, then no answer: it may have acted
        (FailureMode.SLOW, True),  # read timeout: it may have acted
        (FailureMode.HTTP_503, False),  # "not now": the request was not taken
        (FailureMode.HTTP_500, True),  # the server may have acted before it failed
    ],
)
async def test_a_failure_says_whether_the_request_may_have_reached_noojeecontact(
    sim: NoojeeSimulator, make_client: MakeClient, mode: FailureMode, uncertain: bool
) -> None:
    """Only a failure before a byte was sent (or an answer refusing it) leaves a start safe to
    resend; a reset or a timeout after sending is uncertain."""
    client = await make_client(request_timeout=0.2)
    sim.set_failure(mode, delay=5.0)
    result = await client.send(STOP_410)
    assert not result.ok
    assert result.transient
    assert result.uncertain is uncertain


async def test_a_missing_time_stamp_means_the_request_was_never_sent(
    sim: NoojeeSimulator, make_client: MakeClient
) -> None:
    """Hash scheme: /Time times out, so the start itself never left: not uncertain."""
    client = await make_client(auth="hash", request_timeout=0.2)
    sim.set_failure(FailureMode.SLOW, delay=5.0)
    result = await client.send(STOP_410)
    assert result.kind is ResultKind.TIMEOUT
    assert result.unsent
    assert not result.uncertain
    assert [r.path for r in sim.received] == [sim.config.prefix + "/Time"]


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (
            200,
            [(b"Content-Type", b"application/json"), (b"Content-Length", b"25")],
            b'{"Message":"ok","Code":0}',
        ),
        (
            503,
            [
                (b"Retry-After", b"30"),
                (b"X-Caf\xc3\xa9", b"cr\xe8me"),
                (b"x-dup", b"1"),
                (b"X-Dup", b"2"),
            ],
            b"busy",
        ),
        (204, [], b""),
    ],
)
def test_a_response_is_the_one_httpx_builds_from_the_same_answer(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """The transport builds its response from httpx's parts without httpx's own passes over
    them (the headers, the body's decoders): whatever a caller reads of it is what httpx
    gives for the same answer once read, and it is read and closed."""
    request = httpx.Request("POST", "https://noojee.example/x")
    ours = _whole_response(status, headers, body, request)
    theirs = httpx.Response(status, headers=headers, stream=httpx.ByteStream(body), request=request)
    theirs.read()
    assert ours.status_code == theirs.status_code
    assert ours.headers.raw == theirs.headers.raw
    assert ours.headers.multi_items() == theirs.headers.multi_items()
    assert ours.headers.encoding == theirs.headers.encoding
    assert ours.headers.get("retry-after") == theirs.headers.get("retry-after")
    assert ours.content == theirs.content
    assert ours.text == theirs.text
    assert (ours.is_closed, ours.is_stream_consumed) == (True, True)
    assert ours.http_version == "HTTP/1.1"
    assert ours.request is request
