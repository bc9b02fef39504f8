"""Issue 18's table, measured: what reaches a stand-in NoojeeContact, default settings.

Runs a real bridge process from a source tree (this checkout, or another release unpacked
with ``git archive``) in front of the simulator (in this process, plain HTTP on loopback):

1. NoojeeContact applies a start, then does not answer for 9 s (simulator ``slow``): how many
   starts reach it within 25 s, and after a restart (SIGTERM, then a new process, 10 s more).
2. A ``*2`` by extension during an outage (connection refused), then the call's hangup stop by
   uniqueid; NoojeeContact back after 15 s: how many requests by extension reach it.
3. HTTP 200 with a login page, and with cut-off JSON: what the dialplan hears for a stop and a
   start, and what the spool keeps.

    .venv/bin/python bench/issue18.py                       # this checkout
    git archive ef09d8d | tar -x -C /tmp/agi-bridge-ef09d8d
    .venv/bin/python bench/issue18.py --tree /tmp/agi-bridge-ef09d8d   # the release before

About two minutes per tree. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import sys
import tempfile
from pathlib import Path

from agi_bridge.testing.fake_asterisk import Call, run_call
from agi_bridge.testing.simulator import FailureMode, NoojeeSimulator, SimulatorConfig

API_KEY = "bench-key"
SESSION_DEADLINE = 15.0
# The figures: 9 s of silence against the default 5 s request timeout, counted 25 s.
SILENCE = 9.0
ROW1_WATCH = 25.0
ROW1_AFTER_RESTART = 10.0
OUTAGE = 15.0
HERE = Path(__file__).resolve().parent.parent


class BridgeProcess:
    """``python -m agi_bridge serve`` from ``tree`` with default settings but the addresses."""

    def __init__(self, tree: Path, data: Path, noojee_port: int, agi_port: int) -> None:
        self.tree, self.data, self.noojee_port, self.agi_port = tree, data, noojee_port, agi_port
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGI_BRIDGE_")}
        env |= {
            "PYTHONPATH": str(self.tree),
            "AGI_BRIDGE_LISTEN": f"127.0.0.1:{self.agi_port}",
            "AGI_BRIDGE_METRICS_LISTEN": "",
            "AGI_BRIDGE_NOOJEE_URL": f"http://127.0.0.1:{self.noojee_port}/servicemanager/rest",
            "AGI_BRIDGE_NOOJEE_API_KEY": API_KEY,
            "AGI_BRIDGE_DATA_DIR": str(self.data),
            "AGI_BRIDGE_LOG_LEVEL": "error",
            "AGI_BRIDGE_AGENTS": '{"410": "Fred"}',
        }
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agi_bridge", "serve", env=env, cwd=self.tree,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(20):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.agi_port)
                except OSError:
                    await asyncio.sleep(0.05)  # polling a process we started
                    continue
                writer.close()
                return

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    async def call(self, *arguments: str, script: str, uniqueid: str) -> str:
        result = await run_call(
            Call(script=script, arguments=arguments, port=self.agi_port, uniqueid=uniqueid),
            deadline=SESSION_DEADLINE,
        )
        return result.variables.get("NOOJEE_STATUS", "?")

    def spool(self) -> str:
        """pending / dead counts, and the dead letters' reasons when the spool records them."""
        db = sqlite3.connect(self.data / "spool.sqlite3")
        try:
            pending = db.execute("SELECT count(*) FROM pending").fetchone()[0]
            columns = {row[1] for row in db.execute("PRAGMA table_info(dead)")}
            reason = "reason" if "reason" in columns else "'(no reason recorded)'"
            dead = db.execute(f"SELECT {reason} FROM dead").fetchall()  # noqa: S608
        finally:
            db.close()
        return f"pending {pending}, dead {[r[0] for r in dead]}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def row1(tree: Path, work: Path, sim: NoojeeSimulator) -> None:
    bridge = BridgeProcess(tree, work / "row1", sim.port, free_port())
    await bridge.start()
    sim.set_failure(FailureMode.SLOW, delay=SILENCE)
    status = await bridge.call("by=uniqueid", script="recording/start", uniqueid="1764633600.1")
    await asyncio.sleep(ROW1_WATCH)  # the measurement window itself
    before = _starts(sim)
    await bridge.stop()
    await bridge.start()
    await asyncio.sleep(ROW1_AFTER_RESTART)  # the measurement window itself
    after = _starts(sim)
    await bridge.stop()
    print(
        f"row 1  start, applied then {SILENCE:g} s without an answer: dialplan heard {status}; "
        f"{before} start(s) reached NoojeeContact in {ROW1_WATCH:g} s, {after} after a restart "
        f"(+{ROW1_AFTER_RESTART:g} s); spool: {bridge.spool()}"
    )


async def row2(tree: Path, work: Path, sim: NoojeeSimulator) -> None:
    bridge = BridgeProcess(tree, work / "row2", sim.port, free_port())
    await bridge.start()
    sim.set_failure(FailureMode.REFUSE)
    star2 = await bridge.call("by=extension", script="recording/stop", uniqueid="1764633600.2")
    hangup = await bridge.call(
        "by=uniqueid", "mode=async", script="recording/stop", uniqueid="1764633600.2"
    )
    await asyncio.sleep(OUTAGE)  # the outage itself
    sim.set_failure(FailureMode.NONE)
    await sim.wait_for(1, timeout=60, predicate=lambda r: r.params.get("extenOrUniqueId") != "410")
    # A stop sent after the outage: once it arrived, everything queued before it was sent.
    await bridge.call("by=uniqueid", script="recording/stop", uniqueid="1764633600.9")
    await sim.wait_for(
        1, timeout=60, predicate=lambda r: r.params["extenOrUniqueId"].endswith(".9")
    )
    await bridge.stop()
    by_extension = sum(1 for r in sim.received if r.params.get("extenOrUniqueId") == "410")
    print(
        f"row 2  *2 by extension during a {OUTAGE:g} s outage (heard {star2}), hangup stop by "
        f"uniqueid ({hangup}): {by_extension} request(s) by extension delivered after the "
        f"outage; spool: {bridge.spool()}"
    )


async def row3(tree: Path, work: Path, sim: NoojeeSimulator, mode: FailureMode) -> None:
    bridge = BridgeProcess(tree, work / f"row3-{mode.value}", sim.port, free_port())
    await bridge.start()
    sim.set_failure(mode)
    stop = await bridge.call("by=uniqueid", script="recording/stop", uniqueid="1764633600.3")
    start = await bridge.call("by=uniqueid", script="recording/start", uniqueid="1764633600.4")
    await bridge.stop()  # lets the attempts record what became of them
    spool = bridge.spool()
    print(f"row 3  HTTP 200 {mode.value}: stop heard {stop}, start heard {start}; spool: {spool}")


def _starts(sim: NoojeeSimulator) -> int:
    return sum(1 for r in sim.received if r.path.endswith("/start"))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=HERE)
    args = parser.parse_args()
    print(f"bridge from {args.tree}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for run in (
            row1,
            row2,
            lambda t, w, s: row3(t, w, s, FailureMode.LOGIN_PAGE),
            lambda t, w, s: row3(t, w, s, FailureMode.CUT_OFF_JSON),
        ):
            sim = NoojeeSimulator(SimulatorConfig(api_key=API_KEY))
            await sim.start("127.0.0.1", 0)
            try:
                await run(args.tree, work, sim)
            finally:
                await sim.stop()


if __name__ == "__main__":
    asyncio.run(main())
