"""One settings object, built once at start-up and passed down.

Every setting has one name: the key in the TOML file and, upper-cased behind ``AGI_BRIDGE_``,
the environment variable that overrides it (``noojee_url`` / ``AGI_BRIDGE_NOOJEE_URL``).
The file is flat on purpose, so the settings table in the README is the whole story.

``load_settings`` reports every problem at once (unknown keys, bad values, missing secrets,
unsafe listening addresses) as a :class:`ConfigError`, so an operator fixes the file in one go.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from agi_bridge import defaults
from agi_bridge.defaults import CONFIG_ENV, ENV_PREFIX, env_name
from agi_bridge.redact import MASK
from agi_bridge.vocabulary import By, Mode

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Address:
    """A ``host:port`` pair; IPv6 hosts are written ``[::1]:4573``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, sep, port_text = text.rpartition(":")
        # An IPv6 host must be bracketed: "::1", "::1:80" and "[::1:80" are ambiguous or
        # broken, and "[]:80" has no host; all are refused rather than guessed at.
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host or "[" in host or "]" in host:
            host = ""
        # isascii: str.isdigit() is also true for "²", which int() then refuses.
        if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:4573 or [::1]:4573)")
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 0-65535")
        return cls(host, port)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name other than localhost may resolve anywhere

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Settings(BaseSettings):
    """Everything the bridge can be told. Field docs feed ``check-config`` and the README."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", case_sensitive=False
    )

    # --- FastAGI listener -------------------------------------------------------------------
    listen: str = Field(
        defaults.LISTEN,
        description="host:port of the FastAGI listener (4573 is Asterisk's default AGI port)",
    )
    allow_clients: Annotated[tuple[IPNetwork, ...], NoDecode] = Field(
        (),
        description="addresses/networks allowed to connect, comma separated; empty = any that "
        "can reach the listener (only safe on loopback)",
    )
    listen_unrestricted: bool = Field(
        False,
        description="allow a non-loopback listener without allow_clients (FastAGI has no "
        "authentication: anyone who reaches the port can stop recordings)",
    )
    metrics_listen: str = Field(
        defaults.METRICS_LISTEN,
        description="host:port for /metrics, /healthz, /readyz; empty disables",
    )
    # Asterisk sends the whole environment right after it connects: 2 s is generous on a LAN
    # and bounds what a silent or byte-a-second client can hold.
    environment_timeout: float = Field(
        2.0, gt=0, description="seconds to receive the AGI environment"
    )
    # Asterisk answers SET VARIABLE from memory; a slower reply means a stuck channel thread.
    command_timeout: float = Field(2.0, gt=0, description="seconds to wait for Asterisk's reply")
    # Each session is a socket plus ~10 KiB; 4096 stays far below the fd limit and memory while
    # covering the hangup burst of a large call centre.
    max_sessions: int = Field(
        4096, ge=1, description="concurrent AGI sessions; more are refused with 'failure'"
    )
    # One deadline for the whole stop (sessions, deliveries in flight, the worker's batch);
    # 20 s plus the spool's last flush (2 s) stays well under the 30 s that the systemd unit
    # and the compose file allow before SIGKILL.
    shutdown_grace: float = Field(
        20.0,
        ge=0,
        description="seconds the whole stop on SIGTERM may take: sessions and deliveries in "
        "flight finish within it, what is left stays queued",
    )

    # --- Routes -----------------------------------------------------------------------------
    default_by: By = Field(
        defaults.DEFAULT_BY,
        description="identifier sent when the call does not say: uniqueid|extension|id",
    )
    default_agent: str | None = Field(
        None, description="agentLoginName when neither the call nor `agents` gives one"
    )
    # NoDecode: the JSON of AGI_BRIDGE_AGENTS is decoded by ``_decode_agents``, so a typo in it
    # is one reported problem, not a SettingsError traceback that hides every other problem.
    agents: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="extension -> agentLoginName map (TOML table)"
    )
    stop_mode: Mode = Field(
        "sync", description="sync: wait for NoojeeContact within stop_budget; async: queue"
    )
    start_mode: Mode = Field("sync", description="as stop_mode, for recording/start")
    # The caller hears dead air while we hold the channel; NoojeeContact on a LAN answers in
    # tens of milliseconds, so one second covers a slow answer and bounds a dead one.
    stop_budget: float = Field(
        1.0, gt=0, le=30, description="seconds a sync stop may hold the call before QUEUED"
    )
    start_budget: float = Field(
        1.0, gt=0, le=30, description="seconds a sync start may hold the call before QUEUED"
    )
    # Why each default value: agi_bridge/defaults.py.
    write_ahead_after: float = Field(
        defaults.WRITE_AHEAD_AFTER,
        ge=0,
        le=30,
        description="seconds a sync attempt may take before its request is also spooled "
        "(0: spool every request as its attempt starts)",
    )
    dedup_window: float = Field(
        defaults.DEDUP_WINDOW,
        ge=0,
        description="seconds in which a repeat of the same action on the same call is sent once",
    )
    extension_max_age: float = Field(
        defaults.EXTENSION_MAX_AGE,
        gt=0,
        description="seconds a request by extension may wait for delivery before it expires "
        "(at most dedup_window, when that is set)",
    )

    # --- NoojeeContact ----------------------------------------------------------------------
    noojee_url: str = Field(
        description="API base URL, e.g. https://noojee.example/servicemanager/rest"
    )
    noojee_auth: Literal["apikey", "hash"] = Field(
        "apikey", description="apikey (4.9.0.10+) or hash (timestamp + sha256, older servers)"
    )
    noojee_api_key: SecretStr | None = Field(None, description="the API key (prefer the file)")
    noojee_api_key_file: Path | None = Field(
        None, description="file holding the API key (first line)"
    )
    noojee_ca_file: Path | None = Field(
        None, description="extra CA bundle (PEM) to verify NoojeeContact's certificate"
    )
    noojee_verify_tls: bool = Field(
        True, description="verify NoojeeContact's TLS certificate (leave on)"
    )
    # Python 3.13 verifies in OpenSSL's strict X.509 mode, which refuses older internal CAs
    # that 3.11 and 3.12 accept (no keyUsage extension): false clears that flag alone.
    noojee_tls_strict: bool = Field(
        True,
        description="keep Python's default X.509 checks (strict from Python 3.13); false "
        "accepts an older CA without keyUsage and still verifies the certificate",
    )
    noojee_connect_timeout: float = Field(
        defaults.NOOJEE_CONNECT_TIMEOUT,
        gt=0,
        description="seconds to open a connection to NoojeeContact",
    )
    noojee_timeout: float = Field(
        defaults.NOOJEE_TIMEOUT,
        gt=0,
        description="seconds for one NoojeeContact request (background delivery)",
    )
    noojee_max_connections: int = Field(
        defaults.NOOJEE_MAX_CONNECTIONS,
        ge=1,
        le=1000,
        description="concurrent requests and kept-alive connections",
    )

    # --- Durable spool ----------------------------------------------------------------------
    data_dir: Path = Field(Path("var"), description="directory for the spool (SQLite)")
    spool_fsync: bool = Field(
        True, description="fsync each spool commit (survives power loss, not only kill -9)"
    )
    retry_max_attempts: int = Field(
        defaults.RETRY_MAX_ATTEMPTS,
        ge=1,
        description="delivery attempts before a request is dead-lettered",
    )
    retry_max_age: float = Field(
        defaults.RETRY_MAX_AGE,
        gt=0,
        description="seconds before an undelivered request is dead-lettered",
    )
    retry_initial_delay: float = Field(
        defaults.RETRY_INITIAL_DELAY, gt=0, description="first backoff after NoojeeContact fails"
    )
    retry_max_delay: float = Field(
        defaults.RETRY_MAX_DELAY, gt=0, description="longest backoff between delivery attempts"
    )

    # --- Logs -------------------------------------------------------------------------------
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON lines otherwise"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="lowest level logged"
    )

    @field_validator("allow_clients", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            # Parsed here so that a bad entry is one clear problem; the IPv4Network |
            # IPv6Network union would report two, at unreadable locations.
            networks: list[object] = []
            for part in value:
                if isinstance(part, str):
                    try:
                        networks.append(ipaddress.ip_network(part))
                    except ValueError as exc:
                        raise ValueError(f"{part!r} is not an address or network: {exc}") from None
                else:
                    networks.append(part)
            return tuple(networks)
        return value

    @field_validator("agents", mode="before")
    @classmethod
    def _decode_agents(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f'not a JSON object such as {{"410": "Fred"}}: {exc.msg}'
                ) from None
        return value

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        Address.parse(value)
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str) -> str:
        if value:
            Address.parse(value)
        return value

    @field_validator("noojee_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        # Shown masked: whatever the operator wrote into the URL may be the key.
        shown = _masked_url(value)
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"{shown!r} must start with https:// (or http:// for a simulator)")
        try:
            parts = urlsplit(value)
        except ValueError as exc:
            raise ValueError(f"{shown!r} is not a URL: {exc}") from None
        # Credentials in the URL are refused, not sent as basic auth: NoojeeContact reads
        # its key from the apiKey parameter or the hash scheme only, and a URL is printed,
        # logged and pasted where a key file is not.
        if "@" in parts.netloc:
            host = parts.netloc.rpartition("@")[2]
            clear = value.startswith("http://") and not _is_loopback_url(f"http://{host}")
            raise ValueError(
                f"{shown!r} carries credentials (user:key@): NoojeeContact does not use "
                f"them; remove them and put the key in {setting_name('noojee_api_key_file')}"
                + (f"; it also {_PLAIN_HTTP}" if clear else "")
            )
        if parts.query or parts.fragment:
            raise ValueError(
                f"{shown!r} carries a query string or fragment (such as ?apiKey=): give the "
                f"base URL alone and put the key in {setting_name('noojee_api_key_file')}"
            )
        return value.rstrip("/")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init values; the environment overrides it.
        return (env_settings, init_settings)

    # Parsed on first use and kept (the settings are frozen): the server reads them per start.
    @functools.cached_property
    def listen_address(self) -> Address:
        return Address.parse(self.listen)

    @functools.cached_property
    def metrics_address(self) -> Address | None:
        return Address.parse(self.metrics_listen) if self.metrics_listen else None

    @property
    def api_key(self) -> str:
        """The resolved API key; ``load_settings`` guarantees it is present."""
        assert self.noojee_api_key is not None
        return self.noojee_api_key.get_secret_value()

    def masked(self) -> dict[str, Any]:
        """Effective settings as plain data with every secret masked."""
        data = self.model_dump(mode="json")
        if data.get("noojee_api_key"):
            data["noojee_api_key"] = MASK
        return data


class _Given(Settings):
    """The same fields and checks, from the given values only (no environment): lets
    ``load_settings`` validate what is left once the failed fields are set aside."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def setting_name(field: str) -> str:
    """How a problem names a setting: the TOML key and the variable, the two ways to set it."""
    return f"{field} ({env_name(field)})"


