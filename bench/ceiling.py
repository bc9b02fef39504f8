"""The ceiling: the least a Python asyncio FastAGI server can do per session.

Read the environment block, send one ``SET VARIABLE``, read the reply, close. No parsing,
no routing, no HTTP, no logging: what is left is the event loop, the streams and the kernel.

With ``COMMANDS`` = 2 it sends two ``SET VARIABLE`` commands, one round trip each, as the
bridge does (``NOOJEE_STATUS`` then ``NOOJEE_MESSAGE``): the protocol's own share of the
bridge's no-op cost.

Usage: ``python bench/ceiling.py PORT [asyncio|uvloop] [COMMANDS]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys

COMMANDS = [b'SET VARIABLE NOOJEE_STATUS "STOPPED"\n', b'SET VARIABLE NOOJEE_MESSAGE "ok"\n']


async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\n\n")
        for command in COMMANDS:
            writer.write(command)
            await reader.readline()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def main(port: int) -> None:
    server = await asyncio.start_server(session, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = int(sys.argv[1])
    loop_name = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    del COMMANDS[int(sys.argv[3]) if len(sys.argv) > 3 else 1 :]
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main(port))
    else:
        asyncio.run(main(port))
