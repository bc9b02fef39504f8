"""Settings: one TOML file plus AGI_BRIDGE_* overrides, every problem reported in one go."""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
from pathlib import Path

import pytest

from agi_bridge.app import delivery_config
from agi_bridge.calls import CallDefaults
from agi_bridge.delivery.config import DeliveryConfig
from agi_bridge.loading import TOOLS_ENV_PREFIX, load_settings
from agi_bridge.noojee import NoojeeClient
from agi_bridge.settings import Address, ConfigError, Settings, env_name

KEY = "f863246a-973e-11e6-8784-08002718f5b5"
URL = "https://pbx.example/servicemanager/rest"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AGI_BRIDGE_* variable of the developer's shell reaches these tests."""
    for name in list(os.environ):
        if name.upper().startswith("AGI_BRIDGE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def minimal_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two settings without a default: where NoojeeContact is and its key."""
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", URL)
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY", KEY)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agi-bridge.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(config_file: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file)
    return caught.value.problems


def test_toml_file_is_read(tmp_path: Path) -> None:
    """Every kind of value (str, float, table, list) comes through from the TOML file."""
    path = write_toml(
        tmp_path,
        f"""
        noojee_url = "{URL}/"
        noojee_api_key = "{KEY}"
        noojee_auth = "hash"
        stop_budget = 0.5
        default_by = "uniqueid"
        allow_clients = ["10.0.0.5", "192.168.1.0/24"]
        [agents]
        410 = "Fred"
        """,
    )
    settings = load_settings(path)
    assert settings.noojee_url == URL  # trailing slash dropped
    assert settings.api_key == KEY
    assert settings.noojee_auth == "hash"
    assert settings.stop_budget == 0.5
    assert settings.default_by == "uniqueid"
    assert settings.agents == {"410": "Fred"}
    assert settings.allow_clients == (
        ipaddress.ip_network("10.0.0.5/32"),
        ipaddress.ip_network("192.168.1.0/24"),
    )


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AGI_BRIDGE_CONFIG names the file when no path is passed."""
    path = write_toml(tmp_path, f'noojee_url = "{URL}"\nnoojee_api_key = "{KEY}"\n')
    monkeypatch.setenv("AGI_BRIDGE_CONFIG", str(path))
    assert load_settings().noojee_url == URL


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable set in the environment wins over the same key in the file."""
    path = write_toml(
        tmp_path,
        """
        noojee_url = "https://file.example/rest"
        noojee_api_key = "file-key"
        default_by = "uniqueid"
        stop_budget = 0.5
        default_agent = "Wilma"
        [agents]
        410 = "Fred"
        """,
    )
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", URL)
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY", KEY)
    monkeypatch.setenv("AGI_BRIDGE_DEFAULT_BY", "id")
    monkeypatch.setenv("AGI_BRIDGE_STOP_BUDGET", "2.5")
    monkeypatch.setenv("AGI_BRIDGE_AGENTS", '{"411": "Barney"}')
    settings = load_settings(path)
    assert settings.noojee_url == URL
    assert settings.api_key == KEY
    assert settings.default_by == "id"
    assert settings.stop_budget == 2.5
    assert settings.agents == {"411": "Barney"}
    assert settings.default_agent == "Wilma"  # not overridden: the file's value stays


def test_environment_alone_is_enough(minimal_env: None) -> None:
    """Without a file, the environment and the defaults make valid settings."""
    settings = load_settings()
    assert settings.listen_address == Address("127.0.0.1", 4573)
    assert settings.default_by == "extension"
    assert settings.api_key == KEY


def test_every_problem_reported_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad values, unknown keys, a missing noojee_url and the missing key come in one error."""
    path = write_toml(
        tmp_path,
        """
        stop_budget = "soon"
        default_by = "phone"
        listn = "127.0.0.1:4573"
        """,
    )
    monkeypatch.setenv("AGI_BRIDGE_MAX_SESSIONS", "0")
    problems = problems_of(path)
    joined = "\n".join(problems)
    for expected in (
        f"stop_budget (AGI_BRIDGE_STOP_BUDGET, from {path}):",
        f"default_by (AGI_BRIDGE_DEFAULT_BY, from {path}):",
        "max_sessions (AGI_BRIDGE_MAX_SESSIONS, from the environment):",
    ):
        assert any(p.startswith(expected) for p in problems), joined
    assert any(p.startswith("listn") and "unknown setting" in p for p in problems), joined
    assert any(p.startswith("noojee_url") and "required" in p for p in problems), joined
    # A cross-field check (no API key at all) is reported with the field errors, not after.
    assert any(p.startswith("no API key") for p in problems), joined


def test_cross_field_problems_join_field_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unsafe listener and plain http:// are reported next to an unrelated bad value."""
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", "http://pbx.example/rest")
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY", KEY)
    monkeypatch.setenv("AGI_BRIDGE_LISTEN", "0.0.0.0:4573")
    monkeypatch.setenv("AGI_BRIDGE_LOG_LEVEL", "loud")
    problems = problems_of()
    assert len(problems) == 3, problems
    assert problems[0].startswith("log_level")
    assert any("plain http://" in p for p in problems)
    assert any("not loopback and allow_clients is empty" in p for p in problems)


def test_failed_field_does_not_cause_a_second_misleading_problem(
    minimal_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad allow_clients entry is one problem, not also 'allow_clients is empty'."""
    monkeypatch.setenv("AGI_BRIDGE_LISTEN", "0.0.0.0:4573")
    monkeypatch.setenv("AGI_BRIDGE_ALLOW_CLIENTS", "10.0.0.5, 10.0.0.300")
    problems = problems_of()
    assert len(problems) == 1, problems
    assert problems[0].startswith("allow_clients (AGI_BRIDGE_ALLOW_CLIENTS, from the environment):")
    assert "'10.0.0.300' is not an address or network" in problems[0]


def test_bad_agents_json_in_environment_is_a_problem(
    minimal_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AGI_BRIDGE_AGENTS that is not JSON is reported, with the other problems, not raised."""
    monkeypatch.setenv("AGI_BRIDGE_AGENTS", "410=Fred")
    monkeypatch.setenv("AGI_BRIDGE_START_MODE", "later")
    problems = problems_of()
    assert len(problems) == 2, problems
    assert any(
        p.startswith("agents (AGI_BRIDGE_AGENTS, from the environment): not a JSON object")
        for p in problems
    )
    assert any(p.startswith("start_mode") for p in problems)


def test_invalid_toml_names_file_and_reason(tmp_path: Path) -> None:
    """A syntax error in the file says which file and what is wrong with it."""
    path = write_toml(tmp_path, 'noojee_url = "https://x\nstop_budget = 1\n')
    problems = problems_of(path)
    assert any(str(path) in p and "is not valid TOML" in p for p in problems), problems
    toml_problem = next(p for p in problems if "TOML" in p)
    assert "line 1" in toml_problem  # tomllib's reason, with the position


def test_missing_config_file_is_a_problem(tmp_path: Path, minimal_env: None) -> None:
    """A config path that does not exist is reported rather than silently ignored."""
    missing = tmp_path / "nope.toml"
    problems = problems_of(missing)
    assert problems == [f"config file {missing} does not exist (set AGI_BRIDGE_CONFIG or --config)"]


def test_api_key_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key file's first line, stripped, is the key; later lines are ignored."""
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}  \nsecond line\n", encoding="utf-8")
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", URL)
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY_FILE", str(key_file))
    assert load_settings().api_key == KEY


def test_key_and_key_file_together_is_a_problem(
    tmp_path: Path, minimal_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sources for the key are refused rather than one silently winning."""
    key_file = tmp_path / "key"
    key_file.write_text("other-key\n", encoding="utf-8")
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY_FILE", str(key_file))
    [problem] = problems_of()
    assert problem.startswith(
        "both noojee_api_key (AGI_BRIDGE_NOOJEE_API_KEY, from the environment) and "
        "noojee_api_key_file (AGI_BRIDGE_NOOJEE_API_KEY_FILE, from the environment) are set"
    )


def test_api_key_from_environment(minimal_env: None) -> None:
    """AGI_BRIDGE_NOOJEE_API_KEY is taken as is."""
    assert load_settings().api_key == KEY


@pytest.mark.parametrize(
    ("content", "expected"),
    [("", "is empty"), ("\n\n", "is empty"), ("   \nkey-on-line-2\n", "is empty")],
)
def test_empty_key_file_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, expected: str
) -> None:
    """A key file whose first line is blank is refused, not read as an empty key."""
    key_file = tmp_path / "key"
    key_file.write_text(content, encoding="utf-8")
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", URL)
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY_FILE", str(key_file))
    assert problems_of() == [
        f"noojee_api_key_file (AGI_BRIDGE_NOOJEE_API_KEY_FILE, from the environment) {key_file}"
        f" {expected}"
    ]


def test_missing_key_file_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key file that does not exist is reported with its path and the reason."""
    key_file = tmp_path / "no-such-key"
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", URL)
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY_FILE", str(key_file))
    problems = problems_of()
    assert len(problems) == 1
    assert str(key_file) in problems[0]
    assert "No such file" in problems[0]


def test_no_key_at_all_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither a key nor a key file: the problem names both ways to give one."""
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", URL)
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY", "")
    (problem,) = problems_of()
    assert "AGI_BRIDGE_NOOJEE_API_KEY_FILE" in problem
    assert "AGI_BRIDGE_NOOJEE_API_KEY" in problem


def test_non_loopback_listen_without_allow_list_refused(
    minimal_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listening on a LAN address with nobody allowed and no override is refused."""
    monkeypatch.setenv("AGI_BRIDGE_LISTEN", "10.0.0.2:4573")
    (problem,) = problems_of()
    assert problem.startswith(
        "listen (AGI_BRIDGE_LISTEN, from the environment) 10.0.0.2:4573 is not loopback"
    )
    assert "AGI_BRIDGE_ALLOW_CLIENTS" in problem
    assert "AGI_BRIDGE_LISTEN_UNRESTRICTED" in problem


@pytest.mark.parametrize("listen", ["0.0.0.0:4573", "[::]:4573", "pbx.example:4573"])
def test_wildcard_and_names_count_as_non_loopback(
    minimal_env: None, monkeypatch: pytest.MonkeyPatch, listen: str
) -> None:
    """Wildcards and host names other than localhost are not treated as loopback."""
    monkeypatch.setenv("AGI_BRIDGE_LISTEN", listen)
    (problem,) = problems_of()
    assert "is not loopback" in problem


def test_non_loopback_listen_with_allow_clients_accepted(
    minimal_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allow-list makes a non-loopback listener acceptable; the env string is split on ','."""
    monkeypatch.setenv("AGI_BRIDGE_LISTEN", "0.0.0.0:4573")
    monkeypatch.setenv("AGI_BRIDGE_ALLOW_CLIENTS", " 10.0.0.5 ,192.168.1.0/24,,fd00::/8 ")
    settings = load_settings()
    assert settings.allow_clients == (
        ipaddress.ip_network("10.0.0.5/32"),
        ipaddress.ip_network("192.168.1.0/24"),
        ipaddress.ip_network("fd00::/8"),
    )


def test_non_loopback_listen_unrestricted_accepted(
    minimal_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The explicit override allows a non-loopback listener without an allow-list."""
    monkeypatch.setenv("AGI_BRIDGE_LISTEN", "0.0.0.0:4573")
    monkeypatch.setenv("AGI_BRIDGE_LISTEN_UNRESTRICTED", "true")
    settings = load_settings()
    assert settings.listen_unrestricted is True
    assert settings.allow_clients == ()


@pytest.mark.parametrize("listen", ["127.0.0.1:4573", "127.0.0.2:4573", "[::1]:4573"])
def test_loopback_listen_needs_no_allow_list(
    minimal_env: None, monkeypatch: pytest.MonkeyPatch, listen: str
) -> None:
    """Loopback listeners (IPv4 and IPv6) are accepted without an allow-list."""
    monkeypatch.setenv("AGI_BRIDGE_LISTEN", listen)
    assert str(load_settings().listen_address) == listen


def test_plain_http_to_remote_host_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """http:// to anything but loopback would send the key in clear: refused."""
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY", KEY)
    for url in (
        "http://pbx.example/rest",
        "http://10.0.0.1:8080/rest",
        "http://127.0.0.1.evil.example/rest",
        "http://127.0.0.1@evil.example/rest",
    ):
        monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", url)
        (problem,) = problems_of()
        assert "plain http://" in problem, url


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8089/rest", "http://localhost/rest", "http://[::1]:8089/rest"],
)
def test_plain_http_to_loopback_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """http:// to a simulator on loopback is allowed."""
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY", KEY)
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", url)
    assert load_settings().noojee_url == url


def test_url_without_scheme_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A base URL that is neither https:// nor http:// is a field error."""
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY", KEY)
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", "pbx.example/rest")
    (problem,) = problems_of()
    assert problem.startswith("noojee_url (AGI_BRIDGE_NOOJEE_URL, from the environment):")
    assert "must start with https://" in problem


def test_masked_never_contains_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """masked() hides the key, whether it came from the environment or from a file."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", URL)
    for name, value in (
        ("AGI_BRIDGE_NOOJEE_API_KEY", KEY),
        ("AGI_BRIDGE_NOOJEE_API_KEY_FILE", str(key_file)),
    ):
        monkeypatch.setenv(name, value)
        settings = load_settings()
        assert settings.api_key == KEY
        masked = settings.masked()
        assert masked["noojee_api_key"] == "***"
        assert KEY not in json.dumps(masked)
        assert KEY not in repr(settings)
        assert KEY not in str(settings)
        monkeypatch.delenv(name)


def test_masked_is_plain_data(minimal_env: None) -> None:
    """masked() gives JSON-able values for check-config (paths and networks as strings)."""
    data = load_settings().masked()
    assert json.loads(json.dumps(data)) == data
    assert data["listen"] == "127.0.0.1:4573"
    assert set(data) == set(Settings.model_fields)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:4573", "127.0.0.1", 4573),
        ("[::1]:4573", "::1", 4573),
        ("[fe80::1]:0", "fe80::1", 0),
        ("localhost:65535", "localhost", 65535),
        ("pbx.example:80", "pbx.example", 80),
    ],
)
def test_address_parse(text: str, host: str, port: int) -> None:
    """host:port and [IPv6]:port parse and print back unchanged."""
    address = Address.parse(text)
    assert address == Address(host, port)
    assert str(address) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1",
        "127.0.0.1:",
        ":4573",
        "127.0.0.1:port",
        "127.0.0.1:-1",
        "127.0.0.1:65536",
        "127.0.0.1:²",  # a digit to str.isdigit(), not to int()
        "::1",  # unbracketed IPv6: which colon starts the port?
        "::1:4573",
        "[::1]",
        "[::1:4573",
        "[]:4573",
    ],
)
def test_address_parse_errors(text: str) -> None:
    """Anything that is not exactly host:port raises ValueError with an example of the form."""
    with pytest.raises(ValueError, match=r"not host:port|out of range"):
        Address.parse(text)


def test_address_loopback() -> None:
    """Loopback means 127/8, ::1 and localhost; wildcards and other names are not."""
    assert Address.parse("127.9.9.9:1").is_loopback
    assert Address.parse("[::1]:1").is_loopback
    assert Address.parse("localhost:1").is_loopback
    assert not Address.parse("0.0.0.0:1").is_loopback
    assert not Address.parse("[::]:1").is_loopback
    assert not Address.parse("localhost.example:1").is_loopback


def test_bad_listen_reported_with_env_name(
    minimal_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad listen address is a problem naming the setting and its variable."""
    monkeypatch.setenv("AGI_BRIDGE_LISTEN", "::1")
    (problem,) = problems_of()
    assert problem.startswith(
        "listen (AGI_BRIDGE_LISTEN, from the environment): '::1' is not host:port"
    )


def test_misspelt_environment_variable_is_a_problem(
    minimal_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo'd AGI_BRIDGE_* name is reported with the likely intended one, not ignored."""
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_CAFILE", "/etc/ca.pem")
    [problem] = problems_of()
    assert problem == (
        "unknown environment variable AGI_BRIDGE_NOOJEE_CAFILE "
        "(did you mean AGI_BRIDGE_NOOJEE_CA_FILE?)"
    )


def test_tool_variables_are_not_settings_problems(
    minimal_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variables under the prefix reserved for development tools (AGI_BRIDGE_DEV_), known to
    the bridge or not, are accepted; no setting may take that prefix."""
    monkeypatch.setenv("AGI_BRIDGE_DEV_ASTERISK_ROOT", "/var/cache/x")
    monkeypatch.setenv("AGI_BRIDGE_DEV_SOME_FUTURE_TOOL", "1")
    assert load_settings().noojee_url == URL
    names = [env_name(name) for name in Settings.model_fields]
    assert [name for name in names if name.startswith(TOOLS_ENV_PREFIX)] == []


def test_listen_addresses_are_parsed_once(minimal_env: None) -> None:
    """listen and metrics_listen become Address objects once, not at every read."""
    settings = load_settings()
    assert settings.listen_address is settings.listen_address
    assert settings.metrics_address is settings.metrics_address
    assert str(settings.listen_address) == settings.listen


def test_spool_commands_need_no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """for_noojee=False loads without any key, for `agi-bridge spool ...`."""
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_URL", URL)
    assert load_settings(for_noojee=False).noojee_api_key is None
    assert any("no API key" in p for p in problems_of())


def test_spool_commands_need_only_the_data_dir(tmp_path: Path) -> None:
    """for_noojee=False needs neither noojee_url nor a key: the data dir is all a spool needs."""
    path = write_toml(tmp_path, 'data_dir = "/var/lib/agi-bridge"\n')
    assert load_settings(path, for_noojee=False).data_dir == Path("/var/lib/agi-bridge")
    problems = problems_of(path)
    assert any(p.startswith("noojee_url (AGI_BRIDGE_NOOJEE_URL): Field required") for p in problems)


def test_unknown_key_suggests_and_lists_the_settings(tmp_path: Path, minimal_env: None) -> None:
    """An unknown key in the file names the file, the likely key and every valid key."""
    path = write_toml(tmp_path, 'noojee_ca_fiel = "ca.pem"\n')
    (problem,) = problems_of(path)
    assert problem.startswith(
        f"noojee_ca_fiel: unknown setting in {path}; did you mean noojee_ca_file?"
    )
    assert problem.endswith("the settings are: " + ", ".join(Settings.model_fields))


def test_settings_after_the_agents_table_are_named_as_such(tmp_path: Path) -> None:
    """Keys written after [agents] land in it (TOML): said plainly, not 'Field required'."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    path = write_toml(
        tmp_path,
        f"""
        [agents]
        "410" = "Fred"
        noojee_url = "{URL}"
        noojee_api_key_file = "{key_file}"
        """,
    )
    (problem,) = problems_of(path)
    assert problem == (
        f"noojee_url, noojee_api_key_file in {path} are inside the [agents] table: TOML puts "
        "every key written after the [agents] line into it. Move [agents] and its entries to "
        "the end of the file"
    )


def test_agents_entry_that_is_not_a_login_is_named(tmp_path: Path, minimal_env: None) -> None:
    """An [agents] value that is not a string is one problem saying what to write instead."""
    path = write_toml(tmp_path, '[agents]\n"410" = "Fred"\nstop_budgte = 2\n')
    (problem,) = problems_of(path)
    assert problem == (
        f"[agents] entry stop_budgte = 2 in {path} is not a login name: write "
        '"stop_budgte" = "Fred"; if it is a setting, it belongs before the [agents] line'
    )


def test_relative_paths_in_the_file_resolve_from_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Key file, CA file and data dir written relative in the file are taken from its folder."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "key").write_text(KEY + "\n", encoding="utf-8")
    (folder / "ca.pem").write_text("not parsed here\n", encoding="utf-8")
    path = folder / "agi-bridge.toml"
    path.write_text(
        f'noojee_url = "{URL}"\nnoojee_api_key_file = "key"\n'
        'noojee_ca_file = "./ca.pem"\ndata_dir = "spool"\n',
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)  # the working directory holds none of them
    settings = load_settings(path)
    assert settings.api_key == KEY
    assert settings.noojee_ca_file == folder / "ca.pem"
    assert settings.data_dir == folder / "spool"


def test_relative_paths_from_environment_and_defaults_stay_relative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths from the environment, and the default data dir, resolve from the working directory."""
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "agi-bridge.toml"
    path.write_text(f'noojee_url = "{URL}"\n', encoding="utf-8")
    (tmp_path / "key").write_text(KEY + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AGI_BRIDGE_NOOJEE_API_KEY_FILE", "key")
    settings = load_settings(path)
    assert settings.api_key == KEY
    assert settings.noojee_api_key_file == Path("key")
    assert settings.data_dir == Path("var")


def test_extension_requests_must_expire_within_the_repeat_window(
    minimal_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """extension_max_age above dedup_window is refused (a fresh press could meet the earlier
    request still queued); without a window (0) any validity is accepted."""
    monkeypatch.setenv("AGI_BRIDGE_EXTENSION_MAX_AGE", "90")
    [problem] = problems_of()
    assert problem.startswith("extension_max_age (AGI_BRIDGE_EXTENSION_MAX_AGE) is larger than")
    monkeypatch.setenv("AGI_BRIDGE_DEDUP_WINDOW", "0")
    assert load_settings().extension_max_age == 90


def test_parts_built_without_settings_start_from_the_settings_defaults(
    minimal_env: None,
) -> None:
    """Delivery's config objects, the call defaults and the NoojeeContact client, built
    without settings (a test, a script), start from a configured bridge's defaults."""
    settings = load_settings()
    assert delivery_config(settings) == DeliveryConfig()
    calls = CallDefaults()
    assert (calls.default_by, calls.default_agent, dict(calls.agents)) == (
        settings.default_by,
        settings.default_agent,
        settings.agents,
    )
    signature = inspect.signature(NoojeeClient)
    assert signature.parameters["max_connections"].default == settings.noojee_max_connections
    assert signature.parameters["connect_timeout"].default == settings.noojee_connect_timeout
    assert signature.parameters["request_timeout"].default == settings.noojee_timeout