# Settings holding a path. Written in the config file, a relative one is taken from the file's
# folder (as systemd and nginx read theirs); from the environment or by default it stays
# relative to the working directory, as a shell user expects.
PATH_SETTINGS: Final = tuple(
    name
    for name, field in Settings.model_fields.items()
    if Path in (field.annotation, *get_args(field.annotation))
)
# Stands in for noojee_url when it is absent on purpose (spool commands) or already reported:
# a value no check objects to and that resolves nowhere (.invalid, RFC 2606).
_NO_URL: Final = "https://noojee-url.invalid"
_PLAIN_HTTP: Final = (
    "uses plain http:// to a remote host: the API key would travel in clear; use https://"
)
# Whoever else can read the key can stop recordings: warn, as ssh does for a private key.
# Group-readable stays quiet: 0440 with the container's group is how the image reads it.
WORLD_READABLE: Final = 0o004


@dataclass(frozen=True, slots=True)
class _Sources:
    """Where each value came from, so a problem says which file or variable to edit."""

    config_file: Path | None
    file_keys: frozenset[str]

    def name(self, field: str) -> str:
        """``key (VARIABLE, from FILE)``, ``key (VARIABLE, from the environment)``, or for a
        default ``key (VARIABLE)``: the problem names the place to edit."""
        if any(name.upper() == env_name(field) for name in os.environ):
            return f"{field} ({env_name(field)}, from the environment)"
        if field in self.file_keys:
            return f"{field} ({env_name(field)}, from {self.config_file})"
        return setting_name(field)


