"""The asyncio FastAGI server: a thin driver around :mod:`agi_bridge.protocol`.

One :class:`asyncio.Protocol` and one task per connection: the protocol feeds the bytes to the
core as they arrive and wakes the task only when it waits for an event (no stream objects in
between; they cost about a third of a minimal server's CPU per session, bench/README.md).
Each session reads the environment within a deadline, routes on the
script path through an explicit table, asks :class:`~agi_bridge.delivery.Delivery` to stop or
start the recording within the route's budget, and always ends the same way: it sets
``NOOJEE_STATUS`` and ``NOOJEE_MESSAGE`` on the channel, then closes, which lets the dialplan go
on with ``AGISTATUS=SUCCESS``. A session that cannot get that far (garbage, a timeout, a client
we do not allow) is closed and logged; nothing it does reaches other sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import ipaddress
import socket
import sys
import termios
import time
from collections.abc import Awaitable, Sequence
from typing import Final

from agi_bridge.calls import Rejected, build_request, parse_parameters
from agi_bridge.delivery import Delivery
from agi_bridge.logs import bind_session, get_logger
from agi_bridge.metrics import Metrics, Refusal
from agi_bridge.protocol import (
    MAX_LINE_BYTES,
    NEED_DATA,
    AgiConnection,
    EndOfStream,
    Environment,
    Hangup,
    ProtocolError,
    Reply,
)
from agi_bridge.settings import IPNetwork, Settings
from agi_bridge.tasks import finish_within
from agi_bridge.vocabulary import (
    ACTIONS,
    MESSAGE_MAX_CHARS,
    ROUTES,
    Action,
    HandOff,
    Mode,
    Outcome,
    Status,
)

log = get_logger("agi_bridge.server")

# An environment block is ~700 bytes and replies are one short line. A peer that sends more
# than this while the session is busy elsewhere (waiting for NoojeeContact) is not read from
# until the session wants the next event: the buffer stays bounded whatever the peer does.
MAX_UNREAD_BYTES: Final = 65536
# Kernel accept queue: a hangup burst of a large call centre arrives within milliseconds.
BACKLOG: Final = 1024
# Sent instead of a command when we refuse a session: Asterisk ends the AGI with
# AGISTATUS=FAILURE, which the sample dialplan handles like an unreachable bridge.
FAILURE_LINE: Final = b"failure\n"
# Peer addresses whose allow_clients verdict is remembered: Asterisk connects from one or a few
# addresses; past this many (a scan from a network that can reach us) the memory starts over.
MAX_REMEMBERED_PEERS: Final = 1024


class _Closed(Exception):
    """Asterisk closed the connection before the session was over."""


class _Session(asyncio.Protocol):
    """One connection: the protocol state machine fed by the transport, and the session task's
    way to wait for its events and send its commands."""

    def __init__(self, server: AgiServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.settings = server.settings
        # The server's loop, held: on Python 3.11 asyncio.get_running_loop() costs a getpid()
        # system call, three of them a session here.
        self.loop = loop
        # An overlong argument (a 10 kB agent) is dropped, not fatal: the call hears REJECTED.
        self.connection = AgiConnection(cut_overlong_lines=True)
        self.transport: asyncio.Transport | None = None
        self.hung_up = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: OSError | None = None  # the connection failed (reset): raised on next read
        self._paused = False
        self._late = False  # the current phase's deadline has passed (see _deadline)
        # The task that answers the session: its own, once accepted; the one its answer is
        # handed off to when its sync attempt outlives the budget (AgiServer._hand_off).
        self.task: asyncio.Task[None] | None = None
        self.silent = True  # nothing received yet
        self.evicted = False  # closed while silent, to make room for a newer connection

    # --- the transport's side (called by the event loop) ----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        self.server.accepted(self)

    def data_received(self, data: bytes) -> None:
        self.silent = False
        if self.connection.receive_data(data) > MAX_UNREAD_BYTES and not self._paused:
            self._paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]  # set by connection_made
        self._wake()

    def eof_received(self) -> bool:
        self.connection.receive_data(b"")
        self._wake()
        return True  # a half-close: our commands may still be written

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError):
            self._error = exc
        else:
            self.connection.receive_data(b"")  # a no-op after eof_received
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the session task's side ----------------------------------------------------------

    async def _event(self) -> Environment | Reply | EndOfStream:
        """The next event; in between, wait until the transport has given the core more bytes
        (or the end): TimeoutError once the deadline of the session's current phase has
        passed."""
        while True:
            event = self.connection.next_event()
            if event is NEED_DATA:
                if self._error is not None:
                    raise self._error
                if self._late:
                    raise TimeoutError
                if self._paused:
                    self._paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                self._waiter = self.loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            elif isinstance(event, Hangup):
                self.hung_up = True  # the call goes on in a dead channel: variables still work
            else:
                return event  # type: ignore[return-value]  # NeedData handled above

    def _deadline(self, seconds: float) -> asyncio.TimerHandle:
        """Bound what the session reads next to ``seconds``: a timer that wakes the read,
        which then raises TimeoutError. The session awaits nothing but its reads here, so a
        plain timer does what asyncio.timeout would, without a Timeout object and the task's
        cancellation per phase. Cancel it when the phase is over."""
        self._late = False
        return self.loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        self._late = True
        self._wake()

    async def environment(self) -> Environment:
        # Asterisk sends the environment as it connects: under load it is usually all read by
        # the time this task runs, and then no timer is started (one less per session).
        event = self.connection.next_event()
        if event is NEED_DATA:
            deadline = self._deadline(self.settings.environment_timeout)
            try:
                event = await self._event()
            finally:
                deadline.cancel()
        assert isinstance(event, Environment)  # the protocol core yields it first, or raises
        return event

    async def set_variables(self, outcome: Outcome) -> None:
        """NOOJEE_STATUS and NOOJEE_MESSAGE, in one command (one reply to wait for, within
        ``command_timeout``: see AgiConnection.set_variables)."""
        message = outcome.message
        if len(message) > MESSAGE_MAX_CHARS or not message.isprintable():
            message = _message(message)  # rare: most messages are NoojeeContact's or our own
        line = self.connection.set_variables(
            ("NOOJEE_STATUS", outcome.status), ("NOOJEE_MESSAGE", message)
        )
        deadline = self._deadline(self.settings.command_timeout)
        try:
            self.write(line)
            reply = await self._event()
        finally:
            deadline.cancel()
        if isinstance(reply, EndOfStream):
            raise _Closed

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise _Closed
        transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # buffered bytes are still sent, then the socket closes

    def sent_nothing(self) -> bool:
        """Nothing received, and nothing waiting in the kernel either: under a burst the loop
        accepts many connections before it reads any, so a real call's environment may have
        arrived without our having read it yet."""
        if not self.silent or self.transport is None:
            return False
        sock = self.transport.get_extra_info("socket")
        try:
            waiting = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, AttributeError):
            return False  # cannot tell: not a victim
        return int.from_bytes(waiting, sys.byteorder) == 0


class AgiServer:
    """The FastAGI listener and its sessions; each session hands its request to ``delivery``."""

    def __init__(self, settings: Settings, *, delivery: Delivery, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.delivery = delivery
        self._networks = settings.allow_clients
        # Each peer address's verdict, decided once: parsing the address cost every session.
        self._verdicts: dict[str, bool] = {}
        self._call_defaults = settings.call_defaults
        # Each action's default mode and sync budget, as the action table names them.
        self._policies: dict[Action, tuple[Mode, float]] = {
            action: (getattr(settings, rules.mode_setting), getattr(settings, rules.budget_setting))
            for action, rules in ACTIONS.items()
        }
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._none_left: asyncio.Future[None] | None = None  # stop() waits for it
        # Sessions still waiting for their environment, oldest first (dicts keep insertion
        # order): when every slot is taken, the oldest silent one makes room for a newcomer.
        self._idle: dict[_Session, asyncio.Task[None]] = {}
        # The logger every session's line goes through, bound once (logging is configured
        # before the server is made): the module's lazy proxy binds again at every use, two
        # Python calls a session.
        self._session_log = log.bind()
        # Counted when scraped, not kept up to date by every session (two locked updates).
        metrics.connections_open.set_function(lambda: len(self._sessions))

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def sockets(self) -> list[socket.socket]:
        return [] if self._server is None else list(self._server.sockets)

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    async def bind(self) -> None:
        """Take the listening socket without accepting yet: a port in use fails the start
        before the spool is touched."""
        if self._server is None:
            address = self.settings.listen_address
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                functools.partial(_Session, self, loop),
                address.host,
                address.port,
                backlog=BACKLOG,
                reuse_address=True,
                start_serving=False,
            )

    async def start(self) -> None:
        """Accept connections (binding first if :meth:`bind` was not called)."""
        await self.bind()
        assert self._server is not None
        await self._server.start_serving()
        address = self.settings.listen_address
        log.info(
            "agi.server.listening",
            listen=f"{address.host}:{self.port}",
            allow_clients=[str(n) for n in self._networks] or "any",
        )

    async def stop(self, grace: float) -> None:
        """Stop accepting, give sessions ``grace`` seconds, then cancel what is left."""
        if self._server is not None:
            self._server.close()
        if self._sessions:
            # Sessions come and go meanwhile (an answer handed off is a new task), so the wait
            # is for the set to be empty, not for the tasks in it now.
            self._none_left = asyncio.get_running_loop().create_future()
            await asyncio.wait((self._none_left,), timeout=grace)
        # Every task leaves the set in its own finally, which even a task cancelled here runs:
        # finish_within's wait yields first, so a task handed an answer meanwhile has started.
        while self._sessions:
            await finish_within(tuple(self._sessions), 0)
        if self._server is not None:
            await self._server.wait_closed()

    def _allowed(self, host: str) -> bool:
        if not self._networks:
            return True
        allowed = self._verdicts.get(host)
        if allowed is None:
            if len(self._verdicts) >= MAX_REMEMBERED_PEERS:
                self._verdicts.clear()
            allowed = self._verdicts[host] = _in_networks(host, self._networks)
        return allowed

    def accepted(self, session: _Session) -> None:
        """A connection came in: its session runs in a task of its own."""
        session.task = session.loop.create_task(self._accept(session))

    async def _accept(self, session: _Session) -> None:
        task = session.task
        assert task is not None
        assert session.transport is not None
        peername = session.transport.get_extra_info("peername") or ("?", 0)
        host = str(peername[0])
        peer = f"{host}:{peername[1]}"
        refusal: Refusal | None = None
        server = self._server
        if server is None or not server.is_serving():
            refusal = "shutting_down"  # accepted just as stop() began: it would not wait for us
        elif not self._allowed(host):
            refusal = "not_allowed"
        elif len(self._sessions) >= self.settings.max_sessions and not self._evict_idle():
            refusal = "too_many_sessions"
        if refusal is not None:
            self.metrics.connection_refused(refusal)
            log.warning("agi.connection.refused", peer=peer, reason=refusal)
            with contextlib.suppress(_Closed):
                session.write(FAILURE_LINE)
            session.close()
            return
        self._sessions.add(task)
        self._idle[session] = task
        await self._supervised(session, peer, self._session(session, peer))

    async def _supervised(self, session: _Session, peer: str, work: Awaitable[None]) -> None:
        """Run ``work`` in the current task, one of ``session``'s: nothing escapes it, and the
        task that answers the session (``session.task``) closes it."""
        # session.task is the current task when work begins (set when it was created, which
        # does not run it yet): after a hand-off it is another.
        task = session.task
        try:
            await work
        except asyncio.CancelledError:
            # Shutdown past its grace: end quietly, the stop is logged once for all.
            if session.task is task:
                log.info("agi.session.cancelled", peer=peer)
        except Exception as exc:
            # A bug (nothing else escapes a session): say so, once, with its traceback.
            log.exception("agi.session.crashed", exc_info=exc)
        finally:
            self._sessions.discard(task)
            none_left = self._none_left
            if not self._sessions and none_left is not None and not none_left.done():
                none_left.set_result(None)
            if session.task is task:
                self._idle.pop(session, None)
                session.close()

    def _hand_off(
        self,
        session: _Session,
        peer: str,
        environment: Environment,
        started: float,
        later: Awaitable[Outcome],
    ) -> None:
        """The session's sync attempt outlives its budget: the session is answered by a task of
        its own, from ``later``, and counts as a session only there; the attempt goes on."""
        self._sessions.discard(session.task)
        answer = self._answer(session, peer, environment, started, later)
        session.task = session.loop.create_task(self._supervised(session, peer, answer))
        self._sessions.add(session.task)

    async def _answer(
        self,
        session: _Session,
        peer: str,
        environment: Environment,
        started: float,
        outcome: Awaitable[Outcome],
    ) -> None:
        # Handed off from a timer of the session's or from a signal handler: the context
        # copied may not be the session's.
        _bind(peer, environment)
        await self._finish(session, started, environment.script, await outcome)

    def _evict_idle(self) -> bool:
        """Every slot is taken: close the oldest connection that has sent nothing yet and
        give its slot to the newcomer; False when there is none.

        Asterisk sends the environment the moment it connects, so a connection still silent
        while newer ones keep coming is a stray or an attacker: a flood of idle connections
        then cycles through the slots instead of holding them for environment_timeout, and a
        real call (silent only for the milliseconds before its environment) is the youngest,
        evicted last."""
        victim = next((session for session in self._idle if session.sent_nothing()), None)
        if victim is None:
            return False
        self._sessions.discard(self._idle.pop(victim))  # its slot is the newcomer's now
        victim.evicted = True
        self.metrics.connection_refused("idle_evicted")
        with contextlib.suppress(_Closed):
            victim.write(FAILURE_LINE)
        victim.close()
        return True

    async def _session(self, session: _Session, peer: str) -> None:
        started = time.monotonic()
        try:
            environment = await session.environment()
        except (ProtocolError, TimeoutError, OSError) as exc:
            if session.evicted:
                # Counted as a refusal when evicted; logged at debug: a flood of idle
                # connections would otherwise write a line for each.
                log.debug("agi.connection.evicted", peer=peer, held_ms=_ms(started))
                return
            self.metrics.protocol_errors.inc()
            reason = getattr(exc, "reason", None) or (
                f"no environment within {self.settings.environment_timeout:g}s"
                if isinstance(exc, TimeoutError) and exc.errno is None  # ours, not ETIMEDOUT
                else f"connection error: {exc.__class__.__name__}"
            )
            log.warning(
                "agi.session.protocol_error", peer=peer, reason=reason, held_ms=_ms(started)
            )
            return
        self._idle.pop(session, None)
        route = environment.script
        _bind(peer, environment)
        hand_off = functools.partial(self._hand_off, session, peer, environment, started)
        outcome = await self._dispatch(environment, route, hand_off)
        if outcome is not None:  # else answered by the task it was handed off to
            await self._finish(session, started, route, outcome)

    async def _finish(
        self, session: _Session, started: float, route: str, outcome: Outcome
    ) -> None:
        """Tell the channel ``outcome``; count and log the session."""
        try:
            await session.set_variables(outcome)
            delivered = True
        except (ProtocolError, TimeoutError, OSError, _Closed) as exc:
            delivered = False
            log.warning(
                "agi.session.variables_not_set",
                error=str(exc),
                error_type=exc.__class__.__name__,
                reason=getattr(exc, "reason", ""),
            )
        held = time.monotonic() - started
        self.metrics.session_finished(route, outcome.status, held)
        session_log = self._session_log
        level = (
            session_log.warning
            if outcome.status in (Status.FAILED, Status.REJECTED)
            else session_log.info
        )
        level(
            "agi.session.finished",
            status=outcome.status,
            message=outcome.message,
            held_ms=round(held * 1000, 2),
            hung_up=session.hung_up,
            variables_set=delivered,
        )

    async def _dispatch(
        self, environment: Environment, route: str, hand_off: HandOff
    ) -> Outcome | None:
        if environment.overlong:
            return Outcome(
                Status.REJECTED,
                f"{', '.join(environment.overlong)} longer than {MAX_LINE_BYTES} bytes: not read",
            )
        action = ROUTES.get(route)
        if action is None:
            known = ", ".join(ROUTES)
            return Outcome(Status.REJECTED, f"unknown route {route!r} (known: {known})")
        try:
            parameters = parse_parameters(environment)
            request = build_request(action, environment, parameters, self._call_defaults)
        except Rejected as exc:
            return Outcome(Status.REJECTED, exc.reason)
        mode, budget = self._policies[action]
        return await self.delivery.submit(
            request,
            call_uniqueid=parameters.call or environment.uniqueid,
            mode=parameters.mode or mode,
            budget=budget,
            hand_off=hand_off,
        )


def _bind(peer: str, environment: Environment) -> None:
    """Log the session's context with every event of the current task (delivery's events on
    its behalf too) from now on."""
    bind_session(
        peer=peer,
        route=environment.script,
        uniqueid=environment.uniqueid,
        channel=environment.channel,
    )


def _in_networks(host: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _message(text: str) -> str:
    """NOOJEE_MESSAGE: one printable line, short enough for any Asterisk's command buffer."""
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text[:MESSAGE_MAX_CHARS]


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)
