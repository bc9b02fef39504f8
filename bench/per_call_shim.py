"""Process-per-call: a tiny shim that execs a new Python AGI script for every connection.

This is what many admins run (xinetd or a shim in front of a classic AGI script): the
accepted socket becomes the script's stdin and stdout, exactly like ``AGI(script.py)``
with a local script. The shim accepts with ``sock_accept`` (it never reads the socket itself,
so no byte of the environment is lost to the parent), starts
``python bench/per_call_agi.py`` and reaps it, so the children's CPU lands in this process's
``cutime``/``cstime`` (``/proc/<pid>/stat``), which the benchmark adds to the shim's own.

Usage: ``python bench/per_call_shim.py PORT`` (the script's settings come from the environment:
``BENCH_NOOJEE_URL``, ``BENCH_API_KEY``, ``BENCH_CA_FILE``).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

SCRIPT = str(Path(__file__).with_name("per_call_agi.py"))


async def run_one(conn: socket.socket) -> None:
    conn.setblocking(True)  # the child's stdin/stdout are plain blocking files
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, SCRIPT, stdin=conn.fileno(), stdout=conn.fileno()
        )
    finally:
        conn.close()  # the child holds its own copy; Asterisk sees the close when it exits
    await process.wait()  # reaped: its CPU is counted in our cutime/cstime


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()
    while True:
        conn, _ = await loop.sock_accept(listener)
        task = asyncio.ensure_future(run_one(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
