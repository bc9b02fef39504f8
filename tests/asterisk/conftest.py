"""Fixtures for end-to-end tests against a real Asterisk 22 (scripts/asterisk-sandbox).

- Provisioning (debootstrap + apt, ~1 min when the cache is cold) runs once, before the first
  test, outside any test's timeout (``pytest_runtestloop``), and only when an ``asterisk``
  test was selected.
- ``sandbox`` (session): one Asterisk instance with free AMI / bridge ports, stopped at the end.
- ``ami`` (function): a logged-in panoramisk ``Manager`` plus event helpers (futures fed by the
  event callback: no sleeps).
- ``fake_bridge`` (function): a tiny FastAGI listener on the port the dialplan calls.
- Every ``asterisk`` test fails if Asterisk logged an ERROR (or an unexpected WARNING) while it ran.

Without root / debootstrap, or when provisioning fails, the tests are SKIPPED with a reason
naming what is missing. Set ``AGI_BRIDGE_REQUIRE_ASTERISK=1`` (CI) to turn that skip into a
failure.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from panoramisk import Manager
from panoramisk.message import Message

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SANDBOX_SCRIPT = REPO / "scripts" / "asterisk-sandbox"
EXTRA_EXTENSIONS = HERE / "sandbox-extensions.conf"
EXTRA_FEATURES = HERE / "sandbox-features.conf"
DEFAULT_ROOT = "/var/cache/agi-bridge/asterisk-sid"

# WARNING lines that tests provoke on purpose (an unreachable bridge). Anything else at
# WARNING or ERROR level fails the test during which it was logged.
EXPECTED_WARNINGS = (
    re.compile(r"res_agi\.c: Connecting to '[^']+' failed"),
    re.compile(r"res_agi\.c: Couldn't connect to any host\.\s+FastAGI failed\."),
    re.compile(r"agi-bridge at \S+ failed \(AGISTATUS=FAILURE\)"),  # our Log(WARNING, ...)
)
LOG_PROBLEM = re.compile(r"^\[[^\]]+\] (ERROR|WARNING)\[")

_provision_state: dict[str, str | None] = {"error": None, "done": None}


def _require() -> bool:
    return os.environ.get("AGI_BRIDGE_REQUIRE_ASTERISK", "") not in ("", "0", "no")


def _cannot_run_reason() -> str | None:
    """Why this machine cannot run the sandbox (cheap checks), or None."""
    if sys.platform != "linux":
        return f"the Asterisk sandbox needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "NOT ROOT: the Asterisk sandbox needs root (chroot, mount, debootstrap)"
    root = Path(os.environ.get("AGI_BRIDGE_ASTERISK_ROOT", DEFAULT_ROOT))
    marker = root / "etc" / "agi-bridge-sandbox.provisioned"
    if not marker.exists() and not shutil.which("debootstrap") and not shutil.which("apt-get"):
        return "NO DEBOOTSTRAP (and no apt-get to install it): cannot build the Asterisk root"
    return None


def _provision() -> None:
    if _provision_state["done"]:
        return
    _provision_state["done"] = "yes"
    reason = _cannot_run_reason()
    if reason is None:
        t0 = time.monotonic()
        res = subprocess.run(
            [str(SANDBOX_SCRIPT), "provision"], capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            out = (res.stdout + res.stderr).strip()
            last = out.splitlines()[-1] if out else f"exit status {res.returncode}"
            reason = (
                f"PROVISIONING FAILED (scripts/asterisk-sandbox provision): {last}\n{out[-1500:]}"
            )
        else:
            sys.stderr.write(
                f"\nasterisk sandbox provisioned/reused in {time.monotonic() - t0:.1f} s\n"
            )
    _provision_state["error"] = reason


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Provision before the first test (so per-test timeouts do not count it)."""
    if any(item.get_closest_marker("asterisk") for item in session.items):
        _provision()


def _skip_or_fail(reason: str) -> None:
    msg = f"ASTERISK END-TO-END TESTS NOT RUN: {reason}"
    if _require():
        pytest.fail(msg + " (AGI_BRIDGE_REQUIRE_ASTERISK is set)", pytrace=False)
    pytest.skip(msg)


# ------------------------------------------------------------------------------------ sandbox


@dataclass
class Sandbox:
    """A running Asterisk instance of scripts/asterisk-sandbox."""

    instance: str
    ami_port: int
    ami_user: str
    ami_secret: str
    bridge_port: int
    log_path: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(SANDBOX_SCRIPT), "--instance", self.instance, *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)

    def cli(self, command: str) -> str:
        """Output of an Asterisk CLI command (asterisk -rx)."""
        return self.run("cli", command).stdout

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")

    def log_problems(self, offset: int = 0) -> list[str]:
        """ERROR and unexpected WARNING lines logged since ``offset``."""
        return [
            line
            for line in self.log_since(offset).splitlines()
            if LOG_PROBLEM.match(line) and not any(p.search(line) for p in EXPECTED_WARNINGS)
        ]


