"""``python -m agi_bridge`` as an operator runs it: a real subprocess, real files, real HTTPS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import socket
import sqlite3
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from agi_bridge import __version__
from agi_bridge.spool import SPOOL_FILE, Spool
from agi_bridge.testing.simulator import NoojeeSimulator, SimulatorConfig
from agi_bridge.vocabulary import RecordingRequest
from tests.bridge_helpers import make_settings, running_bridge

KEY = "f863246a-973e-11e6-8784-08002718f5b5"
STOP_PATH = "/servicemanager/rest/CallManagementAPI/stop"
# Generous: a cold interpreter importing httpx, pydantic and structlog on a loaded CI box.
RUN_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parent.parent
# Where the documentation names an agent: `send --agent X`, `agent=X`, `NOOJEE_AGENT=X`, the
# lone AGI argument (`recording/stop,X`, `fake-call recording/stop X`), the agents map's JSON.
DOCUMENTED_AGENT = re.compile(
    r'(?:--agent |\bagent=|NOOJEE_AGENT=|recording/stop[, ]|"\d+": ")([A-Za-z]\w*)'
)


@dataclass(frozen=True, slots=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def python(*args: str, env: Mapping[str, str], cwd: Path) -> Ran:
    """Run ``python ARGS`` without blocking the event loop (the simulator)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def agi_bridge(*args: str, env: Mapping[str, str], cwd: Path) -> Ran:
    """Run ``python -m agi_bridge ARGS``."""
    return await python("-m", "agi_bridge", *args, env=env, cwd=cwd)


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """The operator's environment: conftest has removed every AGI_BRIDGE_* variable from it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGI_BRIDGE_")}
    env["AGI_BRIDGE_DATA_DIR"] = str(tmp_path / "data")
    return env


@pytest.fixture
def env(base_env: dict[str, str]) -> dict[str, str]:
    """A complete configuration (NoojeeContact far away, never contacted)."""
    return base_env | {
        "AGI_BRIDGE_NOOJEE_URL": "https://noojee.invalid/servicemanager/rest",
        "AGI_BRIDGE_NOOJEE_API_KEY": KEY,
    }


def assert_no_secret(ran: Ran) -> None:
    for text in (ran.stdout, ran.stderr):
        assert KEY not in text
        assert KEY[:8] not in text  # not even a prefix of it


def assert_no_traceback(ran: Ran) -> None:
    assert "Traceback" not in ran.stderr
    assert "Traceback" not in ran.stdout


# --- help, version, check-config ---------------------------------------------------------


async def test_help(tmp_path: Path, base_env: dict[str, str]) -> None:
    """--help lists every command and exits 0 without needing a configuration."""
    ran = await agi_bridge("--help", env=base_env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    for command in ("serve", "check-config", "send", "spool", "simulate-noojee", "fake-call"):
        assert command in ran.stdout
    assert ran.stdout.startswith("usage: agi-bridge")


async def test_demo_help_says_where_the_demo_listens_and_spools(
    tmp_path: Path, base_env: dict[str, str]
) -> None:
    """demo --help names its ports, its simulator's key and its spool, and its options."""
    ran = await agi_bridge("demo", "--help", env=base_env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    text = " ".join(ran.stdout.split())  # argparse wraps the description
    for expected in (
        "127.0.0.1:4573",
        "127.0.0.1:9573",
        "127.0.0.1:8089",
        "key demo-key",
        "AGI_BRIDGE_DATA_DIR=var/demo agi-bridge spool list",
        "--config CONFIG",
    ):
        assert expected in text, expected


async def imported_by(*args: str, cwd: Path, env: Mapping[str, str]) -> set[str]:
    """The modules ``python -X importtime ARGS`` imported (importtime lists each on stderr)."""
    ran = await python("-X", "importtime", *args, env=env, cwd=cwd)
    assert ran.returncode == 0, ran.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in ran.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


TESTING_TOOLS = {
    "agi_bridge.testing.simulator",
    "agi_bridge.testing.fake_asterisk",
    "agi_bridge.testing.demo",
}


# What --help has no use for, and which cost it ten times a bare interpreter's start.
HEAVY_FOR_HELP = {
    "pydantic",
    "pydantic_settings",
    "agi_bridge.settings",
    "agi_bridge.loading",
    "httpx",
    "httptools",
    "agi_bridge.app",
    "agi_bridge.server",
}


@pytest.mark.parametrize("command", [["--help"], ["demo", "--help"]], ids=" ".join)
async def test_help_loads_neither_settings_nor_http_client_nor_testing_tool(
    command: list[str], tmp_path: Path, base_env: dict[str, str]
) -> None:
    """--help (demo's too, which shows the listeners' defaults) imports neither pydantic,
    httpx, httptools nor the server, and none of the testing tools."""
    modules = await imported_by("-m", "agi_bridge", *command, cwd=tmp_path, env=base_env)
    assert "agi_bridge.cli" in modules  # the listing is what it claims to be
    assert not modules & HEAVY_FOR_HELP
    assert not modules & TESTING_TOOLS


async def test_serve_loads_no_testing_tool(tmp_path: Path, base_env: dict[str, str]) -> None:
    """What `serve` imports (the CLI and the assembled app) holds none of the testing tools."""
    modules = await imported_by(
        "-c", "import agi_bridge.cli, agi_bridge.app", cwd=tmp_path, env=base_env
    )
    assert {"agi_bridge.app", "agi_bridge.server", "httpx"} <= modules
    assert not modules & TESTING_TOOLS


async def test_spool_loads_no_http_client(tmp_path: Path, base_env: dict[str, str]) -> None:
    """The SQLite spool needs neither httpx nor httptools (the spool commands start fast)."""
    modules = await imported_by("-c", "import agi_bridge.spool", cwd=tmp_path, env=base_env)
    assert "agi_bridge.spool" in modules
    assert not modules & {"httpx", "httptools", "agi_bridge.noojee"}


async def test_version(tmp_path: Path, base_env: dict[str, str]) -> None:
    """version prints the package version and exits 0 without needing a configuration."""
    ran = await agi_bridge("version", env=base_env, cwd=tmp_path)
    assert (ran.returncode, ran.stdout) == (0, f"agi-bridge {__version__}\n")


async def test_check_config_ok_prints_masked_settings(tmp_path: Path, env: dict[str, str]) -> None:
    """check-config prints the effective settings as JSON with the key masked, exit 0."""
    config = tmp_path / "agi-bridge.toml"
    config.write_text('default_agent = "Wilma"\nstop_budget = 0.5\n', encoding="utf-8")
    ran = await agi_bridge(
        "--config",
        str(config),
        "check-config",
        env=env | {"AGI_BRIDGE_STOP_BUDGET": "0.25"},
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    shown = json.loads(ran.stdout)
    assert shown["noojee_api_key"] == "***"
    assert shown["default_agent"] == "Wilma"  # from the file
    assert shown["stop_budget"] == 0.25  # the environment wins
    assert "configuration OK" in ran.stderr
    assert_no_secret(ran)


@pytest.mark.parametrize(
    "argv",
    [
        ("check-config", "--config", "{config}"),
        ("spool", "list", "--config", "{config}"),
        ("spool", "--config", "{config}", "list"),
    ],
)
async def test_config_option_after_the_command(
    tmp_path: Path, base_env: dict[str, str], argv: tuple[str, ...]
) -> None:
    """--config is accepted after the command's name as well as before it."""
    config = tmp_path / "agi-bridge.toml"
    data = tmp_path / "from-file"
    config.write_text(
        f'noojee_url = "https://noojee.invalid/rest"\nnoojee_api_key = "{KEY}"\n'
        f'data_dir = "{data}"\n',
        encoding="utf-8",
    )
    empty = Spool(data, fsync=False)  # for `spool list`
    empty.open()
    empty.close()
    env = {k: v for k, v in base_env.items() if k != "AGI_BRIDGE_DATA_DIR"}
    args = [a.format(config=config) for a in argv]
    ran = await agi_bridge(*args, env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    expected = f'"data_dir": "{data}"' if argv[0] == "check-config" else "pending 0 (oldest -)"
    assert expected in ran.stdout


async def test_check_config_into_a_closed_pipe_exits_0(tmp_path: Path, env: dict[str, str]) -> None:
    """A reader that left (`check-config | head`) is not a failure: exit 0, nothing on stderr."""
    reader, writer = os.pipe()
    os.close(reader)  # every write to the pipe now fails with EPIPE
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agi_bridge",
            "check-config",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=writer,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=tmp_path,
        )
    finally:
        os.close(writer)
    async with asyncio.timeout(RUN_TIMEOUT):
        _, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert "Broken pipe" not in err.decode()


async def test_check_config_key_file_not_shown(tmp_path: Path, base_env: dict[str, str]) -> None:
    """A key read from a file is masked too; only the file's path is shown."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    env = base_env | {
        "AGI_BRIDGE_NOOJEE_URL": "https://noojee.invalid/rest",
        "AGI_BRIDGE_NOOJEE_API_KEY_FILE": str(key_file),
    }
    ran = await agi_bridge("check-config", env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    shown = json.loads(ran.stdout)
    assert shown["noojee_api_key"] == "***"
    assert shown["noojee_api_key_file"] == str(key_file)
    assert_no_secret(ran)


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o604, True), (0o640, False)])
async def test_check_config_warns_of_a_key_file_others_can_read(
    tmp_path: Path, base_env: dict[str, str], mode: int, warned: bool
) -> None:
    """A key file readable by every user is a warning (exit 0 still); group-readable is not."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    key_file.chmod(mode)
    env = base_env | {
        "AGI_BRIDGE_NOOJEE_URL": "https://noojee.invalid/rest",
        "AGI_BRIDGE_NOOJEE_API_KEY_FILE": str(key_file),
    }
    ran = await agi_bridge("check-config", env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    warning = (
        f"warning: noojee_api_key_file (AGI_BRIDGE_NOOJEE_API_KEY_FILE) {key_file} is readable "
        f"by every user (mode {mode:04o}): chmod 0600 it"
    )
    assert (warning in ran.stderr) is warned, ran.stderr
    assert ("warning:" in ran.stderr) is warned, ran.stderr
    assert_no_secret(ran)


async def test_serve_logs_a_key_file_others_can_read(
    tmp_path: Path, base_env: dict[str, str]
) -> None:
    """serve logs the same warning as it starts, like ssh for a private key."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    key_file.chmod(0o644)
    env = base_env | {
        "AGI_BRIDGE_NOOJEE_URL": "https://noojee.invalid/rest",
        "AGI_BRIDGE_NOOJEE_API_KEY_FILE": str(key_file),
        "AGI_BRIDGE_LISTEN": "127.0.0.1:0",
        "AGI_BRIDGE_METRICS_LISTEN": "",
        "AGI_BRIDGE_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agi_bridge",
        "serve",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    assert process.stderr is not None
    events = []
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            while (line := await process.stderr.readline()) and "listening" not in line.decode():
                events.append(json.loads(line))
    finally:
        process.terminate()
        await process.wait()
    (warning,) = [e for e in events if e["event"] == "settings.warning"]
    assert warning["level"] == "warning"
    assert f"{key_file} is readable by every user (mode 0644)" in warning["problem"]


async def test_check_config_problems_exit_2_all_listed(
    tmp_path: Path, base_env: dict[str, str]
) -> None:
    """Every problem is on stderr, one per line, exit 2, nothing on stdout, no traceback."""
    config = tmp_path / "agi-bridge.toml"
    config.write_text('stop_budget = "soon"\nlistn = "1.2.3.4:1"\n', encoding="utf-8")
    env = base_env | {"AGI_BRIDGE_LISTEN": "0.0.0.0:4573", "AGI_BRIDGE_NOOJEE_AUTH": "basic"}
    ran = await agi_bridge("--config", str(config), "check-config", env=env, cwd=tmp_path)
    assert ran.returncode == 2
    assert ran.stdout == ""
    assert_no_traceback(ran)
    problems = [line for line in ran.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 6, ran.stderr
    for expected in (
        f"stop_budget (AGI_BRIDGE_STOP_BUDGET, from {config}): Input should be a valid number",
        f"listn: unknown setting in {config}; did you mean listen?",
        "noojee_url (AGI_BRIDGE_NOOJEE_URL): Field required",
        "noojee_auth (AGI_BRIDGE_NOOJEE_AUTH, from the environment)",
        "no API key",
        "listen (AGI_BRIDGE_LISTEN, from the environment) 0.0.0.0:4573 is not loopback",
    ):
        assert any(p.startswith(f"  - {expected}") for p in problems), (expected, ran.stderr)


async def test_check_config_invalid_toml(tmp_path: Path, env: dict[str, str]) -> None:
    """A TOML syntax error is reported with the file name, exit 2, no traceback."""
    config = tmp_path / "broken.toml"
    config.write_text("stop_budget = = 1\n", encoding="utf-8")
    ran = await agi_bridge("--config", str(config), "check-config", env=env, cwd=tmp_path)
    assert ran.returncode == 2
    assert f"config file {config} is not valid TOML" in ran.stderr
    assert_no_traceback(ran)


# Every way of writing the key into noojee_url: user and key, the key as user, the key as
# the query's apiKey, under another name, and in a fragment.
URLS_WITH_THE_KEY = (
    f"https://fred:{KEY}@noojee.example/servicemanager/rest",
    f"https://{KEY}@noojee.example/servicemanager/rest",
    f"https://noojee.example/servicemanager/rest?apiKey={KEY}",
    f"https://noojee.example/servicemanager/rest?token={KEY}",
    f"https://noojee.example/servicemanager/rest#{KEY}",
)


@pytest.mark.parametrize("command", ["check-config", "serve", "send"])
@pytest.mark.parametrize("url", URLS_WITH_THE_KEY)
async def test_a_key_in_noojee_url_is_refused_and_never_shown(
    tmp_path: Path, env: dict[str, str], command: str, url: str
) -> None:
    """A key written into noojee_url: check-config, serve and send refuse it with exit 2 and
    say where the key goes, showing the URL masked; no traceback, the key nowhere."""
    args = ("send", "stop", "--extension", "410", "--agent", "Fred") if command == "send" else ()
    ran = await agi_bridge(
        *(args or (command,)), env=env | {"AGI_BRIDGE_NOOJEE_URL": url}, cwd=tmp_path
    )
    assert ran.returncode == 2, ran
    assert_no_secret(ran)
    assert_no_traceback(ran)
    assert "noojee_url (AGI_BRIDGE_NOOJEE_URL, from the environment): " in ran.stderr
    assert "noojee.example/servicemanager/rest" in ran.stderr  # the rest is shown
    assert "put the key in noojee_api_key_file" in ran.stderr
    assert not (tmp_path / "data").exists()  # serve touched nothing


def test_documented_agents_are_the_demos() -> None:
    """Every agent the README and the dialplan's docs name is one the demo simulator knows, case
    included, so each example works against `agi-bridge demo` as written."""
    known = set(SimulatorConfig().agents)
    documents = ("README.md", "dialplan/README.md", "dialplan/extensions.conf")
    named = {
        (document, match)
        for document in documents
        for match in DOCUMENTED_AGENT.findall((REPO / document).read_text(encoding="utf-8"))
    }
    assert {agent for _, agent in named} >= {"Fred", "Pebbles"}  # the pattern finds them
    assert {(document, agent) for document, agent in named if agent not in known} == set()


# --- spool ---------------------------------------------------------------------------------


@pytest.fixture
async def prepared_spool(tmp_path: Path) -> dict[str, int]:
    """A data directory with two pending entries and two dead letters; returns their ids."""
    spool = Spool(tmp_path / "data", fsync=False)
    spool.open()
    try:
        ids = {
            "pending_stop": await spool.add(
                RecordingRequest("stop", "410", agent="Fred"), call_uniqueid="1.1"
            ),
            "pending_start": await spool.add(
                RecordingRequest("start", "1795811316.2", tag="CRM"), call_uniqueid="1.2"
            ),
            "dead_a": await spool.add(
                RecordingRequest("stop", "411", agent="Pebbles"), call_uniqueid="1.3"
            ),
            "dead_b": await spool.add(
                RecordingRequest("stop", "412", agent="Barney"), call_uniqueid="1.4"
            ),
        }
        await spool.reschedule(ids["pending_stop"], "HTTP 503", retry_at=0)
        await spool.dead_letter(ids["dead_a"], "Permission denied")
        await spool.dead_letter(ids["dead_b"], "Unknown agent")
    finally:
        spool.close()
    return ids


def spool_contents(data_dir: Path) -> tuple[list[str], list[str]]:
    spool = Spool(data_dir, fsync=False)
    spool.open()
    try:
        return (
            [e.request.target for e in spool.admin.list("pending")],
            [e.request.target for e in spool.admin.list("dead")],
        )
    finally:
        spool.close()


def rows(stdout: str) -> dict[int, list[str]]:
    """The table of ``spool list`` by id (first column)."""
    table: dict[int, list[str]] = {}
    for line in stdout.splitlines():
        words = line.split()
        if words and words[0].isdigit():
            table[int(words[0])] = words
    return table


async def test_spool_list_pending_and_dead(
    tmp_path: Path, env: dict[str, str], prepared_spool: dict[str, int]
) -> None:
    """spool list shows pending entries (with attempts and error), --dead the dead letters."""
    ran, dead = await asyncio.gather(
        agi_bridge("spool", "list", env=env, cwd=tmp_path),
        agi_bridge("spool", "list", "--dead", env=env, cwd=tmp_path),
    )
    assert ran.returncode == 0, ran.stderr
    table = rows(ran.stdout)
    assert set(table) == {prepared_spool["pending_stop"], prepared_spool["pending_start"]}
    stop = table[prepared_spool["pending_stop"]]
    assert stop[1:4] == ["stop", "410", "Fred"]
    assert stop[-3:] == ["1", "HTTP", "503"]  # tries, then the last error
    assert table[prepared_spool["pending_start"]][1:4] == ["start", "1795811316.2", "-"]
    assert "pending 2" in ran.stdout
    assert "dead letters 2" in ran.stdout

    assert dead.returncode == 0, dead.stderr
    table = rows(dead.stdout)
    assert set(table) == {prepared_spool["dead_a"], prepared_spool["dead_b"]}
    assert " ".join(table[prepared_spool["dead_a"]]).endswith("Permission denied")
    assert_no_secret(ran)
    assert_no_secret(dead)


async def test_spool_retry_one_then_all(
    tmp_path: Path, env: dict[str, str], prepared_spool: dict[str, int]
) -> None:
    """spool retry ID moves that dead letter back; without ids it moves all of them."""
    data = tmp_path / "data"
    ran = await agi_bridge("spool", "retry", str(prepared_spool["dead_b"]), env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("1 dead letter(s) moved back to pending")
    assert spool_contents(data) == (["410", "1795811316.2", "412"], ["411"])

    ran = await agi_bridge("spool", "retry", env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("1 dead letter(s)")
    assert spool_contents(data) == (["410", "1795811316.2", "411", "412"], [])  # ids kept


async def test_spool_retry_keeps_ids_and_refuses_unknown_ones(
    tmp_path: Path, env: dict[str, str], prepared_spool: dict[str, int]
) -> None:
    """retry prints the ids it moved, which a following purge finds; an unknown id: exit 1."""
    dead_b = prepared_spool["dead_b"]
    ran = await agi_bridge("spool", "retry", str(dead_b), env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith(f"1 dead letter(s) moved back to pending, same ids: {dead_b};")
    ran = await agi_bridge("spool", "purge", str(dead_b), env=env, cwd=tmp_path)
    assert (ran.returncode, ran.stdout.strip()) == (0, "1 pending entry deleted for good")

    for command in (("retry", "99"), ("purge", "--dead", "99")):
        ran = await agi_bridge("spool", *command, env=env, cwd=tmp_path)
        assert ran.returncode == 1, command
        assert ran.stderr == (
            "agi-bridge: no dead letter with id 99: `agi-bridge spool list --dead` shows them\n"
        )
        assert_no_traceback(ran)
    assert spool_contents(tmp_path / "data") == (["410", "1795811316.2"], ["411"])


async def test_spool_commands_need_only_the_data_dir(
    tmp_path: Path, base_env: dict[str, str], prepared_spool: dict[str, int]
) -> None:
    """spool list runs with nothing but the data dir: no noojee_url, no API key."""
    ran = await agi_bridge("spool", "list", env=base_env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert set(rows(ran.stdout)) == {
        prepared_spool["pending_stop"],
        prepared_spool["pending_start"],
    }


def _previous_release_spool(data: Path) -> Path:
    """tests/fixtures/spool-v0.sqlite3 (made by the release before schema versions) as
    ``data``'s spool."""
    data.mkdir(parents=True, exist_ok=True)
    spool_file = data / SPOOL_FILE
    spool_file.write_bytes((Path(__file__).parent / "fixtures" / "spool-v0.sqlite3").read_bytes())
    return spool_file


async def test_spool_commands_leave_a_previous_release_spool_to_the_bridge(
    tmp_path: Path, base_env: dict[str, str]
) -> None:
    """A spool of the previous release (which may still be serving: it takes no lock) is not
    migrated by `spool list`: the command says to start the new bridge, which migrates it
    under its lock, and the file keeps schema 0."""
    spool_file = _previous_release_spool(Path(base_env["AGI_BRIDGE_DATA_DIR"]))
    ran = await agi_bridge("spool", "list", env=base_env, cwd=tmp_path)
    assert ran.returncode == 1
    assert "written by the previous release: start this one's bridge once" in ran.stderr
    assert_no_traceback(ran)
    with contextlib.closing(sqlite3.connect(spool_file)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (0,)


async def test_spool_purge(
    tmp_path: Path, env: dict[str, str], prepared_spool: dict[str, int]
) -> None:
    """spool purge deletes named pending entries or --dead --all; with neither it refuses."""
    data = tmp_path / "data"
    ran = await agi_bridge("spool", "purge", env=env, cwd=tmp_path)
    assert ran.returncode == 1
    assert "pass --all" in ran.stderr
    assert spool_contents(data) == (["410", "1795811316.2"], ["411", "412"])

    ran = await agi_bridge(
        "spool", "purge", str(prepared_spool["pending_start"]), env=env, cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "1 pending entry deleted for good"
    assert spool_contents(data) == (["410"], ["411", "412"])

    ran = await agi_bridge("spool", "purge", "--dead", "--all", env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "2 dead entries deleted for good"
    assert spool_contents(data) == (["410"], [])


async def test_spool_unusable_data_dir_exit_1(tmp_path: Path, env: dict[str, str]) -> None:
    """A data directory that cannot be created: exit 1, the path in the message, no traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ran = await agi_bridge(
        "spool", "list", env=env | {"AGI_BRIDGE_DATA_DIR": str(blocker / "data")}, cwd=tmp_path
    )
    assert ran.returncode == 1
    assert str(blocker / "data") in ran.stderr
    assert_no_traceback(ran)


async def test_spool_commands_refuse_a_data_dir_without_a_spool(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A mistyped data directory: exit 1 naming the path, and nothing created there (an empty
    spool would show nothing and look like "nothing pending")."""
    missing = tmp_path / "var" / "lib" / "agi-brigde"
    for command in (("list",), ("retry",), ("purge", "--dead", "--all")):
        ran = await agi_bridge(
            "spool", *command, env=env | {"AGI_BRIDGE_DATA_DIR": str(missing)}, cwd=tmp_path
        )
        assert ran.returncode == 1, command
        assert f"no spool at {missing / 'spool.sqlite3'}: check data_dir" in ran.stderr
        assert_no_traceback(ran)
    assert not (tmp_path / "var").exists()


# --- send, against the simulator over real HTTPS -----------------------------------------


@pytest.fixture
async def simulator(server_ssl_context: ssl.SSLContext) -> AsyncIterator[NoojeeSimulator]:
    async with NoojeeSimulator(SimulatorConfig(api_key=KEY)) as sim:
        await sim.stop()  # __aenter__ listens on plain HTTP: restart it with TLS
        await sim.start(ssl_context=server_ssl_context)
        yield sim


@pytest.fixture
def send_env(base_env: dict[str, str], simulator: NoojeeSimulator, ca_file: Path) -> dict[str, str]:
    return base_env | {
        "AGI_BRIDGE_NOOJEE_URL": simulator.base_url,
        "AGI_BRIDGE_NOOJEE_API_KEY": KEY,
        "AGI_BRIDGE_NOOJEE_CA_FILE": str(ca_file),
        "AGI_BRIDGE_LOG_LEVEL": "debug",  # every log line the command can emit is checked
    }


async def test_send_stop_apikey(
    tmp_path: Path, simulator: NoojeeSimulator, send_env: dict[str, str]
) -> None:
    """send stop POSTs extenOrUniqueId and agentLoginName with the key; exit 0."""
    assert simulator.base_url.startswith("https://127.0.0.1:")
    ran = await agi_bridge(
        "send", "stop", "--extension", "410", "--agent", "Fred", env=send_env, cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stderr
    (received,) = simulator.received
    assert (received.method, received.path) == ("POST", STOP_PATH)
    assert dict(received.params) == {
        "extenOrUniqueId": "410",
        "agentLoginName": "Fred",
        "apiKey": KEY,
    }
    assert received.auth == "apikey"
    assert (received.http_status, received.answered_code) == (200, 0)
    assert "Recording stopped" in ran.stdout
    assert_no_secret(ran)


async def test_send_stop_hash(
    tmp_path: Path, simulator: NoojeeSimulator, send_env: dict[str, str]
) -> None:
    """With noojee_auth=hash, send fetches Time and sends a valid hash, never the key."""
    ran = await agi_bridge(
        "send",
        "stop",
        "--uniqueid",
        "1795811316.1",
        "--agent",
        "Fred",
        env=send_env | {"AGI_BRIDGE_NOOJEE_AUTH": "hash"},
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    time_request, stop = simulator.received
    assert time_request.path.endswith("/Time")
    assert stop.path == STOP_PATH
    assert stop.auth == "hash"
    assert "apiKey" not in stop.params
    stamp = stop.params["timeStamp"]
    assert stop.params["hash"] == hashlib.sha256(f"{KEY}:{stamp}".encode()).hexdigest()
    assert stop.params["extenOrUniqueId"] == "1795811316.1"
    assert_no_secret(ran)
    assert stop.params["hash"] not in ran.stdout + ran.stderr


async def test_send_permission_denied_exit_1(
    tmp_path: Path, simulator: NoojeeSimulator, send_env: dict[str, str]
) -> None:
    """A NoojeeContact error (Pebbles may not stop) is printed as permanent, exit 1."""
    ran = await agi_bridge(
        "send", "stop", "--extension", "410", "--agent", "Pebbles", env=send_env, cwd=tmp_path
    )
    assert ran.returncode == 1
    (received,) = simulator.received
    assert received.params["agentLoginName"] == "Pebbles"
    assert received.answered_code == -1
    assert "Permission denied" in ran.stdout
    assert "permanent" in ran.stderr
    assert_no_traceback(ran)
    assert_no_secret(ran)


async def test_send_untrusted_certificate_exit_1(
    tmp_path: Path, simulator: NoojeeSimulator, send_env: dict[str, str]
) -> None:
    """Without the CA file the simulator's certificate is refused: nothing sent, exit 1."""
    env = {k: v for k, v in send_env.items() if k != "AGI_BRIDGE_NOOJEE_CA_FILE"}
    ran = await agi_bridge(
        "send", "stop", "--extension", "410", "--agent", "Fred", env=env, cwd=tmp_path
    )
    assert ran.returncode == 1
    assert simulator.received == []
    assert_no_traceback(ran)
    assert_no_secret(ran)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("stop", "--extension", "410"), "stop needs an agent"),
        (("stop", "--uniqueid", "1.1", "--agent", "Fred", "--tag", "T"), "tag is only accepted"),
        (("start", "--extension", "410", "--agent", "Fr\x01ed"), "agent contains control"),
    ],
)
async def test_send_refuses_what_a_call_could_not_send(
    tmp_path: Path,
    simulator: NoojeeSimulator,
    send_env: dict[str, str],
    argv: tuple[str, ...],
    reason: str,
) -> None:
    """send makes the AGI route's checks: a stop without agent or with a tag is not sent."""
    ran = await agi_bridge("send", *argv, env=send_env, cwd=tmp_path)
    assert ran.returncode == 1
    assert ran.stderr.startswith(f"agi-bridge: not sent: {reason}"), ran.stderr
    assert simulator.received == []
    assert_no_traceback(ran)


async def test_send_takes_the_agent_from_the_settings_as_a_call_does(
    tmp_path: Path, simulator: NoojeeSimulator, send_env: dict[str, str]
) -> None:
    """send without --agent looks the extension up in agents, as the AGI route does."""
    env = send_env | {"AGI_BRIDGE_AGENTS": '{"410": "Wilma"}'}
    ran = await agi_bridge("send", "stop", "--extension", "410", env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    (received,) = simulator.received
    assert received.params["agentLoginName"] == "Wilma"


async def test_send_bad_config_exit_2(tmp_path: Path, base_env: dict[str, str]) -> None:
    """send with an unusable configuration exits 2 before sending anything."""
    ran = await agi_bridge(
        "send", "stop", "--extension", "410", "--agent", "Fred", env=base_env, cwd=tmp_path
    )
    assert ran.returncode == 2
    assert "noojee_url" in ran.stderr
    assert_no_traceback(ran)


# --- fake-call ----------------------------------------------------------------------------


async def test_fake_call_says_the_bridge_is_not_listening(
    tmp_path: Path, base_env: dict[str, str]
) -> None:
    """fake-call to a port nobody listens on says connection refused at host:port, exit 1."""
    with socket.socket() as probe:  # a port that was free a moment ago, and is closed now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ran = await agi_bridge(
        "fake-call",
        "recording/stop",
        "Fred",
        "--to",
        f"127.0.0.1:{port}",
        env=base_env,
        cwd=tmp_path,
    )
    assert ran.returncode == 1
    assert ran.stdout == "AGISTATUS=FAILURE\n"
    assert (
        f"agi-bridge: connection refused at 127.0.0.1:{port}: is the bridge running" in ran.stderr
    )


async def test_fake_call_says_the_bridge_refused_the_session(
    tmp_path: Path, base_env: dict[str, str], simulator: NoojeeSimulator, ca_file: Path
) -> None:
    """fake-call from outside allow_clients says the bridge answered failure, and why it may."""
    settings = make_settings(simulator, ca_file, tmp_path / "data", allow_clients=["10.0.0.5"])
    async with running_bridge(settings) as bridge:
        to = f"127.0.0.1:{bridge.server.port}"
        ran = await agi_bridge(
            "fake-call", "recording/stop", "Fred", "--to", to, env=base_env, cwd=tmp_path
        )
    assert ran.returncode == 1
    assert ran.stdout == "AGISTATUS=FAILURE\n"
    assert (
        f"agi-bridge: the bridge at {to} refused the session (it answered 'failure'): "
        "not in allow_clients" in ran.stderr
    )
    assert simulator.received == []


async def test_spool_list_shows_kinds_and_why_and_retry_refuses_the_risky(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """spool list shows each entry's target kind and why a dead letter was settled; retry
    refuses an unconfirmed start or an expired request by extension, saying why, unless
    --force."""
    data = tmp_path / "data"
    spool = Spool(data, fsync=False)
    spool.open()
    try:
        start = await spool.add(RecordingRequest("start", "1795811316.2"), call_uniqueid="1.1")
        await spool.dead_letter(start, "timed out waiting for the answer", reason="unconfirmed")
        ext = await spool.add(
            RecordingRequest("stop", "410", agent="Fred", kind="extension"), call_uniqueid="1.2"
        )
        await spool.dead_letter(ext, "expired", reason="expired")
    finally:
        spool.close()
    listed = await agi_bridge("spool", "list", "--dead", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    table = rows(listed.stdout)
    assert table[start][4] == "uniqueid"
    assert table[start][7] == "unconfirmed"
    assert (table[ext][4], table[ext][7]) == ("extension", "expired")
    assert "dead letters 1" in listed.stdout  # the expired one needs nobody

    refused = await agi_bridge("spool", "retry", env=env, cwd=tmp_path)
    assert refused.returncode == 1
    assert f"{start}: unconfirmed start" in refused.stderr
    assert f"{ext}: expired request by extension" in refused.stderr
    assert "--force" in refused.stderr
    assert_no_traceback(refused)
    assert spool_contents(data) == ([], ["1795811316.2", "410"])
    forced = await agi_bridge("spool", "retry", "--force", str(start), env=env, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert spool_contents(data) == (["1795811316.2"], ["410"])
