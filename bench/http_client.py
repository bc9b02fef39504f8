"""CPU per HTTPS request of the ways the bridge could post a stop, in one process.

The same request (``POST .../CallManagementAPI/stop?...&apiKey=...``, empty body, a short JSON
answer) against the benchmark's simulator (HTTPS, keep-alive, its own process), 20 concurrent
requests on uvloop, each variant measured in turn for several rounds (the median is printed,
so a noisy neighbour in one round does not decide). What it answers: where the CPU of the
bridge's HTTP leg goes, and which transport the client should use (issue 6).

Variants:

* ``bridge``: :meth:`agi_bridge.noojee.NoojeeClient.send`, as the bridge runs it (httpx
  ``Request``/``Response`` handed straight to
  :class:`agi_bridge.noojee.transport.HttpTransport`, then classification);
* ``httpx.AsyncClient + agi_bridge transport``: the same transport under an
  ``httpx.AsyncClient`` (what the client layer costs);
* ``httpx.AsyncClient + httpx-aiohttp``: the ``httpx-aiohttp`` package's transport (what the
  bridge used before commit c3fa110), when that package is installed;
* ``aiohttp under httpx's API``: the transport the bridge used from c3fa110 to issue 19's
  eleventh round (``agi_bridge/noojee/transport.py`` at dce4b27), when ``--aiohttp-transport
  DIR`` names a copy of that ``agi_bridge`` (``git archive dce4b27 agi_bridge | tar -x -C
  DIR``);
* ``httpx.AsyncClient (httpcore)``: httpx with its default transport;
* ``aiohttp``: aiohttp's own client, what the minimal bridge of issue 19 uses.

Usage: ``python bench/http_client.py [--requests N] [--rounds R] [--aiohttp-transport DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import API_KEY, Simulator  # bench/run.py: certificates, simulator

from agi_bridge.noojee.classify import MAX_RESPONSE_BYTES
from agi_bridge.noojee.client import NoojeeClient
from agi_bridge.noojee.transport import HttpTransport
from agi_bridge.vocabulary import RecordingRequest

try:
    from httpx_aiohttp import AiohttpTransport as PackageTransport
except ImportError:  # not a dependency of the bridge any more
    PackageTransport = None

# Enough requests in flight that the pool holds several connections, as under a burst.
CONCURRENCY = 20
STOP = RecordingRequest(action="stop", target="410", agent="Fred")
HEADERS = {"Content-Type": "application/x-www-form-urlencoded", "Accept-Encoding": "identity"}

Post = Callable[[], Awaitable[None]]


async def _cpu_per_request(post: Post, requests: int) -> float:
    """Microseconds of this process's CPU per request, ``requests`` spread over the workers."""

    async def worker(count: int) -> None:
        for _ in range(count):
            await post()

    await worker(100)  # connections into the pool, first-use imports
    started = time.process_time()
    await asyncio.gather(*(worker(requests // CONCURRENCY) for _ in range(CONCURRENCY)))
    return (time.process_time() - started) / requests * 1e6


def _old_transport(directory: Path) -> type[httpx.AsyncBaseTransport]:
    """The aiohttp transport class of a copy of agi_bridge from before the eleventh round."""
    path = directory / "agi_bridge" / "noojee" / "transport.py"
    spec = importlib.util.spec_from_file_location("old_transport", path)
    assert spec is not None, f"no transport at {path}"
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    transport: type[httpx.AsyncBaseTransport] = module.AiohttpTransport
    return transport


async def main(sim: Simulator, requests: int, rounds: int, old: Path | None) -> None:
    url = f"{sim.base_url}/CallManagementAPI/stop?extenOrUniqueId=410&agentLoginName=Fred"
    url += f"&apiKey={API_KEY}"
    context = ssl.create_default_context(cafile=str(sim.ca_file))
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)

    bridge = NoojeeClient(
        base_url=sim.base_url, auth="apikey", api_key=API_KEY, ca_file=sim.ca_file
    )
    clients = {
        "httpx.AsyncClient + agi_bridge transport": httpx.AsyncClient(
            transport=HttpTransport(
                verify=context, limits=limits, max_body_bytes=MAX_RESPONSE_BYTES
            ),
            headers=HEADERS,
        ),
    }
    if PackageTransport is not None:
        clients["httpx.AsyncClient + httpx-aiohttp"] = httpx.AsyncClient(
            transport=PackageTransport(verify=context, trust_env=False, limits=limits),
            headers=HEADERS,
        )
    clients["httpx.AsyncClient (httpcore)"] = httpx.AsyncClient(
        verify=context, limits=limits, headers=HEADERS
    )
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=64))

    async def via_bridge() -> None:
        assert (await bridge.send(STOP)).ok

    def via_httpx(client: httpx.AsyncClient) -> Post:
        async def post() -> None:
            response = await client.post(url, content=b"")
            assert response.status_code == 200

        return post

    async def via_aiohttp() -> None:
        async with session.post(url, data=None, headers=HEADERS) as response:
            await response.read()
            assert response.status == 200

    variants: dict[str, Post] = {"bridge (NoojeeClient.send)": via_bridge}
    on_aiohttp: NoojeeClient | None = None
    if old is not None:
        on_aiohttp = NoojeeClient(
            base_url=sim.base_url,
            auth="apikey",
            api_key=API_KEY,
            ca_file=sim.ca_file,
            transport=_old_transport(old)(
                verify=context,
                limits=limits,
                max_body_bytes=MAX_RESPONSE_BYTES,
                headers=bridge._headers,
            ),
        )

        async def via_old() -> None:
            assert (await on_aiohttp.send(STOP)).ok

        variants["bridge on aiohttp under httpx's API"] = via_old
    variants.update({name: via_httpx(client) for name, client in clients.items()})
    variants["aiohttp"] = via_aiohttp
    samples: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(rounds):
            for name, post in variants.items():
                samples[name].append(await _cpu_per_request(post, requests))
    finally:
        await bridge.aclose()
        if on_aiohttp is not None:
            await on_aiohttp.aclose()
        for client in clients.values():
            await client.aclose()
        await session.close()
    floor = statistics.median(samples["aiohttp"])
    print(f"{'client':42s} {'us CPU/request':>15s} {'vs aiohttp':>11s}   (median of {rounds})")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:42s} {median:15.0f} {median / floor:10.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--aiohttp-transport",
        type=Path,
        metavar="DIR",
        help="a copy of agi_bridge whose noojee/transport.py is the aiohttp one (dce4b27)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agi-bridge-http-") as workdir:
        simulator = Simulator(Path(workdir))
        try:
            uvloop.run(main(simulator, args.requests, args.rounds, args.aiohttp_transport))
        finally:
            simulator.close()
