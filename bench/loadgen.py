"""FastAGI load generator: plays Asterisk 22 against a target, in its own process.

Each session connects, sends the environment block exactly as Asterisk 22 does
(:func:`agi_bridge.testing.fake_asterisk.environment_block`, one distinct uniqueid and channel per
session so the bridge's de-duplication never short-circuits a request), answers every command
the way a live channel does (``SET VARIABLE`` -> ``200 result=1``, ``GET VARIABLE`` -> ``200
result=0``, unknown -> ``510``), and when the server closes it writes the trailing ``HANGUP``
line and closes too. The hold time is what the dialplan waits: from ``connect()`` to the
server's close.

Modes (one JSON argument, see ``run.py``):

* ``closed``: ``concurrency`` sessions in flight, ``n`` in total (or until ``max_seconds``);
* ``open``: a new session every ``1/rate`` seconds whatever the previous ones do (the hold
  time then includes any queueing in the target, which a closed loop hides);
* ``hold``: open ``n`` connections, each sending the environment block except its final empty
  line, print ``HELD`` once all are open and wait ``hold_seconds``, then complete them all at
  once (a hangup burst on top of ``n`` idle sessions).

Asyncio ``Protocol`` objects (not streams) and uvloop keep the generator's own cost per session
small, so the target, not the generator, is what saturates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from agi_bridge.testing.fake_asterisk import Call, environment_block, written_variables

SESSION_TIMEOUT = 10.0


@dataclass
class Stats:
    holds: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    late_starts: int = 0  # open loop: sessions started > 5 ms after their schedule
    max_lag: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def _unquote(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return text


class Session(asyncio.Protocol):
    """One AGI session as Asterisk's ``res_agi.c`` runs it."""

    def __init__(self, env: bytes, started: float, *, hold_last: bool = False) -> None:
        self.env = env
        self.started = started
        self.hold_last = hold_last
        self.ended: float | None = None
        self.buffer = b""
        self.status: str | None = None
        self.failure: str | None = None
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.write(self.env[:-1] if self.hold_last else self.env)

    def release(self) -> None:
        """Hold mode: send the environment's last byte (the empty line)."""
        if self.transport is not None and not self.transport.is_closing():
            self.started = time.perf_counter()
            self.transport.write(self.env[-1:])

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        out = []
        while (end := buffer.find(b"\n")) >= 0:
            line, buffer = buffer[:end], buffer[end + 1 :]
            if line.startswith(b"SET VARIABLE "):
                name, _, value = line[13:].partition(b" ")
                written = written_variables(_unquote(name), _unquote(value))
                if "NOOJEE_STATUS" in written or self.status is None:
                    self.status = written.get("NOOJEE_STATUS", next(iter(written.values())))
                out.append(b"200 result=1\n")
            elif line.startswith((b"GET VARIABLE ", b"GET FULL VARIABLE ", b"NOOP", b"VERBOSE")):
                out.append(b"200 result=0\n")
            elif line.startswith(b"failure"):
                self.failure = "failure_line"  # Asterisk: AGISTATUS=FAILURE and it closes
                self.ended = time.perf_counter()
                assert self.transport is not None
                self.transport.close()
                return
            else:
                out.append(b"510 Invalid or unknown command\n")
        self.buffer = buffer
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def eof_received(self) -> bool:
        # The server closed: this is when the dialplan continues. Asterisk then writes HANGUP.
        self.ended = time.perf_counter()
        if self.transport is not None:
            with contextlib.suppress(OSError):
                self.transport.write(b"HANGUP\n")
            self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended is None:
            self.ended = time.perf_counter()
            if exc is not None and self.failure is None:
                self.failure = "reset"
        if not self.done.done():
            self.done.set_result(None)


