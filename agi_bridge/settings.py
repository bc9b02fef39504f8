"""One settings object, built once at start-up and passed down.

Every setting has one name: the key in the TOML file and, upper-cased behind ``AGI_BRIDGE_``,
the environment variable that overrides it (``noojee_url`` / ``AGI_BRIDGE_NOOJEE_URL``).
The file is flat on purpose, so the settings table in the README is the whole story.

:func:`agi_bridge.loading.load_settings` builds it from the file and the environment, and reports
every problem at once (unknown keys, bad values, missing secrets, unsafe listening addresses)
as a :class:`ConfigError`, so an operator fixes the file in one go.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from agi_bridge import defaults
from agi_bridge.calls import CallDefaults
from agi_bridge.defaults import ENV_PREFIX, env_name
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
        shown = masked_url(value)
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
            clear = value.startswith("http://") and not is_loopback_url(f"http://{host}")
            raise ValueError(
                f"{shown!r} carries credentials (user:key@): NoojeeContact does not use "
                f"them; remove them and put the key in {setting_name('noojee_api_key_file')}"
                + (f"; it also {PLAIN_HTTP}" if clear else "")
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

    @functools.cached_property
    def call_defaults(self) -> CallDefaults:
        """What a request falls back to when its call names no identifier kind or agent (the
        server's calls and ``agi-bridge send`` alike)."""
        return CallDefaults(
            default_by=self.default_by, default_agent=self.default_agent, agents=self.agents
        )

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


class GivenSettings(Settings):
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


PLAIN_HTTP: Final = (
    "uses plain http:// to a remote host: the API key would travel in clear; use https://"
)


def masked_url(url: str) -> str:
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


def is_loopback_url(url: str) -> bool:
    host = url.split("://", 1)[1].split("/", 1)[0]
    host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    try:
        return Address.parse(f"{host}:0").is_loopback
    except ValueError:
        return False
