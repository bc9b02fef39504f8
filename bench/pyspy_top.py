"""Summarise a py-spy ``--format raw`` profile (collapsed stacks): where the samples go.

Usage: ``python bench/pyspy_top.py PROFILE.txt [--top N] [--thread NAME]``. Prints the top
functions by self samples and by inclusive samples (a function counted once per stack), as a
percentage of all samples, plus the share of each thread.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# py-spy frames look like "function (path/to/file.py:123)"; drop the line number so one
# function is one entry.
_LINE = re.compile(r":\d+\)$")


def _short(frame: str) -> str:
    frame = _LINE.sub(")", frame)
    frame = re.sub(r"\(.*?site-packages/", "(", frame)
    frame = re.sub(r"\(/work/main/|\(/tmp/[^/]+/", "(", frame)
    return re.sub(r"\(/root/\.pyenv/versions/[^/]+/lib/python3\.\d+/", "(stdlib/", frame)


# Leaf frame -> bucket: which layer the CPU is spent in.
_BUCKETS = (
    ("spool thread (SQLite)", "agi-bridge-spool"),
    ("event loop itself (uvloop C: epoll, syscalls, callbacks)", "Runner.run ("),
    ("aiohttp", "aiohttp/"),
    ("httpx / httpx-aiohttp", "httpx"),
    ("httpcore / anyio", "httpcore/"),
    ("ssl", "ssl.py"),
    ("structlog / logs", "structlog/"),
    ("prometheus_client", "prometheus_client/"),
    ("agi_bridge protocol", "agi_bridge/protocol.py"),
    ("agi_bridge server", "agi_bridge/server.py"),
    ("agi_bridge delivery", "agi_bridge/delivery"),
    ("agi_bridge noojee", "agi_bridge/noojee/"),
    ("agi_bridge spool (loop side)", "agi_bridge/spool.py"),
    ("agi_bridge other", "agi_bridge/"),
    ("asyncio streams", "asyncio/streams.py"),
    ("asyncio other", "asyncio/"),
    ("import machinery", "importlib"),
)


def bucket(thread: str, leaf: str) -> str:
    for name, needle in _BUCKETS:
        if needle in (thread if name.startswith("spool") else leaf):
            return name
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--thread", help="only stacks whose thread frame contains this")
    args = parser.parse_args()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in args.profile.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        if args.thread and args.thread not in stack:
            continue
        threads[thread] += count
        total += count
        calls = [_short(f) for f in frames if not f.startswith(("thread", "process"))]
        if calls:
            own[calls[-1]] += count
            buckets[bucket(thread, frames[-1])] += count
        for name in set(calls):
            inclusive[name] += count
    print(f"{total} samples")
    for thread, count in threads.most_common():
        print(f"  {count / total * 100:5.1f}%  {thread}")
    print("\nby layer (leaf frame)")
    for name, count in buckets.most_common():
        print(f"  {count / total * 100:5.1f}%  {name}")
    print(f"\ntop {args.top} by self time")
    for name, count in own.most_common(args.top):
        print(f"  {count / total * 100:5.1f}%  {name}")
    print(f"\ntop {args.top} by inclusive time")
    for name, count in inclusive.most_common(args.top):
        print(f"  {count / total * 100:5.1f}%  {name}")


if __name__ == "__main__":
    main()