def _describe(error: Mapping[str, Any], sources: _Sources) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "settings"
    field = str(error["loc"][0]) if error["loc"] else ""
    if field not in Settings.model_fields:
        # Only the file can name an unknown setting: the environment's are found by name.
        close = difflib.get_close_matches(field, list(Settings.model_fields), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return (
            f"{location}: unknown setting in {sources.config_file}; {hint}"
            f"the settings are: {', '.join(Settings.model_fields)}"
        )
    where = sources.name(field) + location[len(field) :]
    # Our validators' messages are written for the operator: drop pydantic's prefix.
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"


def _read_toml(path: Path) -> tuple[dict[str, Any], list[str]]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle), []
    except FileNotFoundError:
        return {}, [f"config file {path} does not exist (set {CONFIG_ENV} or --config)"]
    except OSError as exc:
        return {}, [f"config file {path} cannot be read: {exc.strerror}"]
    except tomllib.TOMLDecodeError as exc:
        return {}, [f"config file {path} is not valid TOML: {exc}"]


def _lift_out_of_agents(values: dict[str, Any], path: Path) -> list[str]:
    """Settings written after the ``[agents]`` line: TOML puts them in that table.

    Such entries are reported and taken out of it (a setting back to the top level), so the
    other problems are told as the operator meant the file, not "noojee_url: Field required".
    """
    agents = values.get("agents")
    if not isinstance(agents, dict):
        return []
    problems = []
    misplaced = [key for key in agents if key in Settings.model_fields]
    if misplaced:
        problems.append(
            f"{', '.join(misplaced)} in {path} {'is' if len(misplaced) == 1 else 'are'} inside the "
            "[agents] table: TOML puts every key written after the [agents] line into it. "
            "Move [agents] and its entries to the end of the file"
        )
        for key in misplaced:
            values.setdefault(key, agents[key])
    logins = [
        key for key, value in agents.items() if key not in misplaced and not isinstance(value, str)
    ]
    problems.extend(
        f"[agents] entry {key} = {agents[key]!r} in {path} is not a login name: write "
        f'"{key}" = "Fred"; if it is a setting, it belongs before the [agents] line'
        for key in logins
    )
    values["agents"] = {k: v for k, v in agents.items() if k not in misplaced and k not in logins}
    return problems


