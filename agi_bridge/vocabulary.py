"""The words every layer shares: what the dialplan asks for, what NoojeeContact answered, what
the dialplan is told. Imports nothing of ours, so that the spool, the metrics and the protocol
side never load the HTTP client to name a request or a status.

:data:`ACTIONS` is the one table of what depends on the action (its route, its API path, its
rules): every other module reads it, none compares an action's name, so adding a verb or a rule
is one row here."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

__all__ = [
    "ACTIONS",
    "MESSAGE_MAX_CHARS",
    "ROUTES",
    "Action",
    "ActionRules",
    "By",
    "HandOff",
    "Mode",
    "NoojeeResult",
    "Outcome",
    "RecordingRequest",
    "ResultKind",
    "Status",
    "TargetKind",
    "target_kind",
    "unconfirmed_message",
]

Action = Literal["start", "stop"]
# What a call names its target by (``by=``), and how it waits for NoojeeContact (``mode=``).
By = Literal["uniqueid", "extension", "id"]
Mode = Literal["sync", "async"]

# What ``extenOrUniqueId`` names: a call (its uniqueid, or an explicit id such as its
# linkedid) or an extension, which NoojeeContact applies to whatever call that extension is on
# when the request arrives. Only "extension" requests have a short validity.
TargetKind = Literal["uniqueid", "id", "extension"]

# Result messages end up in a channel variable and a log line: one short line.
MESSAGE_MAX_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class RecordingRequest:
    """One stop or start call. ``tag`` is only sent with start; ``None`` fields are omitted."""

    action: Action
    target: str  # -> extenOrUniqueId
    agent: str | None = None  # -> agentLoginName
    tag: str | None = None  # -> tag (start only)
    # How the call named its target; decides how long the request may wait (not sent).
    kind: TargetKind = "uniqueid"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {self.action!r}")


def target_kind(by: str) -> TargetKind:
    """The kind of target a call's ``by`` sends: ``by=id`` names a call (the dialplan passes
    the linkedid that way; an extension goes by ``by=extension``)."""
    if by == "uniqueid":
        return "uniqueid"
    return "id" if by == "id" else "extension"


class ResultKind(enum.StrEnum):
    """What happened to one request, split by whose fault it was."""

    OK = "ok"  # 2xx and Code 0, or 2xx with an empty body
    WARNING = "warning"  # 2xx and Code > 0: success, but log it
    API_ERROR = "api_error"  # JSON Code < 0 (any status): Message says why. Not transient
    # JSON Code < 0 saying NoojeeContact knows no such call: typical of a stop sent after the
    # call ended (its recording ended with it), or of an identifier it does not record under.
    # Not transient, and not a fault an operator can fix for that one call.
    NOT_FOUND = "not_found"
    HTTP_ERROR = "http_error"  # non-2xx. 5xx (and 429) transient, other statuses not
    TIMEOUT = "timeout"  # transient
    TRANSPORT = "transport"  # refused, reset, TLS failure...: transient, except TLS verification
    # 2xx whose body is not NoojeeContact's (a proxy's login page, cut-off JSON, JSON without
    # Code): nothing confirmed. Transient (a stop is retried); a start is settled unconfirmed.
    UNEXPECTED = "unexpected"


@dataclass(frozen=True, slots=True)
class NoojeeResult:
    """The outcome of one request to NoojeeContact; ``message`` is safe for logs and channel
    variables."""

    kind: ResultKind
    message: str
    code: int | None = None  # JSON Code when present
    http_status: int | None = None
    # Set for TRANSPORT failures caused by certificate verification: retrying cannot help,
    # an operator has to fix the CA file or the server's certificate.
    tls_verify_failed: bool = False
    # Seconds NoojeeContact (or a proxy before it) asked us to wait, by a 429 or 503 with a
    # Retry-After header: the worker sends nothing more before then.
    retry_after: float | None = None
    # The request certainly never reached NoojeeContact (refused, connect timeout, TLS
    # handshake, no free connection, no time stamp): even a start may be sent again.
    unsent: bool = False

    # What the result means, derived once from the fields above (a result is immutable, and
    # answers repeat: classification hands out the same result all day). Fields, not
    # properties: every request reads them several times, a property is a Python call each.
    #: The server did what was asked (possibly with a warning).
    ok: bool = field(init=False, repr=False, compare=False)
    #: The same request may succeed later without anybody changing anything.
    transient: bool = field(init=False, repr=False, compare=False)
    #: NoojeeContact may have done what was asked without saying so: sent and no answer, or
    #: an answer that is not NoojeeContact's. A start is then never resent.
    uncertain: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kind = self.kind
        status = self.http_status or 0
        ok = kind is ResultKind.OK or kind is ResultKind.WARNING
        if kind is ResultKind.TIMEOUT or kind is ResultKind.UNEXPECTED:
            transient = True
        elif kind is ResultKind.TRANSPORT:
            transient = not self.tls_verify_failed
        else:
            transient = kind is ResultKind.HTTP_ERROR and (status >= 500 or status == 429)
        if kind is ResultKind.UNEXPECTED:
            uncertain = True
        elif kind is ResultKind.TIMEOUT or kind is ResultKind.TRANSPORT:
            uncertain = not self.unsent and not self.tls_verify_failed
        else:
            # A 5xx may come from NoojeeContact after it acted, or from a proxy that forwarded
            # the request (502/504); 503 and 429 say the request was not taken.
            uncertain = kind is ResultKind.HTTP_ERROR and status >= 500 and status != 503
        object.__setattr__(self, "ok", ok)
        object.__setattr__(self, "transient", transient)
        object.__setattr__(self, "uncertain", uncertain)


class Status(enum.StrEnum):
    """The values of NOOJEE_STATUS."""

    STOPPED = "STOPPED"
    STARTED = "STARTED"
    QUEUED = "QUEUED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    # A start that may have reached NoojeeContact without a confirmation: never sent again.
    UNCONFIRMED = "UNCONFIRMED"
    # A request by extension not delivered while its call could still be on that extension
    # (too late, or the call's own stop superseded it): not sent, nothing changed.
    EXPIRED = "EXPIRED"


@dataclass(frozen=True, slots=True)
class ActionRules:
    """Everything that depends on the action, read by every part that needs it."""

    route: str  # the AGI script path that asks for it
    api_path: str  # NoojeeContact's path, under noojee_url
    confirmed: Status  # what the dialplan hears once NoojeeContact has done it
    takes_tag: bool  # ``tag`` is sent with it (NoojeeContact knows tags on start only)
    needs_agent: bool  # NoojeeContact refuses it without agentLoginName
    # A replay adds a recording leg: sent at most once; an answer that may mean "done" (an
    # uncertain result) settles it unconfirmed, and an attempt under way marks it attempted.
    # Otherwise at least once: a repeat is harmless.
    at_most_once: bool
    # "No such call" settles it (a stop after the call and its recording ended): not a fault
    # anyone can fix, so it is no dead letter.
    not_found_settles: bool
    # Sent by the call's id, it ends what the call still has queued by extension (the call's
    # own hangup stop: a request by extension could then only reach the extension's next call).
    supersedes_by_extension: bool
    mode_setting: str  # the Settings field with its default mode
    budget_setting: str  # the Settings field with how long a sync one may hold the call


ACTIONS: Final[Mapping[Action, ActionRules]] = MappingProxyType(
    {
        "stop": ActionRules(
            route="recording/stop",
            api_path="CallManagementAPI/stop",
            confirmed=Status.STOPPED,
            takes_tag=False,
            needs_agent=True,
            at_most_once=False,
            not_found_settles=True,
            supersedes_by_extension=True,
            mode_setting="stop_mode",
            budget_setting="stop_budget",
        ),
        "start": ActionRules(
            route="recording/start",
            api_path="CallManagementAPI/start",
            confirmed=Status.STARTED,
            takes_tag=True,
            needs_agent=False,
            at_most_once=True,
            not_found_settles=False,
            supersedes_by_extension=False,
            mode_setting="start_mode",
            budget_setting="start_budget",
        ),
    }
)

# The explicit route table: a script path not listed here is REJECTED, never looked up.
ROUTES: Final[Mapping[str, Action]] = MappingProxyType(
    {rules.route: action for action, rules in ACTIONS.items()}
)


def unconfirmed_message(result: NoojeeResult) -> str:
    """What the dialplan is told of a start that may have reached NoojeeContact."""
    text = f"may have reached NoojeeContact, not sent again: {result.message}"
    return text[:MESSAGE_MAX_CHARS]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the dialplan is told: NOOJEE_STATUS and NOOJEE_MESSAGE."""

    status: Status
    message: str
    entry: int | None = None  # QUEUED: the spool entry that holds the request


# A session's answer, moved to a task of its own: a sync attempt runs in its session's task,
# and when it outlives the session's budget, the dialplan must hear QUEUED while it goes on.
# Delivery calls this once with what the session is to answer (an awaitable: QUEUED comes
# after the spool's commit), and the attempt then ends in the session's task unheard.
HandOff = Callable[[Awaitable[Outcome]], None]
