"""The parts of delivery on their own: a fake clock, a fake NoojeeContact client, a real spool.

The end-to-end behaviour (real sockets, real HTTPS) is pinned down in test_server.py and
test_robustness.py; these pin down what each part promises to the others.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import agi_bridge.delivery
from agi_bridge.delivery import Delivery, sync
from agi_bridge.delivery.config import Connections, DeliveryConfig, Retry
from agi_bridge.delivery.ended import RecentCalls
from agi_bridge.delivery.ledger import Ledger
from agi_bridge.delivery.repeats import RepeatCache
from agi_bridge.delivery.sender import Sender, _Slots
from agi_bridge.delivery.sync import SyncPath, queued
from agi_bridge.delivery.worker import Worker
from agi_bridge.metrics import Metrics
from agi_bridge.spool import Spool, SpoolEntry
from agi_bridge.vocabulary import (
    HandOff,
    NoojeeResult,
    Outcome,
    RecordingRequest,
    ResultKind,
    Status,
)
from tests.clock import FakeClock

STOP = RecordingRequest("stop", "410", agent="Fred")
START = RecordingRequest("start", "410", agent="Fred")
OK = NoojeeResult(ResultKind.OK, "Recording stopped", 0, 200)
DENIED = NoojeeResult(ResultKind.API_ERROR, "Permission denied", -1, 200)
NOT_FOUND = NoojeeResult(ResultKind.NOT_FOUND, "Call not found", -1, 200)
DOWN = NoojeeResult(ResultKind.HTTP_ERROR, "HTTP 503: Service Unavailable", None, 503)
WINDOW = 60.0
CONNECTIONS = Connections()


class FakeClient:
    """Answers each request with ``result``; holds every answer while ``gate`` is closed."""

    def __init__(self, result: NoojeeResult, *, gate: asyncio.Event | None = None) -> None:
        self.result = result
        self.gate = gate
        self.sent: list[RecordingRequest] = []
        self.called = asyncio.Event()
        self._counts: dict[int, asyncio.Event] = {}

    async def send(self, request: RecordingRequest) -> NoojeeResult:
        self.sent.append(request)
        self.called.set()
        for count, reached in self._counts.items():
            if len(self.sent) >= count:
                reached.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.result

    async def sent_at_least(self, count: int) -> None:
        """Return once ``count`` requests have been sent (bounded: a test must not hang)."""
        reached = self._counts.setdefault(count, asyncio.Event())
        if len(self.sent) >= count:
            reached.set()
        async with asyncio.timeout(10):
            await reached.wait()


@dataclass
class Parts:
    """Delivery's parts wired as the facade wires them, around one fake client."""

    spool: Spool
    client: FakeClient
    clock: FakeClock
    metrics: Metrics
    sender: Sender
    repeats: RepeatCache
    ledger: Ledger
    sync: SyncPath
    worker: Worker


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    try:
        yield spool
    finally:
        spool.close()


def _parts(
    spool: Spool,
    client: FakeClient,
    clock: FakeClock | None = None,
    *,
    retry: Retry | None = None,
    write_ahead_after: float = DeliveryConfig().write_ahead_after,
    ended: RecentCalls | None = None,
) -> Parts:
    clock = clock or FakeClock(1000.0)
    metrics = Metrics()
    retry = retry or Retry()
    sender = Sender(connections=CONNECTIONS, client=client, metrics=metrics, clock=clock)
    repeats = RepeatCache(window=WINDOW, spool=spool, clock=clock)
    max_age = DeliveryConfig().extension_max_age
    ledger = Ledger(
        retry=retry,
        extension_max_age=max_age,
        spool=spool,
        metrics=metrics,
        repeats=repeats,
        wall_clock=clock,
    )
    worker = Worker(
        retry=retry,
        extension_max_age=max_age,
        spool=spool,
        sender=sender,
        ledger=ledger,
        metrics=metrics,
        wall_clock=clock,
        ended=ended or RecentCalls(max_age=max_age, wall_clock=clock),
    )
    sync = SyncPath(
        write_ahead_after=write_ahead_after,
        spool=spool,
        sender=sender,
        ledger=ledger,
        wake=worker.wake,
    )
    return Parts(spool, client, clock, metrics, sender, repeats, ledger, sync, worker)