def _resolve_paths(values: dict[str, Any], path: Path) -> None:
    """Relative paths written in the file are taken from the file's folder."""
    folder = path.absolute().parent
    for name in PATH_SETTINGS:
        value = values.get(name)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            values[name] = str(folder / value)


def _cross_checks(
    settings: Settings, sources: _Sources, unchecked: frozenset[str] = frozenset()
) -> tuple[Settings, list[str]]:
    """Checks that span several settings; returns the settings with the key file resolved.

    A check that involves an ``unchecked`` field (already reported, or not needed by the
    command) is skipped: its value here is a default or placeholder, and would only produce a
    misleading second problem.
    """
    problems: list[str] = []

    def valid(*fields: str) -> bool:
        return unchecked.isdisjoint(fields)

    key_file = settings.noojee_api_key_file
    if not valid("noojee_api_key", "noojee_api_key_file"):
        pass
    elif key_file is not None and settings.noojee_api_key is not None:
        problems.append(
            f"both {sources.name('noojee_api_key')} and {sources.name('noojee_api_key_file')} "
            "are set: keep one, so it is clear which key is used"
        )
    elif key_file is not None:
        where = f"{sources.name('noojee_api_key_file')} {key_file}"
        try:
            lines = key_file.read_text(encoding="utf-8").splitlines()
            key = lines[0].strip() if lines else ""
        except OSError as exc:
            problems.append(f"{where}: {exc.strerror}")
        else:
            if key:
                settings = settings.model_copy(update={"noojee_api_key": SecretStr(key)})
            else:
                problems.append(f"{where} is empty")
    elif settings.noojee_api_key is None or not settings.noojee_api_key.get_secret_value():
        problems.append(
            f"no API key: set {setting_name('noojee_api_key_file')} (a file holding the key) "
            f"or {setting_name('noojee_api_key')}"
        )
    if (
        valid("noojee_ca_file")
        and settings.noojee_ca_file is not None
        and not settings.noojee_ca_file.is_file()
    ):
        problems.append(
            f"{sources.name('noojee_ca_file')} {settings.noojee_ca_file} is not a readable file"
        )
    if (
        valid("noojee_url")
        and settings.noojee_url.startswith("http://")
        and not _is_loopback_url(settings.noojee_url)
    ):
        problems.append(f"{sources.name('noojee_url')} {_PLAIN_HTTP}")
    address = settings.listen_address
    if (
        valid("listen", "allow_clients", "listen_unrestricted")
        and not address.is_loopback
        and not settings.allow_clients
        and not settings.listen_unrestricted
    ):
        problems.append(
            f"{sources.name('listen')} {address} is not loopback and "
            "allow_clients is empty: anyone who reaches the port could stop recordings. Set "
            f"{setting_name('allow_clients')} to your Asterisk servers (e.g. 10.0.0.5/32) or, "
            f"knowingly, {setting_name('listen_unrestricted')} to true"
        )
    if (
        valid("extension_max_age", "dedup_window")
        and settings.dedup_window > 0
        and settings.extension_max_age > settings.dedup_window
    ):
        # A fresh press (after the window) must never meet the earlier request of the same
        # call still queued by extension; and a repeat within the window learns its fate.
        problems.append(
            f"{setting_name('extension_max_age')} is larger than {setting_name('dedup_window')}:"
            " a request by extension must be settled before its repeats stop being recognised"
        )
    if (
        valid("retry_initial_delay", "retry_max_delay")
        and settings.retry_initial_delay > settings.retry_max_delay
    ):
        problems.append(
            f"{setting_name('retry_initial_delay')} is larger than "
            f"{setting_name('retry_max_delay')}"
        )
    return settings, problems


