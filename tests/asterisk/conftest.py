"""Fixtures for end-to-end tests against a real Asterisk 22 (scripts/asterisk-sandbox).

- Provisioning (debootstrap + apt, ~1 min when the cache is cold) runs once, before the first
  test, outside any test's timeout (``pytest_runtestloop``), and only when an ``asterisk``
  test was selected.
- ``sandbox`` (session): one Asterisk instance with free AMI / bridge ports, stopped at the end.
  A module may override it with an instance of its own (``running_sandbox``): test_freepbx.py
  runs the imitation of FreePBX that way, and every fixture below then uses that instance.
- ``ami`` (function): a logged-in panoramisk ``Manager`` plus event helpers (futures fed by the
  event callback: no sleeps).
- ``fake_bridge`` (function): a tiny FastAGI listener on the port the dialplan calls, for tests
  about the dialplan's own handling of odd bridge answers and of the AGI wire.
- ``simulator`` (session): the NoojeeContact simulator over HTTPS (trustme CA), in the test
  process's event loop; ``bridge`` (function, backed by one ``agi-bridge serve`` subprocess per
  MODULE on the port the dialplan calls): the real bridge in front of it. Between tests the
  simulator is reset and the bridge's spool must have drained (nothing leaks into the next test).
- All async tests and fixtures here share ONE event loop (session scope), so that the simulator
  and the bridge's log reader outlive a single test.
- Every ``asterisk`` test fails if Asterisk logged an ERROR (or an unexpected WARNING) while it ran.

Without root / debootstrap, or when provisioning fails, the tests are SKIPPED with a reason
naming what is missing. Set ``AGI_BRIDGE_DEV_REQUIRE_ASTERISK=1`` (CI) to turn that skip into a
failure.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from panoramisk import Manager
from panoramisk.message import Message

from agi_bridge.testing.simulator import (
    FailureMode,
    NoojeeSimulator,
    ReceivedRequest,
    SimulatorConfig,
)
from tests.preparation import Preparation

from .phones import phones  # noqa: F401 (the fixture: real SIP phones)
from .readme_snippets import write_all as write_readme_snippets

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SANDBOX_SCRIPT = REPO / "scripts" / "asterisk-sandbox"
EXTRA_EXTENSIONS = HERE / "sandbox-extensions.conf"
EXTRA_FEATURES = HERE / "sandbox-features.conf"
EXTRA_QUEUES = HERE / "sandbox-queues.conf"
EXTRA_AGENTS = HERE / "sandbox-agents.conf"
EXTRA_PJSIP = HERE / "sandbox-pjsip.conf"
DEFAULT_ROOT = "/var/cache/agi-bridge/asterisk-sid"

# WARNING lines that tests provoke on purpose (an unreachable bridge). Anything else at
# WARNING or ERROR level fails the test during which it was logged.
EXPECTED_WARNINGS = (
    re.compile(r"res_agi\.c: Connecting to '[^']+' failed"),
    re.compile(r"res_agi\.c: Couldn't connect to any host\.\s+FastAGI failed\."),
    re.compile(r"agi-bridge at \S+ failed \(AGISTATUS=FAILURE\)"),  # our Log(WARNING, ...)
)
LOG_PROBLEM = re.compile(r"^\[[^\]]+\] (ERROR|WARNING)\[")


def _cannot_run_reason() -> str | None:
    """Why this machine cannot run the sandbox (cheap checks), or None."""
    if sys.platform != "linux":
        return f"the Asterisk sandbox needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "NOT ROOT: the Asterisk sandbox needs root (chroot, mount, debootstrap)"
    root = Path(os.environ.get("AGI_BRIDGE_DEV_ASTERISK_ROOT", DEFAULT_ROOT))
    marker = root / "etc" / "agi-bridge-sandbox.provisioned"
    if not marker.exists() and not shutil.which("debootstrap") and not shutil.which("apt-get"):
        return "NO DEBOOTSTRAP (and no apt-get to install it): cannot build the Asterisk root"
    return None


def _provision() -> str | None:
    """Provision the sandbox root (or reuse it): why it cannot run, or None."""
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
            outcome = _parse_state(res.stdout)["PROVISION"]  # reused or provisioned
            sys.stderr.write(f"\nasterisk sandbox {outcome} in {time.monotonic() - t0:.1f} s\n")
    return reason


SANDBOX_ROOT = Preparation(
    "ASTERISK END-TO-END TESTS", require_env="AGI_BRIDGE_DEV_REQUIRE_ASTERISK", setup=_provision
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every async test of this folder runs in the session's event loop (see the docstring)."""
    session_loop = pytest.mark.asyncio(loop_scope="session")
    for item in items:
        if item.path.is_relative_to(HERE) and pytest_asyncio.is_async_test(item):
            item.add_marker(session_loop, append=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Provision before the first test (so per-test timeouts do not count it)."""
    if any(item.get_closest_marker("asterisk") for item in session.items):
        SANDBOX_ROOT.run()


# ------------------------------------------------------------------------------------ sandbox


@dataclass
class Sandbox:
    """A running Asterisk instance of scripts/asterisk-sandbox."""

    instance: str
    ami_port: int
    ami_user: str
    ami_secret: str
    bridge_port: int
    sip_port: int
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


@contextmanager
def running_sandbox(
    instance: str, args: list[str], tmp_path_factory: pytest.TempPathFactory, log_name: str
) -> Iterator[Sandbox]:
    """An Asterisk instance started with ``args`` (see scripts/asterisk-sandbox start), stopped
    and purged at the end; its log is kept as ``log_name`` in pytest's base temp directory."""
    SANDBOX_ROOT.check()  # provisions only if pytest_runtestloop did not
    cmd = [
        str(SANDBOX_SCRIPT), "--instance", instance, "start", "--no-provision",
        "--owner-pid", str(os.getpid()), *args,
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    if res.returncode != 0:
        SANDBOX_ROOT.skip_or_fail(
            f"ASTERISK DID NOT START: {(res.stdout + res.stderr).strip()[-1500:]}"
        )
    state = _parse_state(res.stdout)
    box = Sandbox(
        instance=instance,
        ami_port=int(state["AMI_PORT"]),
        ami_user=state["AMI_USER"],
        ami_secret=state["AMI_SECRET"],
        bridge_port=int(state["BRIDGE_PORT"]),
        sip_port=int(state["SIP_PORT"]),
        log_path=Path(state["LOG"]),
    )
    try:
        yield box
    finally:
        keep = tmp_path_factory.getbasetemp() / log_name
        if box.log_path.exists():
            shutil.copyfile(box.log_path, keep)
        box.run("stop", "--purge", check=False)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """Asterisk 22 with the shipped dialplan/, test contexts, free ports; stopped at the end."""
    readme = write_readme_snippets(tmp_path_factory.mktemp("readme") / "readme-snippets.conf")
    args = [
        "--extensions", str(EXTRA_EXTENSIONS), "--features", str(EXTRA_FEATURES),
        "--queues", str(EXTRA_QUEUES), "--agents", str(EXTRA_AGENTS), "--pjsip", str(EXTRA_PJSIP),
        "--extensions", str(readme),
    ]  # fmt: skip
    instance = f"pytest-{os.getpid()}"
    with running_sandbox(instance, args, tmp_path_factory, "asterisk-full.log") as box:
        yield box


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
        self.arrived: dict[int, float] = {}  # id(event) -> time.monotonic() of its arrival
        self._waiters: list[tuple[Predicate, asyncio.Future[Message]]] = []
        manager.register_event("*", self._on_event)

    def _on_event(self, _manager: Manager, event: Message) -> None:
        self.arrived[id(event)] = time.monotonic()
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

    def ran(self, uniqueid: str, application: str) -> list[str]:
        """AppData of every ``application`` the channel ran so far, in order (Newexten)."""
        return [
            str(e.get("AppData", ""))
            for e in self.events
            if e.event == "Newexten" and e.get("Uniqueid") == uniqueid
            and e.get("Application") == application
        ]  # fmt: skip

    async def wait_app(self, uniqueid: str, application: str, within: float = 10.0) -> Message:
        """The first Newexten of ``application`` on the channel (already seen or to come)."""
        return await self.wait_event(
            lambda e: e.event == "Newexten" and e.get("Uniqueid") == uniqueid
            and e.get("Application") == application,
            within,
            f"{application} on {uniqueid}",
        )  # fmt: skip

    async def wait_hangup(self, uniqueid: str, within: float = 15.0) -> Message:
        return await self.wait_event(
            lambda e: e.event == "Hangup" and e.get("Uniqueid") == uniqueid,
            within,
            f"Hangup of {uniqueid}",
        )

    def channel_name(self, uniqueid: str) -> str:
        """The channel name of ``uniqueid`` as its Newchannel event gave it."""
        for e in self.events:
            if e.event == "Newchannel" and e.get("Uniqueid") == uniqueid:
                return str(e["Channel"])
        raise AssertionError(f"no Newchannel event for {uniqueid}")

    async def action(self, name: str, **fields: str) -> Message:
        """Send the AMI action ``name``; its answer, which must be Success."""
        resp = await asyncio.wait_for(
            self.manager.send_action({"Action": name, **fields}, as_list=False), 10
        )
        assert resp.get("Response") == "Success", f"{name} refused: {dict(resp)}"
        return resp  # type: ignore[no-any-return]

    async def hangup(self, uniqueid: str) -> None:
        """Hang the channel up, as a phone hanging up would (AMI Hangup action)."""
        action = {"Action": "Hangup", "Channel": self.channel_name(uniqueid), "Cause": "16"}
        resp = await asyncio.wait_for(self.manager.send_action(action, as_list=False), 10)
        assert resp.get("Response") == "Success", f"Hangup refused: {dict(resp)}"

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
            # AMI splits a Variable header on commas unless they are escaped
            action["Variable"] = [f"{k}={v}".replace(",", "\\,") for k, v in variables.items()]
        resp = await asyncio.wait_for(self.manager.send_action(action, as_list=False), 10)
        assert resp.get("Response") == "Success", f"Originate refused: {dict(resp)}"
        return one, two


def _summary(e: Message) -> str:
    keys = ("Channel", "Uniqueid", "Variable", "Value", "Cause", "Application", "AppData")
    return f"{e.event}: " + " ".join(f"{k}={e[k]}" for k in keys if k in e)


@pytest_asyncio.fixture(loop_scope="session")
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


@pytest_asyncio.fixture(loop_scope="session")
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


# ------------------------------------------------------------------------- the real bridge

API_KEY = "f863246a-973e-11e6-8784-08002718f5b5"
# The bridge under test holds a sync request this long at most (AGI_BRIDGE_STOP_BUDGET and
# AGI_BRIDGE_START_BUDGET); the simulator answers in milliseconds unless a test slows it down.
BUDGET = 0.5
# AGI_BRIDGE_EXTENSION_MAX_AGE: shorter than the default 10 s so that a test sees a request by
# extension expire, long enough that one delivered after a short outage never does.
EXTENSION_MAX_AGE = 4.0
# AGI_BRIDGE_AGENTS of the bridge under test: the agent of extension 410 when the call names none.
AGENTS = {"410": "Wilma"}
STOP_PATH = "/servicemanager/rest/CallManagementAPI/stop"
START_PATH = "/servicemanager/rest/CallManagementAPI/start"

LogLine = dict[str, Any]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BridgeProcess:
    """``python -m agi_bridge serve`` as a subprocess; its JSON log lines, read as they come."""

    def __init__(self, process: asyncio.subprocess.Process, metrics_port: int) -> None:
        self.process = process
        self.metrics_port = metrics_port
        self.lines: list[LogLine] = []
        self.raw: list[str] = []
        self.mark = 0  # index into ``lines`` where the current test began
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="bridge-log-reader")

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while raw := await self.process.stderr.readline():
            text = raw.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            try:
                line = json.loads(text)
            except ValueError:
                line = {"event": "<not json>", "text": text}
            self.lines.append(line if isinstance(line, dict) else {"event": repr(line)})
            self._changed.set()
        self._changed.set()

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and not self._reader.done()

    def since_mark(self) -> list[LogLine]:
        return self.lines[self.mark :]

    async def wait_log(
        self, pred: Callable[[LogLine], bool], within: float = 10.0, what: str = ""
    ) -> LogLine:
        """The first log line of the current test that matches ``pred``."""

        async def until() -> LogLine:
            seen = self.mark
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                if self._reader.done():
                    raise AssertionError("the bridge exited")
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(until(), within)
        except TimeoutError:
            tail = "\n".join(self.raw[-30:])
            raise AssertionError(
                f"bridge logged no {what or pred} within {within} s; last lines:\n{tail}"
            ) from None

    async def finished(self, uniqueid: str, within: float = 10.0) -> LogLine:
        """The ``agi.session.finished`` line of the session of channel ``uniqueid``."""
        return await self.wait_log(
            lambda line: (
                line.get("event") == "agi.session.finished" and line.get("uniqueid") == uniqueid
            ),
            within,
            f"agi.session.finished for {uniqueid}",
        )

    async def wait_sessions(self, uniqueid: str, n: int, within: float = 10.0) -> list[LogLine]:
        """The first ``n`` ``agi.session.finished`` lines of channel ``uniqueid``."""
        count = 0

        def pred(line: LogLine) -> bool:
            nonlocal count
            if line.get("event") == "agi.session.finished" and line.get("uniqueid") == uniqueid:
                count += 1
            return count >= n

        await self.wait_log(pred, within, f"{n} sessions of {uniqueid}")
        return self.sessions(uniqueid)[:n]

    def sessions(self, uniqueid: str) -> list[LogLine]:
        """Every ``agi.session.finished`` line of channel ``uniqueid`` in the current test."""
        return [
            line
            for line in self.since_mark()
            if line.get("event") == "agi.session.finished" and line.get("uniqueid") == uniqueid
        ]

    async def metric(self, name: str) -> float:
        async with httpx.AsyncClient(timeout=5) as client:
            resp = await client.get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        for text in resp.text.splitlines():
            if text.startswith(name + " "):
                return float(text.split()[1])
        raise AssertionError(f"no metric {name} in:\n{resp.text}")

    async def wait_drained(self, within: float = 15.0) -> None:
        """Until the spool holds nothing pending (what a test queued is delivered or dead)."""
        deadline = time.monotonic() + within
        while (pending := await self.metric("agi_bridge_spool_pending")) > 0:
            if time.monotonic() > deadline:
                tail = "\n".join(self.raw[-20:])
                raise AssertionError(f"{pending:g} requests still queued after {within} s:\n{tail}")
            await asyncio.sleep(0.05)

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        await self._reader
        return code


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def simulator(server_ssl_context: ssl.SSLContext) -> AsyncIterator[NoojeeSimulator]:
    """The NoojeeContact simulator over HTTPS on a free port, in the tests' event loop."""
    sim = NoojeeSimulator(SimulatorConfig(api_key=API_KEY))
    await sim.start("127.0.0.1", 0, server_ssl_context)
    try:
        yield sim
    finally:
        await sim.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def bridge_process(
    sandbox: Sandbox,
    simulator: NoojeeSimulator,
    ca_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[BridgeProcess]:
    """One real agi-bridge per module, listening where the sandbox's dialplan calls it."""
    data_dir = tmp_path_factory.mktemp("bridge-data")
    metrics_port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGI_BRIDGE_")}
    env.update(
        AGI_BRIDGE_LISTEN=f"127.0.0.1:{sandbox.bridge_port}",
        AGI_BRIDGE_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        AGI_BRIDGE_NOOJEE_URL=simulator.base_url,
        AGI_BRIDGE_NOOJEE_API_KEY=API_KEY,
        AGI_BRIDGE_NOOJEE_CA_FILE=str(ca_file),
        AGI_BRIDGE_DATA_DIR=str(data_dir),
        AGI_BRIDGE_LOG_FORMAT="json",
        AGI_BRIDGE_STOP_BUDGET=str(BUDGET),
        AGI_BRIDGE_START_BUDGET=str(BUDGET),
        AGI_BRIDGE_RETRY_INITIAL_DELAY="0.05",
        AGI_BRIDGE_RETRY_MAX_DELAY="0.5",
        AGI_BRIDGE_SPOOL_FSYNC="false",
        AGI_BRIDGE_SHUTDOWN_GRACE="5",
        AGI_BRIDGE_AGENTS=json.dumps(AGENTS),
        AGI_BRIDGE_EXTENSION_MAX_AGE=str(EXTENSION_MAX_AGE),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agi_bridge", "serve",
        env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    bridge = BridgeProcess(process, metrics_port)
    try:
        listening = await bridge.wait_log(
            lambda line: line.get("event") == "agi.server.listening", 20, "agi.server.listening"
        )
        assert listening["listen"] == f"127.0.0.1:{sandbox.bridge_port}", listening
        yield bridge
    finally:
        code = await bridge.stop()
        keep = tmp_path_factory.getbasetemp() / "agi-bridge.log"
        with keep.open("a") as fh:
            fh.write("\n".join(bridge.raw) + "\n")
        assert code == 0, f"agi-bridge exited with status {code}; log in {keep}"


@pytest_asyncio.fixture(loop_scope="session")
async def bridge(
    bridge_process: BridgeProcess, simulator: NoojeeSimulator
) -> AsyncIterator[BridgeProcess]:
    """The module's real bridge, checked between tests: alive, drained, no tracebacks logged."""
    assert bridge_process.alive, "the bridge died in an earlier test"
    simulator.reset()
    bridge_process.mark = len(bridge_process.lines)
    yield bridge_process
    simulator.set_failure(FailureMode.NONE)
    simulator.latency = 0.0
    await bridge_process.wait_drained()
    assert bridge_process.alive, "the bridge process died:\n" + "\n".join(bridge_process.raw[-30:])
    crashes = [line for line in bridge_process.since_mark() if "exception" in line]
    assert not crashes, f"the bridge logged tracebacks: {crashes}"
    simulator.reset()


def requests_for(
    simulator: NoojeeSimulator, path: str, target: str | None = None
) -> list[ReceivedRequest]:
    """What the simulator received on ``path`` (for extenOrUniqueId ``target``)."""
    return [
        r
        for r in simulator.received
        if r.path == path and (target is None or r.params.get("extenOrUniqueId") == target)
    ]