@pytest.fixture
def parts(spool: Spool) -> Parts:
    """The parts around a client that confirms every request."""
    return _parts(spool, FakeClient(OK))


async def _repeat_after_queued(parts: Parts, entry: int) -> Outcome:
    """What a repeat hears once the first press was answered QUEUED with ``entry``."""
    answer = await parts.repeats.answer(STOP, _done(Outcome(Status.QUEUED, "slow", entry)))
    assert answer is not None
    return answer


async def _queued_entry(spool: Spool, request: RecordingRequest = STOP) -> int:
    return await spool.add(request, call_uniqueid="1795811871.1")


def _done(outcome: Outcome) -> asyncio.Future[Outcome]:
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    future.set_result(outcome)
    return future


# --- the repeat cache ------------------------------------------------------------------------


async def test_a_repeat_within_the_window_gets_the_first_outcome_and_none_after(
    spool: Spool,
) -> None:
    """Same action, same call, within the window: the first outcome; past it, or for the
    other action or another call, nothing."""
    clock = FakeClock(1000.0)
    repeats = RepeatCache(window=WINDOW, spool=spool, clock=clock)
    key = ("410", "1795811871.1")
    outcome = repeats.remember(key, "stop")
    assert repeats.earlier(key, "stop") is outcome
    assert repeats.earlier(key, "start") is None
    assert repeats.earlier(("410", "1795811871.2"), "stop") is None
    clock.advance(WINDOW + 0.001)
    assert repeats.earlier(key, "stop") is None


async def test_a_request_answered_keeps_its_outcome_not_a_future(spool: Spool) -> None:
    """While a request is under way its repeats wait on a future; once answered the window
    holds the outcome itself (a future per session kept for a minute is memory for nothing),
    and a repeat then hears it at once."""
    repeats = RepeatCache(window=WINDOW, spool=spool, clock=FakeClock(1000.0))
    key = ("410", "1795811871.1")
    stopped = Outcome(Status.STOPPED, "Recording stopped")
    sent = asyncio.Event()

    async def send(hand_off: HandOff) -> Outcome:
        under_way = repeats.earlier(key, "stop")
        assert isinstance(under_way, asyncio.Future)
        assert not under_way.done()
        sent.set()
        return stopped

    assert await repeats.once(key, STOP, send, _never_handed_off) == (stopped, False)
    assert sent.is_set()
    assert repeats.earlier(key, "stop") is stopped
    repeated, was_repeat = await repeats.once(key, STOP, send, _never_handed_off)
    assert was_repeat
    assert repeated.status is Status.STOPPED


async def test_a_repeat_hears_the_answer_handed_off_not_the_late_attempt(spool: Spool) -> None:
    """A sync stop outlives its budget: its session is answered QUEUED through the hand-off
    while the attempt goes on in the session's task. A repeat on the same call hears that at
    once; it does not wait for the first attempt, still on its way."""
    gate = asyncio.Event()
    client = FakeClient(OK, gate=gate)
    config = DeliveryConfig(write_ahead_after=0.0)
    delivery = Delivery(config=config, client=client, spool=spool, metrics=Metrics())
    handed: asyncio.Future[Awaitable[Outcome]] = asyncio.get_running_loop().create_future()
    first = asyncio.create_task(
        delivery.submit(
            STOP, call_uniqueid="1.1", mode="sync", budget=0.05, hand_off=handed.set_result
        )
    )
    heard = await (await asyncio.wait_for(handed, timeout=5))
    assert heard.status is Status.QUEUED
    repeat = delivery.submit(
        STOP, call_uniqueid="1.1", mode="sync", budget=0.05, hand_off=_never_handed_off
    )
    repeated = await asyncio.wait_for(repeat, timeout=5)
    assert repeated is not None
    assert repeated.status is Status.QUEUED
    assert repeated.message.startswith("repeat within")
    assert not first.done()  # the first attempt is still on its way
    gate.set()
    assert await first is None
    await delivery.drain(5)
    assert client.sent == [STOP]
    assert spool.admin.list("pending") == []


