"""The action table: routes, CLI choices, client paths and per-action rules all come from it."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import get_args

import httpx
import pytest

from agi_bridge import vocabulary
from agi_bridge.calls import CallDefaults, Rejected, request_for
from agi_bridge.calls import CallParameters as Parameters
from agi_bridge.cli import build_parser
from agi_bridge.noojee.client import NoojeeClient
from agi_bridge.settings import Settings
from agi_bridge.vocabulary import ACTIONS, ROUTES, RecordingRequest

PACKAGE = Path(vocabulary.__file__).parent
# The NoojeeContact simulator and the fake Asterisk play the other parties: they hold their
# own view of the API on purpose, so that a wrong path or route of ours fails a test.
OTHER_PARTIES = PACKAGE / "testing"


def _our_modules() -> list[Path]:
    return [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != Path(vocabulary.__file__) and OTHER_PARTIES not in path.parents
    ]


def test_routes_are_the_tables() -> None:
    """ROUTES is the table's routes, each leading to its own action."""
    assert dict(ROUTES) == {rules.route: action for action, rules in ACTIONS.items()}


def test_cli_send_offers_the_tables_actions() -> None:
    """`agi-bridge send` offers exactly the table's actions."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    send = commands["send"]
    (positional,) = (a for a in send._actions if a.dest == "action")
    assert list(positional.choices or ()) == list(ACTIONS)


async def test_the_client_posts_to_the_tables_paths() -> None:
    """The client POSTs each action to noojee_url plus the table's API path."""
    posted: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        posted.append(request.url.path)
        return httpx.Response(200, json={"Code": 0, "Message": "ok"})

    async with NoojeeClient(
        base_url="https://pbx.example/servicemanager/rest",
        auth="apikey",
        api_key="k",
        transport=httpx.MockTransport(answer),
    ) as client:
        for action in ACTIONS:
            await client.send(RecordingRequest(action, "1.1", agent="Fred"))
    assert posted == [f"/servicemanager/rest/{rules.api_path}" for rules in ACTIONS.values()]


def test_no_module_but_the_table_names_an_action_route_or_path() -> None:
    """No module compares an action's name or spells a route or an API path: they read the
    table, so that a new verb or rule is one row in it."""
    spelled = {rules.route for rules in ACTIONS.values()} | {
        rules.api_path for rules in ACTIONS.values()
    }
    found = []
    for path in _our_modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in spelled:
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.Compare):
                found.extend(
                    f"{path.name}:{node.lineno}: compares with {side.value!r}"
                    for side in (node.left, *node.comparators)
                    if isinstance(side, ast.Constant) and side.value in ACTIONS
                )
    assert found == []


@pytest.mark.parametrize("action", list(ACTIONS))
def test_per_action_rules_come_from_the_table(action: vocabulary.Action) -> None:
    """A tag is refused and an agent required exactly where the table says; the settings it
    names hold the action's default mode and budget."""
    defaults = CallDefaults()
    rules = ACTIONS[action]
    tagged = Parameters(agent="Fred", tag="T")
    if rules.takes_tag:
        assert request_for(action, "1.1", None, tagged, defaults, "uniqueid").tag == "T"
    else:
        with pytest.raises(Rejected, match="tag is only accepted"):
            request_for(action, "1.1", None, tagged, defaults, "uniqueid")
    if rules.needs_agent:
        with pytest.raises(Rejected, match=f"{action} needs an agent"):
            request_for(action, "1.1", None, Parameters(), defaults, "uniqueid")
    else:
        assert request_for(action, "1.1", None, Parameters(), defaults, "uniqueid").agent is None
    fields = Settings.model_fields
    assert fields[rules.mode_setting].default in get_args(vocabulary.Mode)
    assert fields[rules.budget_setting].default > 0


# --- the status contract: described once ----------------------------------------------------

REPO = PACKAGE.parent
STATUS_TABLE_HEAD = "| `NOOJEE_STATUS` | meaning | agent hears | what to do |"


def _status_table_rows() -> list[str]:
    """The first cell of each row of dialplan/README.md's status table."""
    lines = (REPO / "dialplan" / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(STATUS_TABLE_HEAD) + 2  # past the head and its |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1])
    return rows


def test_the_status_table_describes_every_status_once() -> None:
    """dialplan/README.md's status table names each NOOJEE_STATUS value of the code exactly
    once: a status added to the code without its description (or a stale one) fails here."""
    named = [word.strip("` ") for row in _status_table_rows() for word in row.split("/")]
    assert sorted(named) == sorted(vocabulary.Status)


@pytest.mark.parametrize("document", ["README.md", "dialplan/extensions.conf"])
def test_the_other_documents_name_the_statuses_and_point_to_the_table(document: str) -> None:
    """README.md and extensions.conf list every status and point to the one table instead of
    describing them again (a meaning written three times drifts apart)."""
    text = (REPO / document).read_text(encoding="utf-8")
    for status in vocabulary.Status:
        assert status.value in text, status
    assert "dialplan/README.md" in text
    # The meanings are not repeated: the table's wording of a status appears only there.
    assert "a start that may have reached NoojeeContact without a confirmation" not in text


@pytest.mark.parametrize("kind", list(vocabulary.ResultKind))
def test_what_a_result_means_follows_its_fields_through_replace(
    kind: vocabulary.ResultKind,
) -> None:
    """ok, transient and uncertain are derived once, when a result is made: a copy made with
    dataclasses.replace (the client marks results unsent that way) derives them again."""
    from dataclasses import replace

    sent = vocabulary.NoojeeResult(kind, "m", http_status=502)
    unsent = replace(sent, unsent=True)
    assert (
        unsent.ok is sent.ok is (kind in (vocabulary.ResultKind.OK, vocabulary.ResultKind.WARNING))
    )
    assert sent.uncertain is (
        kind
        in (
            vocabulary.ResultKind.TIMEOUT,
            vocabulary.ResultKind.TRANSPORT,
            vocabulary.ResultKind.UNEXPECTED,
        )
        or kind is vocabulary.ResultKind.HTTP_ERROR
    )
    assert unsent.uncertain is (
        kind in (vocabulary.ResultKind.UNEXPECTED, vocabulary.ResultKind.HTTP_ERROR)
    )
    assert (
        sent.transient
        is unsent.transient
        is (
            kind
            not in (
                vocabulary.ResultKind.OK,
                vocabulary.ResultKind.WARNING,
                vocabulary.ResultKind.API_ERROR,
                vocabulary.ResultKind.NOT_FOUND,
            )
        )
    )
