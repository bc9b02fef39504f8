"""Loading the settings: the TOML file, then the environment over it, every problem reported
at once (:class:`~agi_bridge.settings.ConfigError`), and the warnings about what works but
should not stay so. What the settings are lives in :mod:`agi_bridge.settings`."""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, get_args

from pydantic import SecretStr, ValidationError
from pydantic_settings import EnvSettingsSource

from agi_bridge.defaults import CONFIG_ENV, ENV_PREFIX, env_name
from agi_bridge.settings import (
    PLAIN_HTTP,
    ConfigError,
    GivenSettings,
    Settings,
    is_loopback_url,
    setting_name,
)

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
        and not is_loopback_url(settings.noojee_url)
    ):
        problems.append(f"{sources.name('noojee_url')} {PLAIN_HTTP}")
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
        return GivenSettings(**kept)
    except ValidationError:
        return None