class Generator:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.host: str = config.get("host", "127.0.0.1")
        self.port: int = config["port"]
        self.expect: set[str] | None = set(config["expect"]) if config.get("expect") else None
        self.stats = Stats()
        n = config["n"]
        offset = config.get("id_offset", 0)
        epoch = config.get("epoch", 1795811316)
        args = tuple(config.get("args", ()))
        script = config.get("script", "recording/stop")
        # Built before the clock starts: the generator must not cost during the measured window.
        self.envs = [
            environment_block(
                Call(
                    script=script,
                    arguments=args,
                    channel=f"PJSIP/410-{i + offset:08x}",
                    uniqueid=f"{epoch}.{i + offset}",
                    host=self.host,
                    port=self.port,
                )
            )
            for i in range(n)
        ]

    def _finish(self, session: Session) -> None:
        stats = self.stats
        if session.failure is not None:
            stats.error(session.failure)
            return
        status = session.status or "(none)"
        stats.statuses[status] = stats.statuses.get(status, 0) + 1
        if self.expect is not None and status not in self.expect:
            stats.error(f"status:{status}")
        assert session.ended is not None
        stats.holds.append(session.ended - session.started)

    async def one(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        session = Session(self.envs[index], started)
        try:
            async with asyncio.timeout(SESSION_TIMEOUT):
                await loop.create_connection(lambda: session, self.host, self.port)
                await session.done
        except TimeoutError:
            self.stats.error("timeout")
            if session.transport is not None:
                session.transport.abort()
            return
        except OSError as exc:
            self.stats.error(f"connect:{exc.__class__.__name__}")
            return
        self._finish(session)

    async def closed_loop(self) -> float:
        n, concurrency = len(self.envs), self.config["concurrency"]
        deadline = time.perf_counter() + self.config.get("max_seconds", 60.0)
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < n and time.perf_counter() < deadline:
                index = next_index
                next_index += 1
                await self.one(index)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started

    async def open_loop(self) -> float:
        n, rate = len(self.envs), self.config["rate"]
        deadline = self.config.get("max_seconds", 60.0)
        tasks: set[asyncio.Task[None]] = set()
        started = time.perf_counter()
        for index in range(n):
            due = started + index / rate
            now = time.perf_counter()
            if now - started > deadline:
                break
            if due > now:
                await asyncio.sleep(due - now)
            else:
                lag = now - due
                self.stats.max_lag = max(self.stats.max_lag, lag)
                if lag > 0.005:
                    self.stats.late_starts += 1
            task = asyncio.ensure_future(self.one(index))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        return time.perf_counter() - started

    async def hold(self) -> float:
        loop = asyncio.get_running_loop()
        sessions: list[Session] = []
        opened = time.perf_counter()

        async def connect(index: int) -> None:
            session = Session(self.envs[index], time.perf_counter(), hold_last=True)
            try:
                await loop.create_connection(lambda: session, self.host, self.port)
            except OSError as exc:
                self.stats.error(f"connect:{exc.__class__.__name__}")
                return
            sessions.append(session)

        # Open in waves so the listen backlog never overflows.
        wave = 256
        for first in range(0, len(self.envs), wave):
            last = min(first + wave, len(self.envs))
            await asyncio.gather(*(connect(i) for i in range(first, last)))
        open_seconds = time.perf_counter() - opened
        print(json.dumps({"held": len(sessions), "open_seconds": open_seconds}), flush=True)
        await asyncio.sleep(self.config.get("hold_seconds", 1.0))
        started = time.perf_counter()
        for session in sessions:
            session.release()
        try:
            async with asyncio.timeout(SESSION_TIMEOUT):
                await asyncio.gather(*(s.done for s in sessions))
        except TimeoutError:
            pass
        for session in sessions:
            if not session.done.done():
                self.stats.error("timeout")
                if session.transport is not None:
                    session.transport.abort()
            else:
                self._finish(session)
        return time.perf_counter() - started

    async def run(self) -> dict[str, Any]:
        mode = self.config.get("mode", "closed")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = usage.ru_utime + usage.ru_stime
        if mode == "closed":
            wall = await self.closed_loop()
        elif mode == "open":
            wall = await self.open_loop()
        else:
            wall = await self.hold()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime - cpu0
        stats = self.stats
        holds = sorted(stats.holds)
        completed = len(holds)
        return {
            "sessions": completed + sum(stats.errors.values()),
            "completed": completed,
            "errors": sum(stats.errors.values()),
            "error_kinds": stats.errors,
            "statuses": stats.statuses,
            "wall_seconds": wall,
            "sessions_per_second": (completed / wall) if wall > 0 else 0.0,
            "hold_ms": _percentiles(holds),
            "generator_cpu_seconds": cpu,
            "generator_total_cpu_seconds": usage.ru_utime + usage.ru_stime,
            "late_starts": stats.late_starts,
            "max_start_lag_ms": stats.max_lag * 1000,
        }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": values[-1] * 1000,
        "mean": sum(values) / len(values) * 1000,
    }


def main() -> None:
    config = json.loads(sys.argv[1])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    generator = Generator(config)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(generator.run())
    else:
        result = uvloop.run(generator.run())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
