"""Fixtures for the container image tests: the Dockerfile built and run on a real Docker engine.

- The engine is the one ``DOCKER_HOST`` names: ``scripts/test`` starts a private ``dockerd``
  (no bridge network, no iptables) for the run. Every container runs with ``--network host``
  on free loopback ports; no network is ever created.
- The image is built once, before the first test and outside any test's timeout
  (``pytest_runtestloop``), only when a ``container`` test was selected: ``scripts/docker-base``
  loads a locally made Debian base image (the public registry is out of reach), then
  ``docker build`` uses it as the Dockerfile's ``PYTHON_IMAGE``.
- ``docker`` (function): runs containers and volumes with names unique to this run, and
  removes them at the end of the test.

Without an engine (or without root for the base image), the tests are SKIPPED with a reason
naming what is missing. ``AGI_BRIDGE_DEV_REQUIRE_DOCKER=1`` (set by ``scripts/test`` as root) turns
that skip into a failure.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.preparation import Preparation

REPO = Path(__file__).resolve().parent.parent.parent
DOCKER_BASE = REPO / "scripts" / "docker-base"
IMAGE = f"agi-bridge:pytest-{os.getpid()}"
# Building from a cached base: ~50 s on 2 busy cores (pip install from the index); a cold
# base adds debootstrap (~3 min). Generous, so that only a hang fails here.
BUILD_TIMEOUT = 900
# One docker CLI call (run, stop, inspect, exec): the engine answers within seconds; docker
# stop waits for the container's own shutdown, bounded by the stop timeout below.
DOCKER_TIMEOUT = 120


def _cannot_run_reason() -> str | None:
    """Why this machine cannot build and run the image (cheap checks), or None."""
    if shutil.which("docker") is None:
        return "NO DOCKER CLIENT on PATH"
    if os.geteuid() != 0:
        return "NOT ROOT: scripts/docker-base needs root (debootstrap, chroot)"
    res = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=DOCKER_TIMEOUT,
    )
    if res.returncode != 0:
        where = os.environ.get("DOCKER_HOST", "the default socket")
        return f"NO DOCKER ENGINE at {where} (scripts/test starts one): {res.stderr.strip()}"
    return None


def _build_image() -> str | None:
    """Load the base image and build this checkout's: why the tests cannot run, or None."""
    reason = _cannot_run_reason()
    if reason is None:
        t0 = time.monotonic()
        base = subprocess.run(
            [sys.executable, str(DOCKER_BASE)],
            capture_output=True,
            text=True,
            check=False,
            timeout=BUILD_TIMEOUT,
        )
        if base.returncode != 0:
            reason = f"BASE IMAGE FAILED (scripts/docker-base):\n{base.stderr[-1500:]}"
        else:
            build = subprocess.run(
                ["docker", "build", "--quiet", "--network", "host",
                 "--build-arg", f"PYTHON_IMAGE={base.stdout.strip()}", "--tag", IMAGE, str(REPO)],
                capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT,
            )  # fmt: skip
            if build.returncode != 0:
                reason = f"DOCKER BUILD FAILED:\n{(build.stdout + build.stderr)[-3000:]}"
            else:
                steps = base.stderr.strip().replace("\n", "; ")
                sys.stderr.write(f"\n{steps}; image built in {time.monotonic() - t0:.1f} s\n")
    return reason


BUILT_IMAGE = Preparation(
    "CONTAINER IMAGE TESTS", require_env="AGI_BRIDGE_DEV_REQUIRE_DOCKER", setup=_build_image
)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Build before the first test (so per-test timeouts do not count it)."""
    if session.config.option.collectonly:
        return
    if any(item.get_closest_marker("container") for item in session.items):
        BUILT_IMAGE.run()


def pytest_sessionfinish() -> None:
    """The image of this run goes; the cached base image stays for the next run."""
    if BUILT_IMAGE.succeeded:
        subprocess.run(
            ["docker", "image", "rm", "--force", IMAGE], capture_output=True, check=False
        )


@pytest.fixture(scope="session")
def image() -> str:
    """The tag of the image built from this checkout's Dockerfile."""
    BUILT_IMAGE.check()  # builds only if pytest_runtestloop did not
    return IMAGE


class Docker:
    """The docker CLI, with every container and volume it creates removed by ``cleanup``."""

    _serial = itertools.count()

    def __init__(self, image: str) -> None:
        self.image = image
        self.containers: list[str] = []
        self.volumes: list[str] = []

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            ["docker", *args], capture_output=True, text=True, check=False, timeout=DOCKER_TIMEOUT
        )
        if check and res.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: status {res.returncode}\n{res.stderr}")
        return res

    def name(self, role: str) -> str:
        return f"agi-bridge-pytest-{os.getpid()}-{next(self._serial)}-{role}"

    def volume(self) -> str:
        volume = self("volume", "create", self.name("spool")).stdout.strip()
        self.volumes.append(volume)
        return volume

    def run(self, role: str, *args: str, env: dict[str, str] | None = None) -> str:
        """Start a detached container of the image on the host's network; its name."""
        name = self.name(role)
        self.containers.append(name)
        options = [f"--env={key}={value}" for key, value in (env or {}).items()]
        self("run", "--detach", "--name", name, "--network", "host", *options, *args)
        return name

    def inspect(self, container: str, template: str) -> str:
        return self("inspect", "--format", template, container).stdout.strip()

    def logs(self, container: str) -> tuple[str, str]:
        """The container's stdout and stderr so far."""
        res = self("logs", container)
        return res.stdout, res.stderr

    def wait_until(self, what: str, ready: Callable[[], bool], within: float) -> None:
        """Poll the engine's view of a container until ``ready`` holds (external state)."""
        deadline = time.monotonic() + within
        while not ready():
            if time.monotonic() > deadline:
                tail = {c: self.logs(c)[1][-1500:] for c in self.containers}
                raise AssertionError(f"not {what} within {within} s; stderr:\n{json.dumps(tail)}")
            time.sleep(0.2)  # polling another process's state, not synchronising our own code

    def cleanup(self) -> None:
        if self.containers:
            self("rm", "--force", "--volumes", *self.containers, check=False)
        if self.volumes:
            self("volume", "rm", "--force", *self.volumes, check=False)


@pytest.fixture
def docker(image: str) -> Iterator[Docker]:
    """The engine, with the image; what a test starts there is removed after it."""
    engine = Docker(image)
    try:
        yield engine
    finally:
        engine.cleanup()
