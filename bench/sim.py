"""The NoojeeContact simulator as the benchmark's backend, in its own process.

HTTPS with keep-alive (:class:`agi_bridge.testing.simulator.NoojeeSimulator`), on uvloop, with no
per-request output (``agi-bridge simulate-noojee`` prints a JSON line per request, which would
cost CPU the target competes for on a 2-core machine). Controlled by lines on stdin, one answer
line on stdout each:

* ``latency SECONDS`` -> ``ok``: added before every API answer;
* ``count`` -> the number of API requests received since the last ``reset``;
* ``cpu`` -> this process's CPU seconds so far;
* ``reset`` -> ``ok``.

Usage: ``python bench/sim.py PORT CERT_CHAIN_PEM API_KEY``; prints ``ready`` once listening.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys

from agi_bridge.testing.simulator import NoojeeSimulator, ReceivedRequest, SimulatorConfig


async def main(port: int, cert: str, api_key: str) -> None:
    count = 0

    def on_request(_request: ReceivedRequest) -> None:
        nonlocal count
        count += 1

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert)
    # Few records kept: we only count, and the benchmark pushes tens of thousands.
    config = SimulatorConfig(api_key=api_key, max_records=1000)
    simulator = NoojeeSimulator(config, on_request=on_request)
    await simulator.start("127.0.0.1", port, context)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    try:
        while line := (await reader.readline()).decode().split():
            if line[0] == "latency":
                simulator.latency = float(line[1])
                answer = "ok"
            elif line[0] == "count":
                answer = str(count)
            elif line[0] == "cpu":
                times = os.times()
                answer = f"{times.user + times.system:.3f}"
            elif line[0] == "reset":
                count = 0
                simulator.clear()
                answer = "ok"
            else:
                answer = "?"
            print(answer, flush=True)
    finally:
        await simulator.stop()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
