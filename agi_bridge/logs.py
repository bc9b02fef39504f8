"""Structured logs: JSON lines for machines, readable lines on a terminal, secrets never.

Event names are stable dotted names (``agi.session.finished``); context such as the uniqueid,
channel, peer and route is bound once per session. Every line is checked for secrets as it will
be written, and one that may hold any has :func:`agi_bridge.redact.scrub` (the API key, secret
query values, passwords in URLs) applied to every string of its event (and to the text of any
other value), so even an exception text that quotes a URL cannot leak a secret.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from agi_bridge.redact import may_hold_secret, scrub

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


# The session's context (peer, route, uniqueid, channel): added to every event logged while it
# runs, in its task and the tasks it starts (they inherit the context). One variable for the
# lot, set once per session: structlog's bind_contextvars sets one per key, and its
# merge_contextvars copies the whole context at every event.
_SESSION: Final[ContextVar[Mapping[str, str]]] = ContextVar(
    "agi_bridge_session", default=MappingProxyType({})
)


def bind_session(**context: str) -> None:
    """Log ``context`` with every event of the current task from now on (and of the tasks it
    starts)."""
    _SESSION.set(context)


def merge_session(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """A structlog processor: the session's context, under the event's own keys."""
    for key, value in _SESSION.get().items():
        event_dict.setdefault(key, value)
    return event_dict


class SecretScrubber:
    """A structlog processor that applies :func:`agi_bridge.redact.scrub` to every string, and
    to the text of any other object (as the JSON renderer would write its repr)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(s for s in secrets if s)

    def _clean(self, value: object) -> object:
        if isinstance(value, str):
            return scrub(value, self.secrets)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        if isinstance(value, int | float | None):  # bool is an int
            return value
        return scrub(repr(value), self.secrets)

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        # In place: structlog hands every processor a dict of its own.
        for key, value in event_dict.items():
            event_dict[key] = self._clean(value)
        return event_dict


# structlog's JSONRenderer passes its options to json.dumps, which builds an encoder per event;
# this one is built once. repr is what that renderer falls back to for a value JSON lacks.
_JSON: Final = json.JSONEncoder(default=repr)


class JsonLines:
    """A structlog renderer: the event as one JSON line, with no secret in it.

    The line is checked as it will be written (:func:`agi_bridge.redact.may_hold_secret`), and
    only a line that may hold a secret is written again from the event scrubbed value by value:
    most lines hold none, and one check of the line costs a fraction of scrubbing each value."""

    def __init__(self, scrubber: SecretScrubber) -> None:
        self._scrubber = scrubber

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        line = _JSON.encode(event_dict)
        if may_hold_secret(line, self._scrubber.secrets):
            line = _JSON.encode(self._scrubber(logger, name, event_dict))
        return line


class UtcClock:
    """A structlog processor: the event's ISO 8601 UTC time stamp, as
    ``TimeStamper(fmt="iso", utc=True)`` writes it but with the microseconds always written, at
    a fifth of its cost (the date and time of day are formatted once a second)."""

    def __init__(self) -> None:
        # The second and its text, in one attribute: a thread logging meanwhile (the standard
        # library's handler) reads both of the same second.
        self._second: tuple[int, str] = (-1, "")

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        now = time.time()
        second, text = self._second
        if int(now) != second:
            second = int(now)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        event_dict["timestamp"] = f"{text}.{int((now - second) * 1e6):06d}Z"
        return event_dict


def configure_logging(
    *,
    level: str = "info",
    fmt: str = "auto",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    cache: bool = True,
) -> None:
    """Set up structlog once for the process. ``fmt``: auto, json or console. ``cache=False``
    lets a test configure it again."""
    out = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    processors: list[Processor] = [
        merge_session,
        structlog.processors.add_log_level,
        UtcClock(),
        structlog.processors.format_exc_info,
    ]
    scrubber = SecretScrubber(secrets)
    rendering: list[Processor] = (
        [scrubber, structlog.dev.ConsoleRenderer(colors=out.isatty())]
        if console
        else [JsonLines(scrubber)]
    )
    structlog.configure(
        processors=[*processors, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=cache,
    )
    # Libraries log through the standard library (asyncio's "Task exception was never
    # retrieved", httpx): same format, same scrubbing, or a traceback quoting a URL
    # would carry the API key to the journal.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS[level], logging.WARNING))  # libraries' INFO is noise here


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
