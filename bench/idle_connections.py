"""Idle-connection wave: do real calls still get through while a local process holds thousands
of connections that send nothing? Loopback only, bounded in count and time.

The bridge runs with its default settings (max_sessions 4096, environment_timeout 2 s) as a
real process, in front of the NoojeeContact simulator. This script opens IDLE connections at
once (default 5,000) and keeps them silent, while it places real stop calls at a steady rate
from the moment the wave starts; it prints how many real calls were refused
(AGISTATUS=FAILURE) or served, and the longest stretch of refusals.

    .venv/bin/python bench/idle_connections.py
    .venv/bin/python bench/idle_connections.py --idle 8000 --seconds 6
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from faults import Processes, stop_call

# The calls the wave must not block: one every 20 ms, as a busy PBX's hangups might come.
CALL_INTERVAL = 0.02

# The wave: argv port, count, seconds to hold them; prints "opened connect_errors".
WAVE = """
import asyncio, sys

async def main(port, count, hold):
    writers, errors = [], 0

    async def open_one():
        nonlocal errors
        try:
            writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
        except OSError:
            errors += 1

    await asyncio.gather(*(open_one() for _ in range(count)))
    await asyncio.sleep(hold)
    print(len(writers), errors)

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
"""


async def wave(idle: int, seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="agi-bridge-idle-") as tmp:
        procs = Processes(Path(tmp))
        outcomes: list[tuple[float, str]] = []
        try:
            await procs.start_simulator()
            await procs.start_bridge(AGI_BRIDGE_LOG_LEVEL="error")
            # The wave comes from a process of its own, as it would: in this one, opening
            # thousands of connections would also delay the calls' own environments.
            waver = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WAVE,
                str(procs.agi_port),
                str(idle),
                str(seconds + 1),
                stdout=asyncio.subprocess.PIPE,
            )
            started = time.monotonic()

            async def calls() -> None:
                n = 0
                while time.monotonic() - started < seconds:
                    at = time.monotonic() - started
                    result = await stop_call(procs.agi_port, f"idle.{n}")
                    status = result.variables.get("NOOJEE_STATUS", f"AGISTATUS={result.agistatus}")
                    outcomes.append((at, status))
                    n += 1
                    await asyncio.sleep(CALL_INTERVAL)  # pacing the load, not synchronisation

            await calls()
            out, _ = await waver.communicate()
            opened, connect_errors = map(int, out.split())
            alive = procs.bridge is not None and procs.bridge.returncode is None
        finally:
            await procs.stop_all()
    refused = [at for at, status in outcomes if status != "STOPPED"]
    stretch, longest, previous_ok = 0.0, 0.0, 0.0
    for at, status in outcomes:
        if status == "STOPPED":
            previous_ok = at
        else:
            stretch = at - previous_ok
            longest = max(longest, stretch)
    return {
        "idle": idle,
        "idle_opened": opened,
        "connect_errors": connect_errors,
        "calls": len(outcomes),
        "served": len(outcomes) - len(refused),
        "refused": len(refused),
        "refused_at_s": [round(at, 2) for at in refused[:10]],
        "longest_refused_stretch_s": round(longest, 2),
        "bridge_alive": alive,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=5000, help="idle connections opened at once")
    parser.add_argument("--seconds", type=float, default=4.0, help="real calls placed this long")
    args = parser.parse_args()
    r = await wave(args.idle, args.seconds)
    print(
        f"idle wave: {r['idle']} connections opened at once and kept silent "
        f"({r['idle_opened']} connected, {r['connect_errors']} connect errors)"
    )
    print(
        f"  real calls during {args.seconds:g} s: {r['calls']}, served {r['served']}, refused "
        f"{r['refused']} (at {r['refused_at_s']} s); longest stretch of refusals "
        f"{r['longest_refused_stretch_s']} s; "
        f"bridge alive: {r['bridge_alive']}"
    )
    return 0 if r["bridge_alive"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