def settings_warnings(settings: Settings) -> list[str]:
    """What works but should not stay so; check-config and the start-up log show it."""
    key_file = settings.noojee_api_key_file
    try:
        mode = key_file.stat().st_mode if key_file is not None else 0
    except OSError:
        mode = 0  # read moments ago by load_settings; gone now is a problem for the next start
    if mode & WORLD_READABLE:
        return [
            f"{setting_name('noojee_api_key_file')} {key_file} is readable by every user "
            f"(mode {mode & 0o777:04o}): chmod 0600 it (0440 if the bridge reads it through "
            "its group)"
        ]
    return []


def _masked_url(url: str) -> str:
    """``url`` with its user info, query and fragment masked whole: as written into a setting,
    any of them may hold the API key, under whatever name."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK  # unparsable: show nothing of it
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{MASK}@{host}" if "@" in parts.netloc else host
    return urlunsplit(
        (
            parts.scheme,
            netloc,
            parts.path,
            MASK if parts.query else "",
            MASK if parts.fragment else "",
        )
    )


def _is_loopback_url(url: str) -> bool:
    host = url.split("://", 1)[1].split("/", 1)[0]
    host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    try:
        return Address.parse(f"{host}:0").is_loopback
    except ValueError:
        return False


# Reserved for development tools (the test suite, scripts/): never a setting, never checked
# here, so that the tools can add variables without the bridge knowing their names.
TOOLS_ENV_PREFIX: Final = ENV_PREFIX + "DEV_"


def _unknown_environment() -> list[str]:
    """A misspelt variable (AGI_BRIDGE_NOOJEE_CAFILE) would otherwise be silently ignored."""
    known = {env_name(field) for field in Settings.model_fields}
    problems = []
    for name in sorted(os.environ):
        upper = name.upper()
        if (
            upper.startswith(ENV_PREFIX)
            and upper not in known
            and upper != CONFIG_ENV
            and not upper.startswith(TOOLS_ENV_PREFIX)
        ):
            close = difflib.get_close_matches(upper, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"unknown environment variable {name}{hint}")
    return problems


def load_settings(config_file: Path | None = None, *, for_noojee: bool = True) -> Settings:
    """Build the settings from the TOML file (``config_file`` or ``$AGI_BRIDGE_CONFIG``) and the
    environment. ``for_noojee=False`` is for commands that never talk to NoojeeContact
    (``spool ...``): they need neither its URL nor its key, so an operator can run them
    without reading the key.

    Raises :class:`ConfigError` listing every problem found.
    """
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    values: dict[str, Any] = {}
    problems: list[str] = _unknown_environment()
    if config_file is not None:
        values, more = _read_toml(config_file)
        problems.extend(more)
        problems.extend(_lift_out_of_agents(values, config_file))
        _resolve_paths(values, config_file)
    sources = _Sources(config_file, frozenset(values))
    unchecked: frozenset[str] = frozenset()
    if not for_noojee:
        unchecked = frozenset(name for name in Settings.model_fields if name.startswith("noojee_"))
        values.setdefault("noojee_url", _NO_URL)
    try:
        settings: Settings = Settings(**values)
    except ValidationError as exc:
        problems.extend(_describe(error, sources) for error in exc.errors())
        # The cross-field checks run even when some fields are invalid, so that an operator
        # learns of a typo and, say, a missing API key in one go: validate what is left
        # without the failed fields and run the checks on that.
        failed = frozenset(str(error["loc"][0]) for error in exc.errors() if error["loc"])
        unchecked |= failed
        partial = _without(values, failed)
        if partial is None:
            raise ConfigError(problems) from None
        settings = partial
    settings, more = _cross_checks(settings, sources, unchecked)
    problems.extend(more)
    if problems:
        raise ConfigError(problems)
    return settings


def _without(values: Mapping[str, Any], failed: frozenset[str]) -> Settings | None:
    """File and environment values minus the ``failed`` fields, validated; None if that fails."""
    given = {**values, **EnvSettingsSource(Settings)()}
    kept = {name: value for name, value in given.items() if name not in failed}
    # Required, and its absence or fault is already reported.
    kept.setdefault("noojee_url", _NO_URL)
    try:
        return _Given(**kept)
    except ValidationError:
        return None
