"""The yardstick (issue 19): the minimal Python bridge, exactly as the issue specifies it.

``asyncio.start_server``; read the environment to the blank line; one ``aiohttp.ClientSession``
(``TCPConnector(ssl=<the CA context>, limit=50)``) POSTs ``CallManagementAPI/stop`` with
``extenOrUniqueId``, ``agentLoginName`` and ``apiKey`` as query parameters;
``await resp.json(content_type=None)``; write one ``SET VARIABLE NOOJEE_STATUS ...``; read the
reply; close. The extension comes from ``agi_channel`` and the agent from ``agi_arg_1``, as the
bridge does by default. On uvloop, the bridge's own event loop.

Frozen once committed: it is what agi-bridge's overhead is measured against, not something to
tune. No timeouts, no durability, no dedupe, no log line, no metrics: only the work every bridge
must do.

Usage: ``python bench/minimal_bridge.py PORT BASE_URL API_KEY CA_FILE``.
"""

from __future__ import annotations

import asyncio
import resource
import ssl
import sys

import aiohttp
import uvloop


async def main(port: int, base_url: str, api_key: str, ca_file: str) -> None:
    context = ssl.create_default_context(cafile=ca_file)
    stop_url = f"{base_url}/CallManagementAPI/stop"
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context, limit=50)
    ) as client:

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                block = await reader.readuntil(b"\n\n")
                environment = dict(
                    line.partition(": ")[::2] for line in block.decode().splitlines() if line
                )
                channel = environment.get("agi_channel", "")
                params = {
                    "extenOrUniqueId": channel.partition("/")[2].rpartition("-")[0],
                    "agentLoginName": environment.get("agi_arg_1", ""),
                    "apiKey": api_key,
                }
                try:
                    async with client.post(stop_url, params=params) as resp:
                        body = await resp.json(content_type=None)
                    ok = resp.status == 200 and (not body or body.get("Code", 0) >= 0)
                    status = "STOPPED" if ok else "FAILED"
                except (aiohttp.ClientError, ValueError):
                    status = "FAILED"
                writer.write(f"SET VARIABLE NOOJEE_STATUS {status}\n".encode())
                await reader.readline()
            finally:
                writer.close()

        server = await asyncio.start_server(session, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args = sys.argv[1:]
    uvloop.run(main(int(args[0]), args[1], args[2], args[3]))
