"""Fault script: nothing lost, nothing stuck, nobody in. Loopback only, bounded in count and time.

Part 1 (durability): sends N stops (default 10,000) while NoojeeContact is down, kills the
bridge with SIGKILL half-way and restarts it, then brings the simulator up and waits until every
stop the dialplan was told QUEUED or STOPPED has arrived. Prints lost / duplicated / delivered
and the time to drain.

Part 3 (flood): 10,000 connections opened at once; a valid session must be served again soon
after, and the bridge must still be alive.

Part 2 (hostile load): a steady stream of valid sessions, first alone, then while 1,000 hostile
connections (silent, byte-a-second, garbage, oversized) are open; prints the valid sessions'
p50/p99 hold time in both phases.

    .venv/bin/python bench/faults.py            # full run, about a minute
    .venv/bin/python bench/faults.py --stops 2000 --hostile 200   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from agi_bridge.testing.fake_asterisk import Call, SessionResult, environment_block, run_call

API_KEY = "fault-key"
# Hard bounds so the script always ends, whatever the bridge does.
MAX_DRAIN_SECONDS = 300.0
SESSION_DEADLINE = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """The bridge and the simulator as real processes, as an operator runs them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.agi_port = free_port()
        self.sim_port = free_port()
        self.record = workdir / "received.jsonl"
        self.bridge: asyncio.subprocess.Process | None = None
        self.simulator: asyncio.subprocess.Process | None = None

    async def start_bridge(self, **extra: str) -> None:
        env = {
            **os.environ,
            "AGI_BRIDGE_LISTEN": f"127.0.0.1:{self.agi_port}",
            "AGI_BRIDGE_METRICS_LISTEN": "",
            "AGI_BRIDGE_NOOJEE_URL": f"http://127.0.0.1:{self.sim_port}/servicemanager/rest",
            "AGI_BRIDGE_NOOJEE_API_KEY": API_KEY,
            "AGI_BRIDGE_DATA_DIR": str(self.workdir / "data"),
            "AGI_BRIDGE_LOG_LEVEL": "error",
            "AGI_BRIDGE_LOG_FORMAT": "json",
            # The simulator comes back within seconds: do not let the backoff grow to minutes.
            "AGI_BRIDGE_RETRY_MAX_DELAY": "1",
            "AGI_BRIDGE_RETRY_INITIAL_DELAY": "0.2",
            **extra,
        }
        self.bridge = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agi_bridge",
            "serve",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_for_port(self.agi_port)

    async def kill_bridge(self) -> None:
        assert self.bridge is not None
        self.bridge.send_signal(signal.SIGKILL)
        await self.bridge.wait()

    async def start_simulator(self) -> None:
        self.simulator = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agi_bridge",
            "simulate-noojee",
            "--listen",
            f"127.0.0.1:{self.sim_port}",
            "--api-key",
            API_KEY,
            "--record",
            str(self.record),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_for_port(self.sim_port)

    async def stop_all(self) -> None:
        for process in (self.bridge, self.simulator):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 20)
                except TimeoutError:
                    process.kill()
                    await process.wait()

    def received_stops(self) -> Counter[str]:
        if not self.record.exists():
            return Counter()
        ids: Counter[str] = Counter()
        for line in self.record.read_text().splitlines():
            request = json.loads(line)
            if request["path"].endswith("/stop") and request["answered_code"] == 0:
                ids[request["params"]["extenOrUniqueId"]] += 1
        return ids


async def wait_for_port(port: int, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)  # polling a process we started, not test sync
                continue
            writer.close()
            return


async def stop_call(port: int, uniqueid: str, *extra: str) -> SessionResult:
    call = Call(
        script="recording/stop?by=uniqueid",
        arguments=("Fred", *extra),
        uniqueid=uniqueid,
        port=port,
    )
    return await run_call(call, deadline=SESSION_DEADLINE)


