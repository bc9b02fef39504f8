"""Prometheus metrics, on a registry of their own so that several bridges (tests) can coexist."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any, Final, Literal, TypeVar, cast, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agi_bridge.vocabulary import ACTIONS, ROUTES, NoojeeResult, ResultKind, Status

_M = TypeVar("_M", bound=MetricWrapperBase)

# ``*_created`` series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

# Hold time is what a caller hears as dead air: resolution where it matters (a few ms for a
# healthy sync stop) and up to the largest budget we allow (30 s).
HOLD_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ROUND_TRIP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Every label value is known in advance, and every label set is exported from the start at
# zero (Prometheus' advice): a series that appears only with its first event is invisible to
# rate() until then, and an alert cannot tell "none yet" from "metric missing".
# idle_evicted: a connection that had sent no environment yet, closed to make room for a new
# one when every session slot was taken (server.py).
Refusal = Literal["shutting_down", "not_allowed", "too_many_sessions", "idle_evicted"]
# Every script path outside ROUTES shares one label: the paths are the caller's to choose.
UNKNOWN_ROUTE: Final = "unknown"


def _session_statuses() -> Mapping[str, tuple[Status, ...]]:
    """Each route label and the NOOJEE_STATUS values its sessions can end with: any but the
    other action's confirmation; an unknown route is always REJECTED (server.py)."""
    confirmations = {rules.confirmed for rules in ACTIONS.values()}
    statuses = {
        route: tuple(
            status
            for status in Status
            if status not in confirmations or status is ACTIONS[action].confirmed
        )
        for route, action in ROUTES.items()
    }
    return {**statuses, UNKNOWN_ROUTE: (Status.REJECTED,)}


SESSION_STATUSES: Final = _session_statuses()
# The kinds observe_noojee counts as errors: NoojeeResult says which, so the two cannot differ.
ERROR_KINDS: Final = tuple(kind for kind in ResultKind if not NoojeeResult(kind, "").ok)


class _LoopCounter:
    """A labelled counter that only the event loop updates and reads (the health server's
    scrape runs in it too): a number per label set, no lock. prometheus_client's metrics take a
    lock at every update, for threads this bridge does not have; every session updates these."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = labels
        self.counts: dict[tuple[str, ...], int] = {}

    def create(self, *values: str) -> None:
        """Export the label set ``values`` (at 0 until counted)."""
        self.counts.setdefault(values, 0)

    def inc(self, *values: str) -> None:
        counts = self.counts
        counts[values] = counts.get(values, 0) + 1

    def family(self) -> Metric:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for values, count in self.counts.items():
            family.add_metric(values, count)
        return family


class _LoopHistogram:
    """A histogram with one label, kept like :class:`_LoopCounter`: per label value its
    bucket counts (one bisect to observe) and its sum, exported as prometheus_client's
    Histogram would be."""

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._bounds = tuple(buckets)
        # prometheus_client's own spelling of each bound ("1.0", "+Inf"); untyped there.
        self._les = [floatToGoString(bound) for bound in (*buckets, math.inf)]  # type: ignore[no-untyped-call]
        self._series: dict[str, tuple[list[int], list[float]]] = {}  # counts, [sum]

    def create(self, value: str) -> tuple[list[int], list[float]]:
        """Export the label value ``value`` (empty until observed); its counts and [sum]."""
        return self._series.setdefault(value, ([0] * len(self._les), [0.0]))

    def observe(self, value: str, amount: float) -> None:
        counts, total = self._series.get(value) or self.create(value)
        counts[bisect_left(self._bounds, amount)] += 1  # the first bucket with amount <= le
        total[0] += amount

    def family(self) -> Metric:
        family = HistogramMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, (counts, total) in self._series.items():
            buckets = list(zip(self._les, accumulate(counts), strict=True))
            family.add_metric([value], buckets=buckets, sum_value=total[0])
        return family


class _LoopMetrics(Collector):
    """The metrics above, for the registry's scrape."""

    def __init__(self, metrics: Iterable[_LoopCounter | _LoopHistogram]) -> None:
        self._metrics = tuple(metrics)

    def collect(self) -> Iterator[Metric]:
        return (metric.family() for metric in self._metrics)


