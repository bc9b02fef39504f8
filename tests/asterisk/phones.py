"""Real SIP phones for the real-Asterisk tests: each one a ``sip_phone.py`` process, driven here.

``phones`` (fixture) starts them: ``await phones("410")`` registers extension 410's phone to the
sandbox's PJSIP transport and returns a :class:`Phone` once Asterisk accepted the registration.
Every wait waits for the phone's own event (no sleeps); every phone is ended with the test.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest_asyncio

if TYPE_CHECKING:  # conftest imports this module for its fixture
    from .conftest import Sandbox

PHONE_SCRIPT = Path(__file__).resolve().parent / "sip_phone.py"
# A phone that registers takes ~0.1 s on loopback; 20 s covers a machine busy with other tests.
REGISTER_WITHIN = 20.0
QUIT_WITHIN = 10.0  # the phone sends its BYEs and un-REGISTER, then exits

Event = dict[str, Any]


class Phone:
    """One SIP phone process: commands in, events out (see sip_phone.py)."""

    def __init__(self, user: str, process: asyncio.subprocess.Process, server: str) -> None:
        self.user = user
        self.server = server
        self.process = process
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name=f"phone-{user}")

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.events.append(json.loads(line))
            self._changed.set()
        self._changed.set()

    def uri(self, exten: str) -> str:
        return f"sip:{exten}@{self.server}"

    async def send(self, op: str, **args: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        await self.process.stdin.drain()

    async def wait(self, within: float = 15.0, **match: object) -> Event:
        """The first event (seen or to come) whose fields have the ``match`` values."""

        def pred(e: Event) -> bool:
            return all(e.get(k) == v for k, v in match.items())

        async def until() -> Event:
            seen = 0
            while True:
                for e in self.events[seen:]:
                    if e.get("event") == "error":
                        raise AssertionError(f"phone {self.user}: {e}")
                    if pred(e):
                        return e
                seen = len(self.events)
                if self._reader.done():
                    raise AssertionError(f"phone {self.user} exited")
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(until(), within)
        except TimeoutError:
            raise AssertionError(
                f"phone {self.user}: no event {match} within {within} s; events: {self.events}"
            ) from None

    async def call(self, exten: str, call: str = "c1") -> None:
        """Dial ``exten`` at Asterisk and wait until the call is answered."""
        await self.send("call", call=call, to=self.uri(exten))
        await self.wait(event="state", call=call, state="CONFIRMED")

    async def ringing(self, call: str = "in1") -> Event:
        """An incoming call reached this phone (answered at once unless started with ring)."""
        return await self.wait(event="incoming", call=call)

    async def answered(self, call: str = "in1") -> Event:
        return await self.wait(event="state", call=call, state="CONFIRMED")

    async def ended(self, call: str) -> Event:
        return await self.wait(event="state", call=call, state="DISCONNECTED")

    async def quit(self) -> None:
        if self.process.returncode is None:
            await self.send("quit")
            try:
                await asyncio.wait_for(self.process.wait(), QUIT_WITHIN)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self._reader


StartPhone = Callable[..., Awaitable[Phone]]


@pytest_asyncio.fixture(loop_scope="session")
async def phones(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[StartPhone]:
    """Starts SIP phones (``await phones("410", ring=False)``); all of them end with the test."""
    if importlib.util.find_spec("pjsua2") is None:
        from .conftest import SANDBOX_ROOT  # here: conftest imports this module

        SANDBOX_ROOT.skip_or_fail(
            "NO PJSUA2 for the SIP phones: pip install -e '.[test]' on Python 3.11 "
            "(pjsua2-python ships wheels for it)"
        )
    started: list[Phone] = []
    server = f"127.0.0.1:{sandbox.sip_port}"

    async def start(user: str, ring: bool = False) -> Phone:
        args = ["--user", user, "--server", server, "--log", str(tmp_path / f"pjsip-{user}.log")]
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(PHONE_SCRIPT), *args, *(["--ring"] if ring else []),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        phone = Phone(user, process, server)
        started.append(phone)
        registered = await phone.wait(REGISTER_WITHIN, event="registered")
        assert registered["code"] == 200, f"phone {user} not registered: {registered}"
        return phone

    try:
        yield start
    finally:
        for phone in started:
            await phone.quit()