async def durability(stops: int, concurrency: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="agi-bridge-faults-") as tmp:
        procs = Processes(Path(tmp))
        acknowledged: set[str] = set()
        unanswered = 0
        statuses: Counter[str] = Counter()
        try:
            await procs.start_bridge()
            queue: asyncio.Queue[int] = asyncio.Queue()
            for n in range(stops):
                queue.put_nowait(n)
            killed = asyncio.Event()
            restarted = asyncio.Event()
            restarted.set()

            async def worker() -> None:
                nonlocal unanswered
                while not queue.empty():
                    n = queue.get_nowait()
                    await restarted.wait()
                    uniqueid = f"1795811871.{n}"
                    result = await stop_call(
                        procs.agi_port, uniqueid, "mode=async" if n % 2 else "mode=sync"
                    )
                    status = result.variables.get("NOOJEE_STATUS", f"AGISTATUS={result.agistatus}")
                    statuses[status] += 1
                    if status in ("QUEUED", "STOPPED"):
                        acknowledged.add(uniqueid)
                    else:
                        unanswered += 1
                    if len(acknowledged) >= stops // 2 and not killed.is_set():
                        killed.set()
                        restarted.clear()
                        await procs.kill_bridge()
                        await procs.start_bridge()
                        restarted.set()

            started = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            send_seconds = time.monotonic() - started
            await procs.start_simulator()
            drain_started = time.monotonic()
            while time.monotonic() - drain_started < MAX_DRAIN_SECONDS:
                if acknowledged <= set(procs.received_stops()):
                    break
                await asyncio.sleep(0.25)  # polling the record file of another process
            drain_seconds = time.monotonic() - drain_started
            received = procs.received_stops()
        finally:
            await procs.stop_all()
    lost = acknowledged - set(received)
    return {
        "stops_sent": stops,
        "acknowledged": len(acknowledged),
        "not_acknowledged": unanswered,
        "statuses": dict(statuses),
        "delivered": len(set(received) & acknowledged),
        "lost": len(lost),
        "duplicated": sum(count - 1 for count in received.values() if count > 1),
        "send_seconds": round(send_seconds, 2),
        "drain_seconds": round(drain_seconds, 2),
    }


async def hostile_client(port: int, kind: int, stop: asyncio.Event) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        if kind == 0:
            pass  # silent
        elif kind == 1:
            for byte in environment_block(Call()):  # slowloris
                if stop.is_set():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(1.0)
        elif kind == 2:
            writer.write(os.urandom(4096))  # garbage
        else:
            writer.write(b"agi_network: yes\n" + b"agi_x: " + b"y" * 100_000)  # oversized
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(5):
                await reader.read()
    except OSError:
        pass
    finally:
        writer.close()


async def steady(port: int, seconds: float, rate: float) -> list[float]:
    holds: list[float] = []
    tasks = []
    interval = 1.0 / rate
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < seconds:
        n += 1

        async def one(n: int = n) -> None:
            result = await stop_call(port, f"steady.{time.monotonic_ns()}.{n}")
            if result.variables.get("NOOJEE_STATUS") == "STOPPED":
                holds.append(result.hold * 1000)

        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(interval)  # open-loop arrival rate
    await asyncio.gather(*tasks)
    return holds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def hostile(connections: int, seconds: float, rate: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="agi-bridge-hostile-") as tmp:
        procs = Processes(Path(tmp))
        try:
            await procs.start_simulator()
            await procs.start_bridge(AGI_BRIDGE_ENVIRONMENT_TIMEOUT="2")
            calm = await steady(procs.agi_port, seconds, rate)
            stop = asyncio.Event()
            attackers = [
                asyncio.create_task(hostile_client(procs.agi_port, n % 4, stop))
                for n in range(connections)
            ]
            attacked = await steady(procs.agi_port, seconds, rate)
            stop.set()
            await asyncio.gather(*attackers)
        finally:
            await procs.stop_all()
    return {
        "hostile_connections": connections,
        "rate_per_s": rate,
        "calm": {
            "sessions": len(calm),
            "p50_ms": round(percentile(calm, 50), 2),
            "p99_ms": round(percentile(calm, 99), 2),
        },
        "attacked": {
            "sessions": len(attacked),
            "p50_ms": round(percentile(attacked, 50), 2),
            "p99_ms": round(percentile(attacked, 99), 2),
        },
    }


