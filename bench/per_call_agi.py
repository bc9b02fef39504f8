"""A classic AGI script, one process per call: read the environment from stdin, POST the stop
with httpx, set ``NOOJEE_STATUS``, exit. Started by ``per_call_shim.py`` for each connection.

It is written the way such scripts usually are (synchronous httpx, a fresh client and
therefore a fresh TLS connection per call), with the same request as the bridge sends.
"""

from __future__ import annotations

import os
import ssl
import sys
from urllib.parse import quote

import httpx


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    env: dict[str, str] = {}
    while line := stdin.readline():
        text = line.decode("utf-8", "replace").rstrip("\n")
        if not text:
            break
        name, _, value = text.partition(": ")
        env[name] = value
    extension = env.get("agi_channel", "").partition("/")[2].rpartition("-")[0]
    agent = env.get("agi_arg_1", "")
    url = (
        f"{os.environ['BENCH_NOOJEE_URL']}/CallManagementAPI/stop"
        f"?extenOrUniqueId={quote(extension, safe='')}&agentLoginName={quote(agent, safe='')}"
        f"&apiKey={quote(os.environ['BENCH_API_KEY'], safe='')}"
    )
    context = ssl.create_default_context(cafile=os.environ["BENCH_CA_FILE"])
    try:
        with httpx.Client(verify=context, timeout=5.0) as client:
            response = client.post(
                url, content=b"", headers={"Content-Type": "application/x-www-form-urlencoded"}
            )
        status = "STOPPED" if response.status_code == 200 else "FAILED"
    except httpx.HTTPError:
        status = "FAILED"
    stdout.write(f"SET VARIABLE NOOJEE_STATUS {status}\n".encode())
    stdout.flush()
    stdin.readline()  # 200 result=1


if __name__ == "__main__":
    main()
