"""Assembly: one :class:`Bridge` builds the NoojeeContact client, the spool, the delivery and
its worker, the FastAGI server and the health listener from the settings, and starts and stops
them in order.

Stopping spends one deadline, ``shutdown_grace``, on the whole sequence (as uvicorn's
``timeout_graceful_shutdown`` does): sessions, then the attempts that outlived them and the
writes recording them, then the worker's batch in hand each get what is left of it, and
whatever still runs at the deadline is cancelled (its request stays in the spool). Only the
final flush of the spool comes after, bounded by :data:`SPOOL_FLUSH_TIMEOUT`. So a stop takes
at most ``shutdown_grace + SPOOL_FLUSH_TIMEOUT`` plus the health listener's close, which the
service managers' stop timeouts (deploy/agi-bridge.service, docker-compose.yml) cover.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time

from prometheus_client import generate_latest

from agi_bridge.delivery import Delivery
from agi_bridge.delivery.config import Connections, DeliveryConfig, Retry
from agi_bridge.delivery.sync import STORE_TIMEOUT
from agi_bridge.health import HealthServer
from agi_bridge.lock import DataDirLock
from agi_bridge.logs import get_logger
from agi_bridge.metrics import Metrics
from agi_bridge.noojee import NoojeeClient
from agi_bridge.server import AgiServer
from agi_bridge.settings import Settings
from agi_bridge.spool import Spool, SpoolError
from agi_bridge.tasks import finish_within

log = get_logger("agi_bridge.app")

# Exit status after a second signal: the operator asked twice, we stopped without waiting
# for NoojeeContact.
FORCED_EXIT = 130
# The spool's last commit, after the deadline of a graceful stop and on a forced exit alike:
# milliseconds on a healthy disk (the requests written ahead at shutdown), but a stalled disk
# must not turn a bounded stop into a hang.
SPOOL_FLUSH_TIMEOUT = 2.0
# Allocations between two collections of the youngest generation (CPython's default is 700):
# a few hundred sessions' worth, see serve().
YOUNG_COLLECTION_AFTER = 10_000
# Exit status of a stop whose spool flush gave up (a frozen disk): requests may be missing
# from the spool (``spool.unwritten`` names them), so the service manager shows a failed stop.
UNFLUSHED_EXIT = 1


def connections(settings: Settings) -> Connections:
    """How many requests may be in flight to NoojeeContact, and how long one may take: read
    by the client and by delivery alike."""
    return Connections(
        max_connections=settings.noojee_max_connections,
        connect_timeout=settings.noojee_connect_timeout,
        request_timeout=settings.noojee_timeout,
    )


def noojee_client(settings: Settings, *, max_connections: int | None = None) -> NoojeeClient:
    """The NoojeeContact client the settings describe (``max_connections`` to override)."""
    limits = connections(settings)
    return NoojeeClient(
        base_url=settings.noojee_url,
        auth=settings.noojee_auth,
        api_key=settings.api_key,
        ca_file=settings.noojee_ca_file,
        verify=settings.noojee_verify_tls,
        tls_strict=settings.noojee_tls_strict,
        connect_timeout=limits.connect_timeout,
        request_timeout=limits.request_timeout,
        max_connections=max_connections or limits.max_connections,
    )


def delivery_config(settings: Settings) -> DeliveryConfig:
    """Delivery's share of the settings, read once at start-up."""
    return DeliveryConfig(
        connections=connections(settings),
        retry=Retry(
            max_attempts=settings.retry_max_attempts,
            max_age=settings.retry_max_age,
            initial_delay=settings.retry_initial_delay,
            max_delay=settings.retry_max_delay,
        ),
        write_ahead_after=settings.write_ahead_after,
        dedup_window=settings.dedup_window,
        extension_max_age=settings.extension_max_age,
    )


