"""How long ``agi-bridge --help`` takes against a bare ``python -c pass`` (issue 21).

Usage: ``.venv/bin/python bench/cli_start.py [--runs N] [--src DIR]``. Runs the two commands
in turn (A B A B ...), after warm-up runs that are not counted, and prints each one's median
wall time and the median of the pairwise ratios: pairs keep the ratio meaningful when the
machine's load drifts during the run. ``--src DIR`` puts DIR first on ``PYTHONPATH`` (time
another copy of ``agi_bridge/``, e.g. one from ``git archive``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The figure is a median of 15; two warm-ups fill the page cache and .pyc files.
RUNS = 15
WARMUPS = 2


def _wall(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS, help="counted runs (default %(default)s)")
    parser.add_argument("--src", type=Path, help="a directory holding agi_bridge/ to time instead")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.src), env.get("PYTHONPATH")]))
    # What an operator runs is the console script; -m runs the same imports when there is none
    # (-P: not the working directory's agi_bridge/ before --src's).
    script = Path(sys.executable).with_name("agi-bridge")
    help_command = (
        [str(script), "--help"]
        if script.exists() and args.src is None
        else [sys.executable, "-P", "-m", "agi_bridge", "--help"]
    )
    bare = [sys.executable, "-c", "pass"]
    for _ in range(WARMUPS):
        _wall(help_command, env)
        _wall(bare, env)
    pairs = [(_wall(help_command, env), _wall(bare, env)) for _ in range(args.runs)]
    helps, bares = zip(*pairs, strict=True)
    print(f"{' '.join(help_command)}: median {statistics.median(helps) * 1000:.0f} ms")
    print(f"{' '.join(bare)}: median {statistics.median(bares) * 1000:.0f} ms")
    ratio = statistics.median(h / b for h, b in pairs)
    print(f"ratio (median of {args.runs} pairs): {ratio:.1f}x")


if __name__ == "__main__":
    main()