async def test_a_repeat_after_queued_and_delivered_hears_stopped(
    parts: Parts, spool: Spool
) -> None:
    """The entry left the spool because it was delivered: the repeat hears STOPPED."""
    entry = await _queued_entry(spool)
    await parts.ledger.delivered(entry, "Recording stopped")
    answer = await _repeat_after_queued(parts, entry)
    assert answer == Outcome(
        Status.STOPPED, "repeat within 60s, sent once: delivered since it was queued"
    )


async def test_a_repeat_after_queued_and_not_found_is_not_told_stopped(
    parts: Parts, spool: Spool
) -> None:
    """NoojeeContact did not know the call: the entry is settled without a dead letter, and
    the repeat hears FAILED with the reason, never STOPPED."""
    entry = await _queued_entry(spool)
    await parts.ledger.failed(entry, STOP, NOT_FOUND, attempts=0, created=parts.clock())
    assert spool.admin.list("pending") == spool.admin.list("dead") == []
    answer = await _repeat_after_queued(parts, entry)
    assert answer == Outcome(
        Status.FAILED,
        "repeat within 60s, sent once: not confirmed since it was queued: Call not found",
    )


async def test_a_repeat_after_queued_and_purged_is_not_told_stopped(
    parts: Parts, spool: Spool
) -> None:
    """An entry gone without a record of its fate (an operator purged it) was never
    confirmed: FAILED, not STOPPED."""
    entry = await _queued_entry(spool)
    assert spool.admin.purge("pending", [entry]) == 1
    answer = await _repeat_after_queued(parts, entry)
    assert answer.status is Status.FAILED
    assert answer.message.endswith("no longer queued and never confirmed")


async def test_fates_are_kept_no_longer_than_the_window(parts: Parts, spool: Spool) -> None:
    """A fate older than the window is forgotten (memory stays bounded): a later look-up
    finds no record and does not claim a delivery."""
    entry = await _queued_entry(spool)
    await parts.ledger.delivered(entry, "Recording stopped")
    parts.clock.advance(WINDOW + 0.001)
    answer = await _repeat_after_queued(parts, entry)
    assert answer.status is Status.FAILED


async def test_a_repeat_of_a_still_queued_request_says_so(parts: Parts, spool: Spool) -> None:
    """The entry is still pending: QUEUED again, with the last error."""
    entry = await _queued_entry(spool)
    await parts.ledger.failed(entry, STOP, DOWN, attempts=0, created=parts.clock())
    answer = await _repeat_after_queued(parts, entry)
    assert answer == Outcome(
        Status.QUEUED, "repeat within 60s, sent once: still queued: HTTP 503: Service Unavailable"
    )


# --- the ledger ------------------------------------------------------------------------------


async def test_a_start_not_found_is_a_dead_letter_and_a_stop_is_not(
    parts: Parts, spool: Spool
) -> None:
    """Only a stop for an unknown call is settled quietly; a start that finds no call needs
    an operator."""
    stop, start = await _queued_entry(spool, STOP), await _queued_entry(spool, START)
    await parts.ledger.failed(stop, STOP, NOT_FOUND, attempts=0, created=parts.clock())
    await parts.ledger.failed(start, START, NOT_FOUND, attempts=0, created=parts.clock())
    assert [entry.id for entry in spool.admin.list("dead")] == [start]
    assert spool.admin.list("pending") == []


async def test_a_transient_failure_is_retried_until_the_age_limit(spool: Spool) -> None:
    """Transient: counted for a retry; the same failure once the entry is older than
    retry_max_age: a dead letter."""
    parts = _parts(spool, FakeClient(OK), retry=Retry(max_age=3600.0))
    entry = await _queued_entry(spool)
    created = parts.clock()
    await parts.ledger.failed(entry, STOP, DOWN, attempts=0, created=created)
    [pending] = spool.admin.list("pending")
    assert pending.attempts == 1
    parts.clock.advance(3600.0)
    await parts.ledger.failed(entry, STOP, DOWN, attempts=1, created=created)
    assert [dead.id for dead in spool.admin.list("dead")] == [entry]


# --- the sync path ---------------------------------------------------------------------------


def _never_handed_off(later: Awaitable[Outcome]) -> None:
    raise AssertionError("the session's answer was handed off")


