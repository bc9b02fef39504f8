"""Instructions per session under callgrind: the work a bridge does for one sync stop, counted
exactly, without the scheduling and cache effects that move CPU time between runs.

CPU time per session in a closed loop moves by a quarter from one run to the next on this
machine (bench/README.md, "Eighth round"), which hides a change of a few percent. Callgrind
counts the instructions a process executes (user space: the kernel's share and cache misses
are not in it). Each target runs under ``valgrind --tool=callgrind``; after a warm-up its count
is read (``callgrind_control -e``), ``--sessions`` sync stops are made, and it is read again:
the difference per session. One hash seed for every run, so that two runs of the same code
count the same within a few hundredths of a percent; periodic work (the garbage collector's
full passes) is amortised over the sessions, hence their number.

A count is not a time, and its ratio is not the CPU ratio: both bridges spend much the same
time in the kernel per session, which is not counted, and instructions differ in cost (a JSON
log line is 95k instructions and 7.5 us in a loop; a sync stop's 800k take some 250 us). Use it
to see whether a change adds or removes work, within 0.2%, not as the yardstick's figure.

Targets: the minimal bridge (issue 19's yardstick, ``bench/minimal_bridge.py``) and agi-bridge
(a sync stop, as ``bridge-sync-0ms``; ``--bridge-src DIR`` runs a copy of ``agi_bridge`` from
DIR, for A/B). Callgrind runs a target some 50 times slower, so agi-bridge is given budgets
that cannot run out under it (its fast path, as at full speed: no write-ahead to the spool).

Usage:
``python bench/instructions.py [--sessions N] [--concurrency N] [--bridge-src DIR ...]``.
Prints per target the instructions per session and their ratio to the minimal bridge's. Needs
valgrind (Debian's ``valgrind`` package).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # bench/ is not a package
    API_KEY,
    BENCH,
    PYTHON,
    SCENARIOS,
    WARMUP_ID_OFFSET,
    Simulator,
    bridge_environment,
    free_port,
    loadgen_base,
    run_loadgen,
    stop_process,
    wait_port,
)

# Under callgrind a session takes milliseconds, not a fraction of one: budgets and timeouts
# that cannot run out, so every session takes the path it takes at full speed.
SLOW_ENOUGH: dict[str, str] = {
    "AGI_BRIDGE_STOP_BUDGET": "30",
    "AGI_BRIDGE_WRITE_AHEAD_AFTER": "30",
    "AGI_BRIDGE_NOOJEE_TIMEOUT": "60",
    "AGI_BRIDGE_ENVIRONMENT_TIMEOUT": "60",
    "AGI_BRIDGE_COMMAND_TIMEOUT": "60",
}
# The loadgen's sessions through callgrind: its own per-session timeout is 10 s.
WARMUP = 100
# The sessions counted: bench/run.py's sync stop, as bridge-sync-0ms makes them.
SYNC_STOP = next(scenario for scenario in SCENARIOS if scenario.name == "bridge-sync-0ms")
# callgrind_control -e: "Th 1  120,646,110" per thread.
_THREAD = re.compile(r"^\s*Th\s+\d+\s+([\d,]+)", re.MULTILINE)


def _command(target: str, port: int, sim: Simulator) -> list[str]:
    if target == "minimal":
        return [PYTHON, str(BENCH / "minimal_bridge.py"), str(port), sim.base_url, API_KEY,
                str(sim.ca_file)]  # fmt: skip
    return [PYTHON, "-m", "agi_bridge", "serve"]


def _environment(
    target: str, port: int, sim: Simulator, data_dir: Path, concurrency: int
) -> dict[str, str]:
    # One hash seed: dict and set layouts, and so the instructions, the same every run.
    env = dict(os.environ) | {"PYTHONHASHSEED": "0"}
    if target == "minimal":
        return env
    env |= bridge_environment(port, sim, data_dir, concurrency) | SLOW_ENOUGH
    source = target.partition("=")[2]
    if source:
        env["PYTHONPATH"] = source + os.pathsep + env.get("PYTHONPATH", "")
    return env


def counted(pid: int) -> int:
    """Instructions callgrind has counted so far in process ``pid``, all threads."""
    shown = subprocess.run(
        ["callgrind_control", "-e", str(pid)], capture_output=True, text=True, check=True
    ).stdout
    threads = _THREAD.findall(shown)
    if not threads:
        raise RuntimeError(f"callgrind_control showed no counts for {pid}: {shown!r}")
    return sum(int(count.replace(",", "")) for count in threads)


def _check(target: str, result: dict[str, Any], sessions: int) -> None:
    if result["completed"] != sessions or result.get("errors"):
        raise RuntimeError(f"{target}: {result}")


def per_session(target: str, sessions: int, concurrency: int, sim: Simulator) -> float:
    """Instructions ``target`` executes per sync stop, over ``sessions`` after the warm-up."""
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        port = free_port()
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/out"]
        command += _command(target, port, sim)
        data_dir = workdir / "data"
        data_dir.mkdir()
        with (workdir / "target.log").open("w") as log:
            process = subprocess.Popen(
                command,
                env=_environment(target, port, sim, data_dir, concurrency),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
            )
            try:
                wait_port(port, process, timeout=120)
                session = replace(SYNC_STOP, concurrency=concurrency, max_seconds=3600)
                base = loadgen_base(session, port) | {"mode": "closed"}
                run_loadgen(base | {"n": WARMUP, "id_offset": WARMUP_ID_OFFSET})
                before = counted(process.pid)
                result = run_loadgen(base | {"n": sessions})
                after = counted(process.pid)
                _check(target, result, sessions)
            except Exception:
                print((workdir / "target.log").read_text()[-2000:], file=sys.stderr)
                raise
            finally:
                stop_process(process, timeout=120)
        return (after - before) / sessions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument(
        "--bridge-src",
        action="append",
        default=[],
        metavar="DIR",
        help="also count a copy of agi_bridge in DIR (may repeat)",
    )
    args = parser.parse_args()
    targets = ["minimal", "bridge", *(f"bridge={source}" for source in args.bridge_src)]
    with tempfile.TemporaryDirectory() as scratch:
        sim = Simulator(Path(scratch))
        try:
            counts = {}
            for target in targets:
                counts[target] = per_session(target, args.sessions, args.concurrency, sim)
                print(f"{target:40} {counts[target] / 1000:9.1f} k instructions/session",
                      flush=True)  # fmt: skip
        finally:
            sim.close()
    minimal = counts["minimal"]
    print()
    for target, count in counts.items():
        print(f"{target:40} {count / minimal:5.2f}x the minimal bridge")
    return 0


if __name__ == "__main__":
    sys.exit(main())
