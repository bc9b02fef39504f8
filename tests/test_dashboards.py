"""The Grafana dashboard and the Prometheus alert rules in deploy/ against promtool and the code.

promtool (Debian's ``prometheus`` package, installed by scripts/test as root) checks the rules,
runs their unit tests and parses every dashboard query; a bridge's ``/metrics`` must carry
every metric the dashboard and the rules name from the start, before its first call.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agi_bridge.app import Bridge
from agi_bridge.settings import Settings
from agi_bridge.testing.simulator import NoojeeSimulator
from tests.bridge_helpers import call, make_settings, running_bridge, running_simulator
from tests.test_deploy import _tool

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
RULES = REPO / "deploy" / "prometheus-alerts.yml"
RULES_TESTS = REPO / "deploy" / "prometheus-alerts.test.yml"

# Series Prometheus makes itself for every target, which no /metrics carries.
PROMETHEUS_OWN = frozenset({"up"})
# A selector ``name{...}``; every query of ours scopes its selectors by job or instance, so
# this finds every metric, and any agi_bridge_ name is caught even without braces.
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
BRIDGE_NAME = re.compile(r"\bagi_bridge_[a-zA-Z0-9_:]*")
# Grafana's own variables, and plausible values for them, so promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}
LABEL_VALUES = re.compile(r"label_values\((.*),\s*\w+\)")
GRID_COLUMNS = 24


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def _panels() -> list[dict[str, Any]]:
    return [panel for panel in _dashboard()["panels"] if panel["type"] != "row"]


def _dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variables."""
    queries = [target["expr"] for panel in _panels() for target in panel["targets"]]
    for variable in _dashboard()["templating"]["list"]:
        match = LABEL_VALUES.fullmatch(variable["query"]["query"])
        assert match, f"template variable {variable['name']}: expected label_values(...)"
        queries.append(match.group(1))
    return queries


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def _metric_names(expressions: list[str]) -> set[str]:
    names: set[str] = set()
    for expr in expressions:
        names.update(SELECTOR.findall(expr))
        names.update(BRIDGE_NAME.findall(expr))
    return names


def test_dashboard_is_importable_with_a_datasource_input() -> None:
    """The dashboard is JSON Grafana imports: a Prometheus input every panel uses, unique ids."""
    dashboard = _dashboard()
    assert [item["name"] for item in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels():
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["description"], f"panel {panel['title']!r} does not say what it tells"
        for target in panel["targets"]:
            assert target["datasource"] == datasource, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == datasource, variable["name"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana's variables filled in)."""
    promtool = _tool("promtool", "prometheus")
    rules = []
    for number, query in enumerate(_dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"unknown Grafana variable in {query}"
        rules.append({"record": f"dashboard:query_{number}", "expr": query})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alert_rules_pass_promtool_check() -> None:
    """promtool check rules accepts deploy/prometheus-alerts.yml."""
    promtool = _tool("promtool", "prometheus")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alert_rules_unit_tests_pass_and_cover_every_alert() -> None:
    """promtool test rules passes, with a test case for every alert of the rules file."""
    promtool = _tool("promtool", "prometheus")
    tests = yaml.safe_load(RULES_TESTS.read_text(encoding="utf-8"))
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in _rules()}
    ran = subprocess.run(
        [promtool, "test", "rules", str(RULES_TESTS)], capture_output=True, text=True, check=False
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr


@pytest.fixture
async def simulator(server_ssl_context: ssl.SSLContext) -> AsyncIterator[NoojeeSimulator]:
    async with running_simulator(server_ssl_context) as simulator:
        yield simulator


async def _refused_connection(port: int) -> bytes:
    """Connect from 127.0.0.2, which the bridge does not allow: it answers 'failure'."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setblocking(False)
        sock.bind(("127.0.0.2", 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)  # the writer owns it now
    try:
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def _series(exposition: str) -> set[str]:
    """Every series of a Prometheus text exposition: its name and labels, without the value."""
    return {line.rsplit(" ", 1)[0] for line in exposition.splitlines() if not line.startswith("#")}


def _names(series: set[str]) -> set[str]:
    return {name.split("{", 1)[0] for name in series}


async def _scrape(bridge: Bridge) -> str:
    assert bridge.health is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{bridge.health.port}/metrics")
    assert response.status_code == 200, response.text
    return response.text


def _bridge_settings(simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path) -> Settings:
    return make_settings(
        simulator,
        ca_file,
        tmp_path,
        metrics_listen="127.0.0.1:0",
        allow_clients=("127.0.0.1/32",),
    )


async def test_a_fresh_bridge_exports_every_metric_the_dashboard_and_rules_name(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Before its first call, /metrics has every metric the dashboard and the rules name."""
    names = _metric_names(_dashboard_queries()) | _metric_names([r["expr"] for r in _rules()])
    async with running_bridge(_bridge_settings(simulator, ca_file, tmp_path)) as bridge:
        exported = _names(_series(await _scrape(bridge)))
    # The parsing found the metrics of every panel group and alert, not a handful.
    assert {
        "agi_bridge_sessions_total",
        "agi_bridge_hold_seconds_bucket",
        "agi_bridge_noojee_request_seconds_bucket",
        "agi_bridge_noojee_errors_total",
        "agi_bridge_connections_refused_total",
        "agi_bridge_spool_pending",
        "agi_bridge_spool_oldest_age_seconds",
        "agi_bridge_spool_dead",
        "up",
    } <= names
    assert sorted(names - exported - PROMETHEUS_OWN) == []


async def test_calls_add_no_series_to_those_of_a_fresh_bridge(
    simulator: NoojeeSimulator, ca_file: Path, tmp_path: Path
) -> None:
    """Every label set that successful, failing, queued, rejected and refused calls count
    was exported, at zero, before the first call."""
    async with running_bridge(_bridge_settings(simulator, ca_file, tmp_path)) as bridge:
        fresh = await _scrape(bridge)
        assert (await call(bridge, "Fred")).variables["NOOJEE_STATUS"] == "STOPPED"
        started = await call(bridge, "Fred", script="recording/start", uniqueid="1.1")
        assert started.variables["NOOJEE_STATUS"] == "STARTED"
        assert (await call(bridge, "Pebbles", uniqueid="2.2")).variables[
            "NOOJEE_STATUS"
        ] == "FAILED"
        queued = await call(bridge, "agent=Wilma", "mode=async", uniqueid="3.3")
        assert queued.variables["NOOJEE_STATUS"] == "QUEUED"
        unknown = await call(bridge, script="recording/nope", uniqueid="4.4")
        assert unknown.variables["NOOJEE_STATUS"] == "REJECTED"
        assert await _refused_connection(bridge.server.port) == b"failure\n"
        after = await _scrape(bridge)
    # The second scrape saw the calls: they changed values, not the set of series.
    assert fresh != after
    assert 'agi_bridge_connections_refused_total{reason="not_allowed"} 1.0' in after
    assert sorted(_series(after) - _series(fresh)) == []
