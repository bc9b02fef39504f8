"""The direct peer: panoramisk's ``fast_agi.Application`` doing the same stop through httpx.

The handler takes the agent from ``agi_arg_1`` and the extension from ``agi_channel`` (as the
bridge does by default), POSTs ``CallManagementAPI/stop`` over one shared, kept-alive
``httpx.AsyncClient`` (default transport, pool sized for the benchmark's concurrency), and sets
``NOOJEE_STATUS`` with one ``SET VARIABLE``.

panoramisk 1.4 workarounds, only what is needed to run it on Python 3.11:

* ``Application(loop=...)``: without it the constructor calls ``asyncio.get_event_loop()``
  outside a running loop (deprecated, warns). We build it inside the running loop.
* The route is an ``async def``: plain functions go through ``asyncio.coroutine``, which is gone
  in 3.11.

Not worked around, because the benchmark never triggers them: the environment loop spins
forever at end of stream, strict UTF-8 decoding, no timeouts, ``except BaseException``.

Usage: ``python bench/panoramisk_target.py PORT BASE_URL API_KEY CA_FILE MAX_CONNECTIONS``.
"""

from __future__ import annotations

import asyncio
import resource
import ssl
import sys
from typing import Any
from urllib.parse import quote

import httpx
from panoramisk.fast_agi import Application


async def main(port: int, base_url: str, api_key: str, ca_file: str, pool: int) -> None:
    client = httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=ca_file),
        limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        timeout=5.0,
    )
    stop_url = f"{base_url}/CallManagementAPI/stop"

    async def stop(request: Any) -> None:
        headers = request.headers
        channel = headers.get("agi_channel", "")
        extension = channel.partition("/")[2].rpartition("-")[0]
        agent = headers.get("agi_arg_1", "")
        url = (
            f"{stop_url}?extenOrUniqueId={quote(extension, safe='')}"
            f"&agentLoginName={quote(agent, safe='')}&apiKey={quote(api_key, safe='')}"
        )
        try:
            response = await client.post(
                url, content=b"", headers={"Content-Type": "application/x-www-form-urlencoded"}
            )
            status = "STOPPED" if response.status_code == 200 else "FAILED"
        except httpx.HTTPError:
            status = "FAILED"
        await request.send_command(f"SET VARIABLE NOOJEE_STATUS {status}")

    app = Application(loop=asyncio.get_running_loop())
    app.add_route("recording/stop", stop)
    server = await asyncio.start_server(app.handler, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args = sys.argv[1:]
    coroutine = main(int(args[0]), args[1], args[2], args[3], int(args[4]))
    if len(args) > 5 and args[5] == "asyncio":
        asyncio.run(coroutine)
    else:
        import uvloop

        uvloop.run(coroutine)