async def flood(connections: int) -> dict[str, object]:
    """Open ``connections`` silent connections at once, then measure how soon a valid session is
    served again. Beyond max_sessions the bridge refuses at once; the silent ones are closed
    when the environment deadline passes."""
    with tempfile.TemporaryDirectory(prefix="agi-bridge-flood-") as tmp:
        procs = Processes(Path(tmp))
        writers: list[asyncio.StreamWriter] = []
        refused_connect = 0
        try:
            await procs.start_simulator()
            await procs.start_bridge()
            opened = time.monotonic()

            async def open_one() -> None:
                nonlocal refused_connect
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", procs.agi_port)
                except OSError:
                    refused_connect += 1
                    return
                writers.append(writer)

            await asyncio.gather(*(open_one() for _ in range(connections)))
            open_seconds = time.monotonic() - opened
            during = await stop_call(procs.agi_port, "flood.during")
            recovered_after = None
            for attempt in range(200):  # bounded: 200 x 50 ms
                result = await stop_call(procs.agi_port, f"flood.after.{attempt}")
                if result.variables.get("NOOJEE_STATUS") == "STOPPED":
                    recovered_after = round(time.monotonic() - opened, 2)
                    break
                await asyncio.sleep(0.05)  # pacing the probe of another process
            alive = procs.bridge is not None and procs.bridge.returncode is None
        finally:
            for writer in writers:
                writer.close()
            await procs.stop_all()
    return {
        "connections": connections,
        "opened": len(writers),
        "connect_errors": refused_connect,
        "open_seconds": round(open_seconds, 2),
        "valid_during_flood": during.variables.get(
            "NOOJEE_STATUS", f"AGISTATUS={during.agistatus}"
        ),
        "served_again_after_s": recovered_after,
        "bridge_alive": alive,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stops", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--hostile", type=int, default=1000)
    parser.add_argument("--flood", type=int, default=10_000, help="connections opened at once")
    parser.add_argument("--seconds", type=float, default=5.0, help="each steady-stream phase")
    parser.add_argument("--rate", type=float, default=200.0, help="valid sessions per second")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = {
        "durability": await durability(args.stops, args.concurrency),
        "hostile": await hostile(args.hostile, args.seconds, args.rate),
        "flood": await flood(args.flood),
    }
    d = results["durability"]
    print(
        f"durability: {d['stops_sent']} stops sent while NoojeeContact was down, bridge "
        f"SIGKILLed and restarted half-way"
    )
    print(
        f"  acknowledged (QUEUED/STOPPED) {d['acknowledged']}, unanswered {d['not_acknowledged']}"
        f" {d['statuses']}"
    )
    print(
        f"  delivered {d['delivered']}  lost {d['lost']}  duplicated {d['duplicated']}"
        f"  drain {d['drain_seconds']} s (sending took {d['send_seconds']} s)"
    )
    h = results["hostile"]
    print(
        f"hostile: {h['hostile_connections']} hostile connections, valid stream {h['rate_per_s']}/s"
    )
    for phase in ("calm", "attacked"):
        p = h[phase]
        print(f"  {phase:8}: {p['sessions']} sessions  p50 {p['p50_ms']} ms  p99 {p['p99_ms']} ms")
    f = results["flood"]
    print(
        f"flood: {f['connections']} connections opened at once ({f['opened']} accepted by the"
        f" kernel in {f['open_seconds']} s, {f['connect_errors']} connect errors)"
    )
    print(
        f"  a valid session during the flood: {f['valid_during_flood']};"
        f" served again {f['served_again_after_s']} s after the flood began;"
        f" bridge alive: {f['bridge_alive']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if d["lost"] == 0 and f["bridge_alive"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