def _parse_state(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """Asterisk 22 with the shipped dialplan/, test contexts, free ports; stopped at the end."""
    _provision()  # no-op when pytest_runtestloop did it
    if _provision_state["error"]:
        _skip_or_fail(_provision_state["error"])
    instance = f"pytest-{os.getpid()}"
    cmd = [
        str(SANDBOX_SCRIPT), "--instance", instance, "start", "--no-provision",
        "--owner-pid", str(os.getpid()),
        "--extensions", str(EXTRA_EXTENSIONS), "--features", str(EXTRA_FEATURES),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    if res.returncode != 0:
        _skip_or_fail(f"ASTERISK DID NOT START: {(res.stdout + res.stderr).strip()[-1500:]}")
    state = _parse_state(res.stdout)
    box = Sandbox(
        instance=instance,
        ami_port=int(state["AMI_PORT"]),
        ami_user=state["AMI_USER"],
        ami_secret=state["AMI_SECRET"],
        bridge_port=int(state["BRIDGE_PORT"]),
        log_path=Path(state["LOG"]),
    )
    try:
        yield box
    finally:
        keep = tmp_path_factory.getbasetemp() / "asterisk-full.log"
        if box.log_path.exists():
            shutil.copyfile(box.log_path, keep)
        box.run("stop", "--purge", check=False)


@pytest.fixture(autouse=True)
def _no_asterisk_log_problems(request: pytest.FixtureRequest) -> Iterator[None]:
    """An asterisk test fails when Asterisk logged ERROR / unexpected WARNING lines meanwhile."""
    if request.node.get_closest_marker("asterisk") is None:
        yield
        return
    box: Sandbox = request.getfixturevalue("sandbox")
    offset = box.log_size()
    yield
    problems = box.log_problems(offset)
    assert not problems, "Asterisk logged problems:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------ AMI

Predicate = Callable[[Message], bool]


class Ami:
    """panoramisk Manager plus a history of events and futures that wait for matching ones."""

    _ids = itertools.count(1)

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.events: list[Message] = []
        self._waiters: list[tuple[Predicate, asyncio.Future[Message]]] = []
        manager.register_event("*", self._on_event)

    def _on_event(self, _manager: Manager, event: Message) -> None:
        self.events.append(event)
        for pred, fut in self._waiters:
            if not fut.done() and pred(event):
                fut.set_result(event)

    async def wait_event(self, pred: Predicate, within: float = 10.0, what: str = "") -> Message:
        """The first event (already received or still to come) that matches ``pred``."""
        for event in self.events:
            if pred(event):
                return event
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        entry = (pred, fut)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, within)
        except TimeoutError:
            recent = "\n".join(_summary(e) for e in self.events[-40:])
            raise AssertionError(
                f"no AMI event {what or pred} within {within} s; last events:\n{recent}"
            ) from None
        finally:
            self._waiters.remove(entry)

    async def wait_var(
        self, variable: str, value: str | None = None, *, uniqueid: str | None = None,
        linkedid: str | None = None, within: float = 10.0,
    ) -> Message:  # fmt: skip
        """A VarSet of ``variable`` (to ``value``) on a channel (uniqueid) or call (linkedid)."""

        def pred(e: Message) -> bool:
            return (
                e.event == "VarSet"
                and e.get("Variable") == variable
                and (value is None or e.get("Value") == value)
                and (uniqueid is None or e.get("Uniqueid") == uniqueid)
                and (linkedid is None or e.get("Linkedid") == linkedid)
            )

        what = f"VarSet {variable}={value} uniqueid={uniqueid} linkedid={linkedid}"
        return await self.wait_event(pred, within, what)

    def values(self, variable: str, uniqueid: str) -> list[str]:
        """Every value ``variable`` was set to on the channel, in order."""
        return [
            str(e.get("Value", ""))
            for e in self.events
            if e.event == "VarSet" and e.get("Variable") == variable
            and e.get("Uniqueid") == uniqueid
        ]  # fmt: skip

    async def wait_hangup(self, uniqueid: str, within: float = 15.0) -> Message:
        return await self.wait_event(
            lambda e: e.event == "Hangup" and e.get("Uniqueid") == uniqueid,
            within,
            f"Hangup of {uniqueid}",
        )

    async def originate(
        self, channel: str, *, context: str | None = None, exten: str = "s",
        application: str | None = None, data: str = "", variables: dict[str, str] | None = None,
    ) -> tuple[str, str]:  # fmt: skip
        """Originate asynchronously; returns the uniqueids chosen for the ;1 and ;2 halves.

        For a Local channel, ``;2`` (OtherChannelId) runs the dialplan of the channel name and
        ``;1`` (ChannelId) runs ``context``/``exten`` or ``application``. Every channel of
        the call has Linkedid == the ;1 uniqueid.
        """
        n = next(self._ids)
        tag = f"t{os.getpid()}-{n}-{time.monotonic_ns() % 10**9}"
        one, two = f"{tag}-1", f"{tag}-2"
        action: dict[str, Any] = {
            "Action": "Originate",
            "Channel": channel,
            "Async": "true",
            "Timeout": "15000",
            "ChannelId": one,
            "OtherChannelId": two,
        }
        if application is not None:
            action.update(Application=application, Data=data)
        else:
            assert context is not None
            action.update(Context=context, Exten=exten, Priority="1")
        if variables:
            action["Variable"] = [f"{k}={v}" for k, v in variables.items()]
        resp = await asyncio.wait_for(self.manager.send_action(action, as_list=False), 10)
        assert resp.get("Response") == "Success", f"Originate refused: {dict(resp)}"
        return one, two


def _summary(e: Message) -> str:
    keys = ("Channel", "Uniqueid", "Variable", "Value", "Cause", "Application", "AppData")
    return f"{e.event}: " + " ".join(f"{k}={e[k]}" for k in keys if k in e)


@pytest.fixture
async def ami(sandbox: Sandbox) -> AsyncIterator[Ami]:
    """A logged-in AMI connection receiving all events."""
    loop = asyncio.get_running_loop()
    logged_in: asyncio.Future[bool] = loop.create_future()

    def on_login(_m: Manager) -> None:
        if not logged_in.done():
            logged_in.set_result(True)

    manager = Manager(
        loop=loop, host="127.0.0.1", port=sandbox.ami_port, username=sandbox.ami_user,
        secret=sandbox.ami_secret, ping_delay=3600, reconnect_timeout=3600, on_login=on_login,
    )  # fmt: skip
    # No reconnection attempts once the test closes the connection.
    manager.connection_lost = lambda _exc: None
    client = Ami(manager)
    await asyncio.wait_for(manager.connect(), 10)
    await asyncio.wait_for(logged_in, 10)
    try:
        yield client
    finally:
        manager.close()


# ------------------------------------------------------------------------------ fake bridge


@dataclass
class AgiSession:
    """One FastAGI session as the fake bridge saw it."""

    env: dict[str, str]
    replies: list[str] = field(default_factory=list)  # Asterisk's answers to our commands
    hangup_lines: int = 0  # "HANGUP" lines seen during and after the session
    after_close: list[str] = field(default_factory=list)  # lines after we half-closed

    @property
    def args(self) -> list[str]:
        n = 1
        out = []
        while f"agi_arg_{n}" in self.env:
            out.append(self.env[f"agi_arg_{n}"])
            n += 1
        return out


class FakeBridge:
    """FastAGI listener standing in for agi-bridge: answers NOOJEE_STATUS per route.

    Routes missing from ``status`` get no command at all (the session just closes).
    """

    def __init__(self) -> None:
        self.sessions: list[AgiSession] = []
        self.status = {"recording/stop": "STOPPED", "recording/start": "STARTED"}
        self._changed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        env: dict[str, str] = {}
        session = AgiSession(env)
        try:
            while True:
                line = (await asyncio.wait_for(reader.readline(), 5)).decode(errors="replace")
                line = line.rstrip("\n")
                if not line:
                    break
                key, _, value = line.partition(": ")
                env[key] = value
            script = env.get("agi_network_script", "").split("?", 1)[0]
            status = self.status.get(script)
            commands = (
                [f"SET VARIABLE NOOJEE_STATUS {status}",
                 'SET VARIABLE NOOJEE_MESSAGE "fake bridge says hi"']
                if status else []  # no status for this route: close without a word
            )  # fmt: skip
            for cmd in commands:
                writer.write(cmd.encode() + b"\n")
                await writer.drain()
                while True:
                    reply = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
                    if reply == "HANGUP":
                        session.hangup_lines += 1
                        continue
                    session.replies.append(reply)
                    break
            writer.write_eof()
            # what Asterisk sends once we are done (HANGUP unless AGISIGHUP=no), until it closes
            while line := (await asyncio.wait_for(reader.readline(), 5)).decode().strip():
                session.after_close.append(line)
                session.hangup_lines += line == "HANGUP"
        finally:
            writer.close()
            self.sessions.append(session)
            self._changed.set()

    async def wait_sessions(self, n: int, within: float = 10.0) -> list[AgiSession]:
        """Wait until at least ``n`` sessions are complete."""

        async def until() -> None:
            while len(self.sessions) < n:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), within)
        except TimeoutError:
            raise AssertionError(
                f"fake bridge: {len(self.sessions)} sessions after {within} s, expected {n}"
            ) from None
        return self.sessions


@pytest.fixture
async def fake_bridge(sandbox: Sandbox) -> AsyncIterator[FakeBridge]:
    """A FastAGI listener on the port the sandbox's dialplan calls (${AGI_BRIDGE})."""
    bridge = FakeBridge()
    server = await asyncio.start_server(
        bridge.handle, "127.0.0.1", sandbox.bridge_port, reuse_address=True
    )
    try:
        yield bridge
    finally:
        server.close()
        await server.wait_closed()
