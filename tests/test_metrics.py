"""The metrics every session updates, kept by the event loop without locks, against what
prometheus_client's own Counter and Histogram export for the same observations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from agi_bridge.metrics import (
    ERROR_KINDS,
    HOLD_BUCKETS,
    ROUND_TRIP_BUCKETS,
    SESSION_STATUSES,
    Metrics,
)
from agi_bridge.vocabulary import NoojeeResult, ResultKind

FAMILIES = (
    "agi_bridge_sessions",
    "agi_bridge_hold_seconds",
    "agi_bridge_noojee_request_seconds",
    "agi_bridge_noojee_errors",
)


def _lines(registry: CollectorRegistry) -> list[str]:
    """The exposition lines (HELP, TYPE, samples) of FAMILIES, sorted."""
    lines = generate_latest(registry).decode().splitlines()
    return sorted(line for line in lines if _name(line).startswith(FAMILIES))


def _name(line: str) -> str:
    if line.startswith("#"):
        return line.split(" ")[2]  # "# HELP name ..." / "# TYPE name ..."
    return line.partition("{")[0].partition(" ")[0]


def test_the_lock_free_session_metrics_export_what_prometheus_client_would() -> None:
    """Same names, help, types, label sets (every known one from the start), buckets, counts
    and sums as prometheus_client's Counter and Histogram given the same observations,
    including a value on a bucket's bound, one past the last bound, and an unknown route."""
    ours = Metrics()
    registry = CollectorRegistry()
    sessions = Counter(
        "agi_bridge_sessions",
        "AGI sessions by route and NOOJEE_STATUS",
        ["route", "status"],
        registry=registry,
    )
    hold = Histogram(
        "agi_bridge_hold_seconds",
        "Time a channel was held by a session, by route",
        ["route"],
        buckets=HOLD_BUCKETS,
        registry=registry,
    )
    noojee = Histogram(
        "agi_bridge_noojee_request_seconds",
        "NoojeeContact round trip, by result kind",
        ["kind"],
        buckets=ROUND_TRIP_BUCKETS,
        registry=registry,
    )
    errors = Counter(
        "agi_bridge_noojee_errors",
        "Failed NoojeeContact requests by kind",
        ["kind"],
        registry=registry,
    )
    for route, statuses in SESSION_STATUSES.items():
        hold.labels(route)
        for status in statuses:
            sessions.labels(route, status.value)
    for kind in ResultKind:
        noojee.labels(kind.value)
    for kind in ERROR_KINDS:
        errors.labels(kind.value)

    for route, status, held in (
        ("recording/stop", "STOPPED", 0.0042),
        ("recording/stop", "STOPPED", 0.01),  # on a bound: in that bucket
        ("recording/start", "QUEUED", 45.0),  # past the last bound: +Inf only
        ("recording/nothing", "REJECTED", 0.0001),  # an unknown route: one label for all
    ):
        ours.session_finished(route, status, held)
        label = "unknown" if route == "recording/nothing" else route
        sessions.labels(label, status).inc()
        hold.labels(label).observe(held)
    for kind, seconds in ((ResultKind.OK, 0.003), (ResultKind.TIMEOUT, 12.0)):
        ours.observe_noojee(NoojeeResult(kind, "x"), seconds)
        noojee.labels(kind.value).observe(seconds)
        if kind is not ResultKind.OK:
            errors.labels(kind.value).inc()

    exported = _lines(ours.registry)
    assert len(exported) > 100  # every label set, with its buckets
    assert exported == _lines(registry)