class Metrics:
    """Every metric the bridge exports, created once per process (or per test bridge)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # What every session updates: see _LoopCounter.
        self.sessions = _LoopCounter(
            "agi_bridge_sessions", "AGI sessions by route and NOOJEE_STATUS", ["route", "status"]
        )
        self.hold_seconds = _LoopHistogram(
            "agi_bridge_hold_seconds",
            "Time a channel was held by a session, by route",
            "route",
            HOLD_BUCKETS,
        )
        self.connections_open = Gauge(
            "agi_bridge_connections_open", "Open FastAGI connections", registry=r
        )
        self.connections_refused = Counter(
            "agi_bridge_connections_refused",
            "Connections closed at once, by reason",
            ["reason"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "agi_bridge_protocol_errors",
            "Sessions ended by a protocol error or timeout",
            registry=r,
        )
        self.noojee_seconds = _LoopHistogram(
            "agi_bridge_noojee_request_seconds",
            "NoojeeContact round trip, by result kind",
            "kind",
            ROUND_TRIP_BUCKETS,
        )
        self.noojee_errors = _LoopCounter(
            "agi_bridge_noojee_errors", "Failed NoojeeContact requests by kind", ["kind"]
        )
        r.register(
            _LoopMetrics(
                (self.sessions, self.hold_seconds, self.noojee_seconds, self.noojee_errors)
            )
        )
        self.retries = Counter(
            "agi_bridge_spool_retries", "Failed delivery attempts of spooled requests", registry=r
        )
        self.delivered = Counter(
            "agi_bridge_spool_delivered", "Spooled requests delivered by the worker", registry=r
        )
        self.dead_letters = Counter(
            "agi_bridge_spool_dead_letters", "Requests moved to the dead letters", registry=r
        )
        self.settled = Counter(
            "agi_bridge_spool_settled",
            "Requests settled without a confirmation, never sent again, by reason: unconfirmed "
            "(a start that may have reached NoojeeContact), expired or cancelled (by extension)",
            ["reason"],
            registry=r,
        )
        for reason in ("unconfirmed", "expired", "cancelled"):
            # Exported at 0 from the start: an alert on increase() needs the series to exist.
            self.settled.labels(reason)
        self.duplicates = Counter(
            "agi_bridge_duplicates",
            "Repeats of an action on a call, answered without sending",
            registry=r,
        )
        self.spool_pending = Gauge(
            "agi_bridge_spool_pending", "Requests waiting in the spool", registry=r
        )
        self.spool_dead = Gauge(
            "agi_bridge_spool_dead",
            "Dead letters that need an operator (refused, out of retries, unconfirmed starts)",
            registry=r,
        )
        self.spool_oldest_age = Gauge(
            "agi_bridge_spool_oldest_age_seconds",
            "Age of the oldest pending request",
            registry=r,
        )
        # Labelled children by (metric, label values). labels() validates and hashes its
        # arguments on every call, which every session would pay; the label values are few
        # (routes, statuses, result kinds), so this stays small. Every known label set is
        # created here, at zero: see Refusal.
        self._children: dict[tuple[object, ...], Any] = {}
        for route, statuses in SESSION_STATUSES.items():
            self.hold_seconds.create(route)
            for status in statuses:
                self.sessions.create(route, status.value)
        for reason in get_args(Refusal):
            self._child(self.connections_refused, reason)
        for kind in ResultKind:
            self.noojee_seconds.create(kind.value)
        for kind in ERROR_KINDS:
            self.noojee_errors.create(kind.value)

    def _child(self, metric: _M, *values: str) -> _M:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return cast(_M, child)

    def session_finished(self, route: str, status: str, held: float) -> None:
        """A session for script path ``route`` ended with NOOJEE_STATUS ``status`` after
        holding the channel ``held`` seconds."""
        label = route if route in ROUTES else UNKNOWN_ROUTE
        self.sessions.inc(label, status)
        self.hold_seconds.observe(label, held)

    def connection_refused(self, reason: Refusal) -> None:
        self._child(self.connections_refused, reason).inc()

    def settle(self, reason: str) -> None:
        """A request was settled without a confirmation (unconfirmed, expired, cancelled)."""
        self._child(self.settled, reason).inc()

    def observe_noojee(self, result: NoojeeResult, seconds: float) -> None:
        # The kind itself, not its .value: a StrEnum member is the string (same hash, same
        # text), and .value is a Python-level property read on every request.
        self.noojee_seconds.observe(result.kind, seconds)
        if not result.ok:
            self.noojee_errors.inc(result.kind)