class Bridge:
    """A running agi-bridge. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.client = noojee_client(settings)
        self.lock = DataDirLock(settings.data_dir)
        self.spool = Spool(settings.data_dir, fsync=settings.spool_fsync)
        self.delivery = Delivery(
            config=delivery_config(settings),
            client=self.client,
            spool=self.spool,
            metrics=self.metrics,
        )
        self.server = AgiServer(settings, delivery=self.delivery, metrics=self.metrics)
        address = settings.metrics_address
        self.health = (
            None
            if address is None
            else HealthServer(address, registry_text=self.metrics_text, readiness=self.readiness)
        )
        self._worker: asyncio.Task[None] | None = None
        # The stop's deadline (loop time) once stop() began; hurry() brings it forward.
        self._deadline: float | None = None
        self._hurried = False
        # False once the stop gave up on the spool's last flush (see UNFLUSHED_EXIT).
        self.flushed = True

    async def start(self) -> None:
        """Lock the data folder, bind the FastAGI port, open the spool, start the worker and
        the listeners; on failure, undo what started. The lock comes first: a second bridge
        on the same folder, or one that cannot bind its port, touches nothing."""
        self.lock.acquire()
        try:
            await self.server.bind()
            self.spool.open(inherit=(self.lock.fileno(),))
            try:
                await self.delivery.recover()
                released = await self.spool.release_leases()
            except SpoolError as exc:
                # A damaged spool (reported by /readyz) still lets sync requests through: the
                # entries it can read go out once their leases end. No traceback: the error
                # is SQLite's, nothing of ours failed.
                log.error("spool.replay.failed", error=str(exc))  # noqa: TRY400
                released = 0
            if released:
                log.info("spool.replay", pending=released)
            self._worker = asyncio.create_task(self.delivery.run(), name="spool-worker")
            await self.server.start()
            if self.health is not None:
                await self.health.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop accepting, let sessions and deliveries finish within ``shutdown_grace`` in all,
        keep the rest queued. Each step runs even when an earlier one fails: the spool is
        closed last, always."""
        grace = self.settings.shutdown_grace
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + (min(grace, self.answer_time) if self._hurried else grace)

        def left() -> float:
            assert self._deadline is not None
            return max(0.0, self._deadline - loop.time())

        delivery = self.delivery
        delivery.write_ahead_in_flight()
        log.info("agi.server.stopping", grace=grace)
        try:
            await self.server.stop(left())
            delivery.stop_worker()
            await delivery.drain(left())
            if self._worker is not None:
                await finish_within((self._worker,), left())
            if self.health is not None:
                await self.health.stop()
        finally:
            await self.client.aclose()
            # The writer process holds the lock too: a writer given up on (a frozen disk) keeps
            # the folder locked until it is gone, so a new bridge cannot claim entries under a
            # commit it may still land at the thaw.
            self.flushed = self.spool.close(timeout=SPOOL_FLUSH_TIMEOUT)
            self.lock.release()
        log.info("agi.server.stopped")

    @property
    def answer_time(self) -> float:
        """Longest a session takes to end once its outcome is known: the spool's commit of a
        QUEUED request, then Asterisk's reply to the SET VARIABLE command."""
        return STORE_TIMEOUT + self.settings.command_timeout

    def hurry(self) -> None:
        """A second signal: every session still waiting for NoojeeContact hears ``QUEUED`` now
        (its request is in the spool) and ends; what still runs after that (attempts, the
        worker's batch) is cancelled, its entries stay pending. Sessions are never cut off:
        they still get their status, within :attr:`answer_time`."""
        self._hurried = True
        self.delivery.hurry()
        if self._deadline is not None:
            self._deadline = asyncio.get_running_loop().time()

    async def metrics_text(self) -> bytes:
        stats = await self.spool.stats()
        self.metrics.spool_pending.set(stats.pending)
        self.metrics.spool_dead.set(stats.dead)
        oldest = 0.0 if stats.oldest_pending is None else time.time() - stats.oldest_pending
        self.metrics.spool_oldest_age.set(max(0.0, oldest))
        return generate_latest(self.metrics.registry)

    async def readiness(self) -> list[str]:
        problems = []
        if not self.server.serving:
            problems.append("FastAGI listener is not accepting connections")
        if self._worker is None or self._worker.done():
            problems.append("the spool worker is not running: queued requests are not sent")
        problems.extend(await self.spool.problems())
        delivery = self.delivery
        if delivery.last_failure is not None and (
            delivery.last_success is None or delivery.last_success < delivery.last_failure
        ):
            problems.append("the last NoojeeContact request failed (see noojee.request.failed)")
        return problems


async def serve(settings: Settings) -> int:
    """``agi-bridge serve``."""
    # A session allocates a few dozen objects that die with it, a few of which live on in the
    # repeat cache: at CPython's default of one young collection per 700 allocations, the
    # collector scanned sessions still in flight, promoted them to older generations and
    # scanned those over and over (a sixth of the bridge's CPU for async stops, bench/). At
    # this threshold sessions end before a collection sees them; cyclic garbage still goes
    # within YOUNG_COLLECTION_AFTER allocations.
    gc.set_threshold(YOUNG_COLLECTION_AFTER)
    return await run_until_signal(Bridge(settings))


async def run_until_signal(bridge: Bridge) -> int:
    """Run until SIGTERM/SIGINT. A second signal shortens the stop (every session still gets
    its status, requests in flight stay queued); a third exits at once. SIGHUP is logged and
    changes nothing: logs go to stderr, there is no file to reopen."""
    signals: list[int] = []
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        signals.append(signum)
        if len(signals) == 1:
            log.info("agi.server.signal", signal=name)
            stopping.set()
        elif len(signals) == 2:
            log.warning("agi.server.hurry", signal=name, answer_within=bridge.answer_time)
            bridge.hurry()
        else:
            log.warning("agi.server.forced_exit", signal=name)
            # Signals may all be handled before stop() began: hand the spool what is in flight.
            bridge.delivery.write_ahead_in_flight()
            bridge.spool.close(timeout=SPOOL_FLUSH_TIMEOUT)
            os._exit(FORCED_EXIT)

    def on_hangup() -> None:
        # A closed terminal or a log rotation script: not a reason to drop the calls in hand.
        log.info("agi.server.sighup_ignored", reason="logs go to stderr: nothing to reopen")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await bridge.start()
    # What start-up built (modules, settings, the bridge) lives as long as the process: out of
    # the collector's full scans.
    gc.freeze()
    try:
        await stopping.wait()
    finally:
        await bridge.stop()
    if len(signals) > 1:
        return FORCED_EXIT
    return 0 if bridge.flushed else UNFLUSHED_EXIT
