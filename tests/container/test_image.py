"""The image built from the Dockerfile, run for real: a call, the health check, the user, the
stop signal and the spool volume. Containers share the host's network, on free loopback ports."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agi_bridge.testing.defaults import DEMO_KEY
from tests.container.conftest import Docker

pytestmark = pytest.mark.container

# What the Dockerfile and docker-compose.yml recommend (--stop-timeout 30, stop_grace_period):
# the bridge's worst case is shutdown_grace (20 s) plus the spool's last flush (2 s).
STOP_TIMEOUT = 30
# From `docker run` to a listening process: Python's start-up in a fresh container, ~1 s.
START_WITHIN = 30.0
# The image's HEALTHCHECK probes every 30 s; the tests probe every second with the same
# command, so that healthy is reached in seconds rather than after the first interval.
HEALTH_INTERVAL = "1s"
HEALTHY_WITHIN = 30.0
# A replayed stop reaches the simulator as soon as the new bridge starts; margin for load.
DELIVERED_WITHIN = 30.0
UID = 10001  # the Dockerfile's USER


@dataclass(frozen=True)
class Ports:
    """Free loopback ports for one test's bridge (AGI, metrics) and simulator."""

    agi: int
    metrics: int
    simulator: int


def _free_ports() -> Ports:
    sockets = [socket.socket() for _ in range(3)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        agi, metrics, simulator = (int(sock.getsockname()[1]) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    return Ports(agi, metrics, simulator)


@pytest.fixture
def ports() -> Ports:
    """Three free loopback ports."""
    return _free_ports()


def _logged(docker: Docker, container: str, event: str) -> bool:
    """Whether the container's stderr (JSON lines) holds ``event``."""
    for line in docker.logs(container)[1].splitlines():
        try:
            if json.loads(line).get("event") == event:
                return True
        except ValueError:
            continue
    return False


def start_simulator(docker: Docker, ports: Ports) -> str:
    name = docker.run(
        "simulator",
        f"--stop-timeout={STOP_TIMEOUT}",
        docker.image,
        "simulate-noojee",
        f"--listen=127.0.0.1:{ports.simulator}",
    )
    docker.wait_until(
        "simulator listening", lambda: _logged(docker, name, "simulator.listening"), START_WITHIN
    )
    return name


def start_bridge(docker: Docker, ports: Ports, *options: str) -> str:
    name = docker.run(
        "bridge",
        f"--stop-timeout={STOP_TIMEOUT}",
        *options,
        docker.image,
        env={
            "AGI_BRIDGE_LISTEN": f"127.0.0.1:{ports.agi}",
            "AGI_BRIDGE_METRICS_LISTEN": f"127.0.0.1:{ports.metrics}",
            "AGI_BRIDGE_NOOJEE_URL": f"http://127.0.0.1:{ports.simulator}/servicemanager/rest",
            "AGI_BRIDGE_NOOJEE_API_KEY": DEMO_KEY,
        },
    )
    docker.wait_until(
        "bridge listening", lambda: _logged(docker, name, "agi.server.listening"), START_WITHIN
    )
    return name


def fake_call(ports: Ports, *arguments: str, uniqueid: str) -> dict[str, str]:
    """``agi-bridge fake-call`` against the bridge: the variables it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "agi_bridge", "fake-call", *arguments,
         f"--to=127.0.0.1:{ports.agi}", f"--uniqueid={uniqueid}"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def received_stops(docker: Docker, simulator: str) -> list[dict[str, str]]:
    """The parameters of every stop the simulator answered (its JSON lines on stdout)."""
    requests = [json.loads(line) for line in docker.logs(simulator)[0].splitlines()]
    return [r["params"] for r in requests if r["path"].endswith("/CallManagementAPI/stop")]


def stop(docker: Docker, container: str) -> tuple[int, float]:
    """``docker stop`` with the container's own stop timeout: its exit status, seconds taken."""
    t0 = time.monotonic()
    docker("stop", container)
    return int(docker.inspect(container, "{{.State.ExitCode}}")), time.monotonic() - t0


def test_image_bridge_stops_a_recording(docker: Docker, ports: Ports) -> None:
    """The image's bridge answers fake-call with STOPPED after the image's simulator confirms."""
    simulator = start_simulator(docker, ports)
    start_bridge(docker, ports)
    variables = fake_call(ports, "recording/stop", "Fred", uniqueid="1700000000.1")
    assert variables["AGISTATUS"] == "SUCCESS", variables
    assert variables["NOOJEE_STATUS"] == "STOPPED", variables
    [params] = received_stops(docker, simulator)
    assert params["extenOrUniqueId"] == "410"
    assert params["agentLoginName"] == "Fred"


def test_image_healthcheck_turns_healthy(docker: Docker, ports: Ports) -> None:
    """The image's own HEALTHCHECK command reports the running bridge healthy."""
    bridge = start_bridge(docker, ports, f"--health-interval={HEALTH_INTERVAL}")
    probe = json.loads(docker.inspect(bridge, "{{json .Config.Healthcheck.Test}}"))
    assert probe[-1] == "/usr/local/bin/agi-bridge-healthcheck", probe
    docker.wait_until(
        "healthy",
        lambda: docker.inspect(bridge, "{{.State.Health.Status}}") == "healthy",
        HEALTHY_WITHIN,
    )


def test_image_processes_run_as_a_non_root_user(docker: Docker, ports: Ports) -> None:
    """The bridge's and the simulator's main processes run as uid/gid 10001, not root."""
    for container in (start_simulator(docker, ports), start_bridge(docker, ports)):
        pid = docker.inspect(container, "{{.State.Pid}}")
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        ids = {
            line.split(":")[0]: line.split()[1:]
            for line in status
            if line.startswith(("Uid", "Gid"))
        }
        assert ids == {"Uid": [str(UID)] * 4, "Gid": [str(UID)] * 4}, (container, ids)


def test_docker_stop_ends_each_container_cleanly(docker: Docker, ports: Ports) -> None:
    """`docker stop` (SIGTERM) ends the bridge and the simulator with status 0 in time."""
    simulator = start_simulator(docker, ports)
    bridge = start_bridge(docker, ports)
    assert fake_call(ports, "recording/stop", "Fred", uniqueid="1700000000.2")["NOOJEE_STATUS"] == (
        "STOPPED"
    )
    for container in (bridge, simulator):
        code, seconds = stop(docker, container)
        assert code == 0, (container, docker.logs(container)[1][-2000:])
        assert seconds < STOP_TIMEOUT, (container, seconds)


@pytest.mark.timeout(180)  # four container starts and two stops on busy cores
def test_queued_stop_survives_container_recreation(docker: Docker, ports: Ports) -> None:
    """A stop queued while NoojeeContact is down stays on the spool volume across the bridge
    container's removal and re-creation, and the new container delivers it."""
    spool = docker.volume()
    volume = f"--volume={spool}:/var/lib/agi-bridge"
    first = start_bridge(docker, ports, volume)
    variables = fake_call(ports, "recording/stop", "Wilma", uniqueid="1700000000.3")
    assert variables["NOOJEE_STATUS"] == "QUEUED", variables
    code, _ = stop(docker, first)
    assert code == 0, docker.logs(first)[1][-2000:]
    docker("rm", first)
    simulator = start_simulator(docker, ports)
    assert received_stops(docker, simulator) == []
    start_bridge(docker, ports, volume)
    docker.wait_until(
        "the queued stop delivered",
        lambda: received_stops(docker, simulator) != [],
        DELIVERED_WITHIN,
    )
    [params] = received_stops(docker, simulator)
    assert params["extenOrUniqueId"] == "410"
    assert params["agentLoginName"] == "Wilma"
