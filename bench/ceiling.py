"""The ceiling: the least a Python asyncio FastAGI server can do per session.

Read the environment block, send one ``SET VARIABLE``, read the reply, close. No parsing,
no routing, no HTTP, no logging: what is left is the event loop, the streams and the kernel.

With ``COMMANDS`` = 2 it sends two ``SET VARIABLE`` commands, one round trip each, as the
bridge does (``NOOJEE_STATUS`` then ``NOOJEE_MESSAGE``): the protocol's own share of the
bridge's no-op cost.

``streams`` (the default) is the obvious minimal server, on asyncio streams, and the ceiling
the targets are held to (as in the benchmark issue; panoramisk is built the same way).
``protocol`` is the same behaviour as a bare :class:`asyncio.Protocol`, with no stream objects
and no task per connection: the least Python can do per session, a stricter reference (the
bridge itself reads through a Protocol, with a task per session).

Usage: ``python bench/ceiling.py PORT [asyncio|uvloop] [COMMANDS] [streams|protocol]``.
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


class Session(asyncio.Protocol):
    """The same session as a Protocol: environment, then each command and its reply line."""

    def __init__(self) -> None:
        self.buffer = b""
        self.sent = 0  # commands sent so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = b"\n\n" if self.sent == 0 else b"\n"
        if end not in self.buffer:
            return
        self.buffer = b""
        if self.sent < len(COMMANDS):
            self.transport.write(COMMANDS[self.sent])  # type: ignore[attr-defined]
            self.sent += 1
        else:
            self.transport.close()


async def main(port: int, kind: str) -> None:
    if kind == "protocol":
        server = await asyncio.get_running_loop().create_server(
            Session, "127.0.0.1", port, backlog=1024
        )
    else:
        server = await asyncio.start_server(session, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = int(sys.argv[1])
    loop_name = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    del COMMANDS[int(sys.argv[3]) if len(sys.argv) > 3 else 1 :]
    kind = sys.argv[4] if len(sys.argv) > 4 else "streams"
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main(port, kind))
    else:
        asyncio.run(main(port, kind))
