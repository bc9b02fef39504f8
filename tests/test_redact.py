"""The masking rules of agi_bridge.redact, one test per rule, and that each user of them (the
log processor, the client's result messages, the simulator's record) applies all of them."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from urllib.parse import quote

import pytest

from agi_bridge.logs import JsonLines, SecretScrubber, UtcClock
from agi_bridge.noojee.classify import classify_response
from agi_bridge.redact import MASK, redact_url, scrub
from agi_bridge.testing.simulator import ReceivedRequest

KEY = "f863246a-973e-11e6-8784-08002718f5b5"
ODD_KEY = "k&y=/sëcret"  # reserved characters: its URL-encoded form differs
HASH = hashlib.sha256(f"{KEY}:1700000000000".encode()).hexdigest()

# (text with a secret, what must not survive in it)
RULES = {
    "the key itself": (f"key {KEY} rejected", KEY),
    "the key URL-encoded": (
        f"/stop?x={quote('k&y=/sëcret', safe='')}",
        quote("k&y=/sëcret", safe=""),
    ),
    "an apiKey parameter": ("POST /stop?extenOrUniqueId=410&apiKey=other-key", "other-key"),
    "a hash parameter": ("POST /stop?timeStamp=1&hash=abc123", "abc123"),
    "a timeStamp parameter": ("POST /stop?timeStamp=1700000000000&hash=x", "1700000000000"),
    "a parameter in any case": ("see APIKEY=upper-key", "upper-key"),
    "a password in a URL": ("proxy http://user:pa55word@proxy:3128 failed", "pa55word"),
    "a bare sha256 hash": (f"digest {HASH} mismatch", HASH),
}
SECRETS = (KEY, ODD_KEY)


@pytest.mark.parametrize("rule", list(RULES))
def test_scrub_masks(rule: str) -> None:
    """scrub applies this rule, and leaves the mask in the secret's place."""
    text, secret = RULES[rule]
    scrubbed = scrub(text, SECRETS)
    assert secret not in scrubbed
    assert MASK in scrubbed


@pytest.mark.parametrize("rule", list(RULES))
def test_the_log_processor_masks(rule: str) -> None:
    """A log event carrying the text anywhere (top level, nested) has the secret masked."""
    text, secret = RULES[rule]
    event = SecretScrubber(SECRETS)(None, "info", {"event": "x", "detail": {"list": [text]}})
    assert secret not in repr(event)


def _line(event: dict[str, object], secrets: tuple[str, ...] = SECRETS) -> str:
    return JsonLines(SecretScrubber(secrets))(None, "info", event)


@pytest.mark.parametrize("rule", list(RULES))
def test_a_json_line_holds_no_secret(rule: str) -> None:
    """Wherever the text is (a plain value among others, nested), the line written has the
    secret masked."""
    text, secret = RULES[rule]
    events: list[dict[str, object]] = [
        {"event": "x", "peer": "127.0.0.1:4000", "detail": text, "held_ms": 1.5, "ok": True},
        {"event": "x", "detail": {"list": [text]}},
    ]
    for event in events:
        line = _line(event)
        assert secret not in line
        assert MASK in repr(json.loads(line))


@pytest.mark.parametrize(
    "key",
    ["sëcret-kéy", 'pa"ss\\word', "tab\tkey", "ключ"],
    ids=["accents", "quote and backslash", "tab", "cyrillic"],
)
def test_a_json_line_holds_no_secret_however_json_writes_it(key: str) -> None:
    """A key JSON escapes (non-ASCII, a quote, a backslash, a control character) is still
    found in the line, where it stands escaped."""
    line = _line({"event": "x", "detail": f"rejected {key} here"}, secrets=(key,))
    assert json.loads(line)["detail"] == f"rejected {MASK} here"


@pytest.mark.parametrize("rule", list(RULES))
def test_a_json_line_masks_an_object_written_as_its_repr(rule: str) -> None:
    """A value JSON cannot write is written as its repr: masked as a string would be."""
    text, secret = RULES[rule]

    class Echo:
        def __repr__(self) -> str:
            return f"Echo({text})"

    assert secret not in _line({"event": "x", "o": Echo()})


def test_a_json_line_without_secrets_is_the_event_as_it_is() -> None:
    event = {"event": "agi.session.finished", "message": "stopped", "held_ms": 1.5, "x": None}
    assert json.loads(_line(dict(event))) == event


@pytest.mark.parametrize("at", [1700000000.25, 1700000001.5, 1700000059.0])
def test_the_clock_stamps_iso_utc_with_microseconds(
    at: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UtcClock's stamp is the time, to the microsecond, in ISO 8601 UTC; right across a
    second's change, though it formats the date and time of day once a second."""
    clock = UtcClock()
    for moment in (at - 0.75, at):
        monkeypatch.setattr(time, "time", lambda now=moment: now)
        expected = datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert clock(None, "info", {})["timestamp"] == expected


@pytest.mark.parametrize("rule", list(RULES))
def test_result_messages_mask(rule: str) -> None:
    """A NoojeeContact answer echoing the text yields a message without the secret."""
    text, secret = RULES[rule]
    key = ODD_KEY if rule == "the key URL-encoded" else KEY
    assert secret not in classify_response(500, text.encode(), secret=key).message


def test_the_simulator_record_masks_every_secret_parameter() -> None:
    """The simulator's redacted record masks apiKey, hash and timeStamp values and a key
    echoed in another parameter."""
    request = ReceivedRequest(
        method="POST",
        path="/servicemanager/rest/CallManagementAPI/stop",
        params={"apiKey": KEY, "hash": HASH, "timeStamp": "1700000000000", "tag": f"x{KEY}"},
        headers={},
        body=b"",
        auth="ok",
        answered_code=0,
        http_status=200,
        at=0.0,
    )
    shown = repr(request.to_json(redact=True))
    for secret in (KEY, HASH, "1700000000000"):
        assert secret not in shown
    assert request.to_json()["params"]["apiKey"] == KEY  # unredacted on request


def test_scrub_keeps_the_rest_readable() -> None:
    """Only the secrets go: the path, other parameters and the words around them stay."""
    text = f"no route for /stop?extenOrUniqueId=410&apiKey={KEY} (HTTP 404)"
    assert scrub(text, (KEY,)) == "no route for /stop?extenOrUniqueId=410&apiKey=*** (HTTP 404)"


def test_redact_url_keeps_the_time_stamp() -> None:
    """A URL shown whole masks key, hash and password but keeps the harmless time stamp."""
    url = f"https://user:pw@h/x?timeStamp=1&hash={HASH}&apiKey={KEY}"
    assert redact_url(url) == "https://user:***@h/x?timeStamp=1&hash=***&apiKey=***"
