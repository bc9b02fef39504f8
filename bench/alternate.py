"""A/B runs of patched copies of agi_bridge against each other, alternating, each beside the
minimal bridge.

    .venv/bin/python bench/alternate.py ROUNDS SCENARIOS NAME=SOURCE [NAME=SOURCE ...]

SCENARIOS is a comma-separated list of bench/run.py scenarios (the minimal bridge is always
run too, first); SOURCE is a directory holding a copy of ``agi_bridge`` (``git archive REV
agi_bridge | tar -x -C DIR``, or a copy edited to remove a layer: an ablation), ``-`` for the
tree itself, and may end in ``@NAME=VALUE`` settings for the bridge
(``@AGI_BRIDGE_DEDUP_WINDOW=0``). Each round runs every variant once, in turn, so that a busy
moment of this shared machine hits them alike; the minimal bridge's CPU moves by a quarter
between rounds, so each variant's ratio is taken to the minimal bridge of its own invocation.
Prints every invocation, then per variant and scenario the median CPU per session (ms) and
ratio, and every round's values.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def invocation(source: str, scenarios: list[str]) -> dict[str, float]:
    """CPU per session (s per 1k sessions) of each scenario in one bench/run.py invocation."""
    directory, *settings = source.split("@")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run.json"
        command = [sys.executable, str(BENCH / "run.py"), "--scenarios", "minimal", *scenarios]
        command += ["--json", str(out)]
        if directory != "-":
            command += ["--bridge-src", directory]
        for setting in settings:
            command += ["--bridge-env", setting]
        subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, check=True)
        rows = json.loads(out.read_text())["scenarios"]
    return {row["scenario"]: row["cpu_s_per_1k"] for row in rows}


def main() -> int:
    if len(sys.argv) < 4:
        print(__doc__)
        return 2
    rounds, scenarios = int(sys.argv[1]), sys.argv[2].split(",")
    variants = [argument.split("=", 1) for argument in sys.argv[3:]]
    seen: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name, _ in variants}
    for number in range(rounds):
        for name, source in variants:
            cpu = invocation(source, scenarios)
            minimal = cpu["minimal"]
            line = [f"{name:12s} round {number}  minimal {minimal:.3f}"]
            for scenario in scenarios:
                seen[name].setdefault(scenario, []).append((cpu[scenario], cpu[scenario] / minimal))
                line.append(f"{scenario} {cpu[scenario]:.3f} ({cpu[scenario] / minimal:.2f})")
            print("  ".join(line), flush=True)
    print()
    for name, _ in variants:
        for scenario, values in seen[name].items():
            cpus = ", ".join(f"{cpu:.3f}" for cpu, _ in values)
            ratios = ", ".join(f"{ratio:.2f}" for _, ratio in values)
            print(
                f"{name:12s} {scenario:18s} CPU {statistics.median(c for c, _ in values):.3f}"
                f" [{cpus}]  ratio {statistics.median(r for _, r in values):.2f} [{ratios}]"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