async def _heard(
    sync_path: SyncPath, request: RecordingRequest, call: str, budget: float
) -> Outcome:
    """What a session hears: send_within's outcome, or the one it hands off when the attempt
    outlives the budget (the attempt then goes on in the session's task, which drain awaits)."""
    handed: asyncio.Future[Awaitable[Outcome]] = asyncio.get_running_loop().create_future()
    session = asyncio.create_task(sync_path.send_within(request, call, budget, handed.set_result))
    await asyncio.wait((session, handed), return_when=asyncio.FIRST_COMPLETED)
    if handed.done():
        return await handed.result()
    outcome = session.result()
    assert outcome is not None
    return outcome


async def test_a_quick_answer_never_touches_the_spool(
    parts: Parts, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Confirmed within write_ahead_after: STOPPED, and nothing was written to the spool."""
    written: list[RecordingRequest] = []
    add = spool.add

    def spy(request: RecordingRequest, **kwargs: Any) -> asyncio.Future[int]:
        written.append(request)
        return add(request, **kwargs)

    monkeypatch.setattr(spool, "add", spy)
    outcome = await _heard(parts.sync, STOP, "1795811871.1", budget=2.0)
    await parts.sync.drain(5)
    assert outcome == Outcome(Status.STOPPED, "Recording stopped")
    assert parts.client.sent == [STOP]
    assert written == []


async def test_a_late_answer_settles_the_queued_entry_and_drain_waits_for_it(spool: Spool) -> None:
    """Past its budget the request is QUEUED (on disk); the answer that comes later removes the
    entry, and drain() returns only once that removal is written."""
    gate = asyncio.Event()
    parts = _parts(spool, FakeClient(OK, gate=gate), write_ahead_after=0.0)
    outcome = await _heard(parts.sync, STOP, "1795811871.1", budget=0.01)
    assert outcome.status is Status.QUEUED
    assert outcome.entry is not None
    assert [entry.id for entry in spool.admin.list("pending")] == [outcome.entry]
    gate.set()
    await parts.sync.drain(5)
    assert spool.admin.list("pending") == []
    assert await parts.spool.where(outcome.entry) is None
    answer = await parts.repeats.answer(STOP, _done(outcome))
    assert answer is not None
    assert answer.status is Status.STOPPED


async def test_a_start_that_cannot_be_queued_while_on_its_way_is_unconfirmed(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync start past its budget whose write-ahead fails (a full disk) while its attempt is
    still on its way: UNCONFIRMED, not FAILED, so that pressing again sends no second start."""
    gate = asyncio.Event()
    client = FakeClient(OK, gate=gate)
    parts = _parts(spool, client, write_ahead_after=0.0)

    def disk_full(*args: Any, **kwargs: Any) -> asyncio.Future[int]:
        failed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        failed.set_exception(OSError("database or disk is full"))
        return failed

    monkeypatch.setattr(spool, "add", disk_full)
    outcome = await _heard(parts.sync, START, "1795811871.1", budget=0.01)
    assert outcome.status is Status.UNCONFIRMED
    assert "may be applied" in outcome.message
    gate.set()
    await parts.sync.drain(5)
    assert client.sent == [START]


async def test_drain_cancels_an_attempt_at_its_deadline_and_keeps_the_entry(spool: Spool) -> None:
    """An attempt still hanging at the drain's deadline is cancelled; its entry stays pending
    for the next start."""
    parts = _parts(spool, FakeClient(OK, gate=asyncio.Event()), write_ahead_after=0.0)
    outcome = await _heard(parts.sync, STOP, "1795811871.1", budget=0.01)
    await parts.sync.drain(0.01)
    assert [entry.id for entry in spool.admin.list("pending")] == [outcome.entry]


async def test_a_permanent_failure_is_failed_and_dead_lettered(spool: Spool) -> None:
    """A refusal (Code < 0) is FAILED at once and kept in the dead letters once drained."""
    parts = _parts(spool, FakeClient(DENIED))
    outcome = await _heard(parts.sync, STOP, "1795811871.1", budget=2.0)
    await parts.sync.drain(5)
    assert outcome == Outcome(Status.FAILED, "Permission denied")
    [dead] = spool.admin.list("dead")
    assert dead.last_error == "Permission denied"


async def test_shutdown_writes_ahead_an_attempt_in_its_first_wait(spool: Spool) -> None:
    """write_ahead_in_flight() spools a request whose attempt has not answered yet, before
    write_ahead_after has passed."""
    client = FakeClient(OK, gate=asyncio.Event())
    parts = _parts(spool, client, write_ahead_after=30.0)
    session = asyncio.create_task(
        parts.sync.send_within(STOP, "1795811871.1", 60.0, _never_handed_off)
    )
    await client.called.wait()
    parts.sync.write_ahead_in_flight()
    session.cancel()
    await parts.sync.drain(0)
    assert session.cancelled()
    [entry] = spool.admin.list("pending")
    assert entry.request == STOP


# --- the worker ------------------------------------------------------------------------------


async def _one_batch(parts: Parts, client: FakeClient) -> None:
    """Run the worker until its first send, stop it, and let the batch in hand finish."""
    run = asyncio.create_task(parts.worker.run())
    await client.called.wait()
    parts.worker.stop()
    assert client.gate is not None
    client.gate.set()
    await asyncio.wait_for(run, timeout=5)


async def test_the_worker_delivers_what_is_due_and_records_it(spool: Spool) -> None:
    """A queued entry is sent, removed from the spool, counted, and its fate remembered; a
    stopped worker ends after the batch in hand."""
    client = FakeClient(OK, gate=asyncio.Event())
    parts = _parts(spool, client)
    entry = await _queued_entry(spool)
    await _one_batch(parts, client)
    assert client.sent == [STOP]
    assert spool.admin.list("pending") == []
    assert parts.metrics.registry.get_sample_value("agi_bridge_spool_delivered_total") == 1
    answer = await parts.repeats.answer(STOP, _done(Outcome(Status.QUEUED, "down", entry)))
    assert answer is not None
    assert answer.status is Status.STOPPED


async def test_the_worker_never_sends_a_request_by_extension_of_an_ended_call(
    spool: Spool,
) -> None:
    """A request by extension due after its call's own stop came (an attempt that failed
    without reaching NoojeeContact, a write-ahead after the stop) is settled cancelled, never
    sent: its extension may be on its next call. Other entries go on."""
    clock = FakeClock(1000.0)
    ended = RecentCalls(max_age=DeliveryConfig().extension_max_age, wall_clock=clock)
    client = FakeClient(OK, gate=asyncio.Event())
    parts = _parts(spool, client, clock, ended=ended)
    star8 = RecordingRequest("start", "410", agent="Fred", kind="extension")
    late = await spool.add(star8, call_uniqueid="1.1")
    await spool.add(STOP, call_uniqueid="1.2")
    ended.add("1.1")
    await _one_batch(parts, client)
    assert client.sent == [STOP]
    assert [(e.id, e.reason) for e in spool.admin.list("dead")] == [(late, "cancelled")]
    assert spool.admin.list("pending") == []  # the other call's stop delivered


def _spy_claims(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(limit, entries claimed) of every claim the worker makes, in order."""
    claims: list[tuple[int, int]] = []
    claim_due = spool.claim_due

    async def spy(*, limit: int, lease: float) -> list[SpoolEntry]:
        entries = await claim_due(limit=limit, lease=lease)
        claims.append((limit, len(entries)))
        return entries

    monkeypatch.setattr(spool, "claim_due", spy)
    return claims


async def test_after_a_transient_failure_the_worker_probes_one_entry_at_a_time(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails transiently stops the sending of everything: one entry at a time
    until one gets through, then the rest at full concurrency again."""
    client = FakeClient(DOWN)
    parts = _parts(spool, client, retry=Retry(initial_delay=0.001, max_delay=0.001))
    for _ in range(3):
        await _queued_entry(spool)
    claims = _spy_claims(spool, monkeypatch)
    run = asyncio.create_task(parts.worker.run())
    await client.sent_at_least(5)  # the batch of 3, then two probes
    client.result = OK
    await client.sent_at_least(8)  # a third probe gets through, then the other two
    parts.worker.stop()
    await asyncio.wait_for(run, timeout=5)
    full = CONNECTIONS.max_connections
    assert [claim for claim in claims if claim[1]] == [(full, 3), (1, 1), (1, 1), (1, 1), (full, 2)]
    assert spool.admin.list("pending") == []


async def test_a_session_getting_through_ends_the_backoff_at_once(spool: Spool) -> None:
    """While the worker waits a long backoff, a session's confirmed request proves NoojeeContact
    is back: the worker sends what is queued without waiting out the delay."""
    client = FakeClient(DOWN)
    parts = _parts(spool, client, retry=Retry(initial_delay=3600.0, max_delay=3600.0))
    for _ in range(2):
        await _queued_entry(spool)
    run = asyncio.create_task(parts.worker.run())
    await client.sent_at_least(3)  # the batch of 2, then the first probe: an hour's wait next
    client.result = OK
    assert (await parts.sender.attempt(START, from_session=True)).ok
    await client.sent_at_least(6)  # both entries, long before the hour
    parts.worker.stop()
    await asyncio.wait_for(run, timeout=5)
    assert spool.admin.list("pending") == []


# --- issue 18: starts at most once, only NoojeeContact confirms ------------------------------

RESET = NoojeeResult(ResultKind.TRANSPORT, "ReadError: connection reset")  # after sending
REFUSED = NoojeeResult(ResultKind.TRANSPORT, "cannot connect: Connection refused", unsent=True)
LOGIN_PAGE = NoojeeResult(
    ResultKind.UNEXPECTED, "unexpected answer, HTTP 200 with a body that is not its JSON", None, 200
)


@pytest.mark.parametrize(
    ("request_", "result", "where"),
    [
        (START, RESET, ("dead", "unconfirmed")),  # may have reached it: never resent
        (START, LOGIN_PAGE, ("dead", "unconfirmed")),
        (START, REFUSED, ("pending", None)),  # certainly never left: retried
        (STOP, RESET, ("pending", None)),  # a stop is retried whatever the failure
        (STOP, LOGIN_PAGE, ("pending", None)),
    ],
)
async def test_a_failed_attempt_is_retried_only_when_a_repeat_cannot_add_a_leg(
    parts: Parts, request_: RecordingRequest, result: NoojeeResult, where: tuple[str, str | None]
) -> None:
    """The ledger settles a start that may have reached NoojeeContact as unconfirmed (counted),
    and keeps for a retry a start that never left and any stop."""
    entry = await parts.spool.add(request_, call_uniqueid="1.1")
    await parts.ledger.failed(entry, request_, result, attempts=0, created=parts.clock())
    found = await parts.spool.where(entry)
    assert found is not None
    assert (found[0], found[2]) == where
    unconfirmed = parts.metrics.registry.get_sample_value(
        "agi_bridge_spool_settled_total", {"reason": "unconfirmed"}
    )
    assert unconfirmed == (1 if where[1] == "unconfirmed" else 0)


def test_delivery_never_imports_the_settings() -> None:
    """Delivery is given its config objects (built once at start-up), not the settings."""
    imported = []
    for path in Path(agi_bridge.delivery.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            imported += [f"{path.name}: {name}" for name in names if "settings" in name]
    assert imported == []


async def test_a_spool_write_that_never_commits_is_failed_in_time_and_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write that never commits: the session hears FAILED once STORE_TIMEOUT has passed, the
    write itself is not cancelled (other waiters settle on it) and the worker is not woken;
    one already committed is QUEUED at once."""
    monkeypatch.setattr(sync, "STORE_TIMEOUT", 0.05)
    loop = asyncio.get_running_loop()
    stalled: asyncio.Future[int] = loop.create_future()
    woken: list[bool] = []
    outcome = await queued(stalled, "NoojeeContact down", wake=lambda: woken.append(True))
    assert outcome.status is Status.FAILED
    assert outcome.message == "NoojeeContact down; could not queue: spool too slow"
    assert not stalled.done()
    assert woken == []
    stalled.set_result(7)
    outcome = await queued(stalled, "NoojeeContact down", wake=lambda: woken.append(True))
    assert (outcome.status, outcome.entry, woken) == (Status.QUEUED, 7, [True])


@pytest.mark.parametrize(
    ("request_", "status", "why"),
    [
        (START, "UNCONFIRMED", "the spool took over 0.05 s: it may still be queued and sent"),
        (STOP, "FAILED", "could not queue: spool too slow"),
    ],
)
async def test_an_async_request_whose_spool_write_stalls_is_told_what_may_still_happen(
    spool: Spool,
    monkeypatch: pytest.MonkeyPatch,
    request_: RecordingRequest,
    status: str,
    why: str,
) -> None:
    """An async request whose spool write does not commit within STORE_TIMEOUT (a frozen disk)
    may still land and be sent: a start hears UNCONFIRMED, not FAILED ("press again" would make
    a second recording leg); a stop hears FAILED (pressing again is harmless)."""
    monkeypatch.setattr(sync, "STORE_TIMEOUT", 0.05)
    stalled: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    monkeypatch.setattr(spool, "add", lambda *_, **__: stalled)
    client = FakeClient(NoojeeResult(ResultKind.OK, "done", 0, 200))
    delivery = Delivery(config=DeliveryConfig(), client=client, spool=spool, metrics=Metrics())
    outcome = await delivery.submit(
        request_, call_uniqueid="1.1", mode="async", budget=1.0, hand_off=_never_handed_off
    )
    assert (outcome.status.value, outcome.message) == (status, f"queued for delivery; {why}")
    assert not stalled.done()  # the write is left to land
    assert client.sent == []


async def test_a_sync_start_that_failed_unsent_and_whose_spool_write_stalls_is_unconfirmed(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync start refused before it was sent (transient) is queued for a retry; when that
    write stalls past STORE_TIMEOUT it may still land and be retried, so the session hears
    UNCONFIRMED, not FAILED."""
    monkeypatch.setattr(sync, "STORE_TIMEOUT", 0.05)
    stalled: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    monkeypatch.setattr(parts.spool, "add", lambda *_, **__: stalled)
    parts.client.result = NoojeeResult(ResultKind.TRANSPORT, "cannot connect", unsent=True)
    outcome = await _heard(parts.sync, START, "1.1", budget=1.0)
    assert outcome.status is Status.UNCONFIRMED
    assert outcome.message.startswith("cannot connect; the spool took over")
    stalled.set_result(1)  # lets the attempt's task record its result and end
    await parts.sync.drain(5.0)


def test_recent_calls_are_reported_for_max_age_and_then_dropped() -> None:
    """A call noted (now, or at a spool entry's older time) is reported for max_age seconds
    and no longer; what has aged out is dropped whole, so the memory held stays bounded."""
    clock = FakeClock(1000.0)
    calls = RecentCalls(max_age=10.0, wall_clock=clock)
    calls.add("1.1")
    calls.add("1.2", at=995.0)  # recovered from the spool: noted 5 s ago
    clock.advance(4.0)
    assert "1.1" in calls
    assert "1.2" in calls
    assert "1.3" not in calls
    clock.advance(2.0)  # 1.2 is 11 s old now
    assert "1.1" in calls
    assert "1.2" not in calls
    assert not calls.discard("1.2")
    calls.add("1.3")
    clock.advance(4.5)  # 1.1 is 10.5 s old
    assert "1.1" not in calls
    assert calls.discard("1.3")
    assert "1.3" not in calls
    for n in range(100):
        calls.add(f"2.{n}")
        clock.advance(1.0)
    assert calls.held() <= 20  # what max_age may hold twice over, not every call ever noted


async def test_connection_slots_are_handed_over_in_order_and_never_lost() -> None:
    """The slots behave as asyncio.Semaphore: waiting in arrival order, a wait bounded by its
    time, and a slot handed to a waiter cancelled before it ran passed on, never lost."""
    slots = _Slots(1)
    slots.free -= 1  # taken, as Sender.attempt takes a free one
    order: list[str] = []

    async def wait(name: str, at_most: float | None) -> bool:
        got = await slots.wait(at_most)
        order.append(f"{name}:{got}")
        return got

    first = asyncio.create_task(wait("first", None))
    doomed = asyncio.create_task(wait("doomed", None))
    late = asyncio.create_task(wait("late", 0.01))
    third = asyncio.create_task(wait("third", None))
    assert not await late  # gave up, and left the line: no slot goes to it
    slots.release()  # to the oldest waiting
    assert await first
    slots.release()  # handed to doomed...
    doomed.cancel()  # ...cancelled before it runs: it passes the slot on
    with pytest.raises(asyncio.CancelledError):
        await doomed
    async with asyncio.timeout(5):  # a lost slot would leave third waiting for ever
        assert await third
    assert order == ["late:False", "first:True", "third:True"]
    slots.release()  # nobody waiting: free again
    assert (slots.free, len(slots.waiting)) == (1, 0)
