"""What the command line's help says about the settings, importable without loading them:
the variables' names and the listeners' defaults. :mod:`agi_bridge.settings` takes these
values from here, so each is defined once, and ``agi-bridge --help`` does not pay for pydantic.
"""

from __future__ import annotations

from typing import Final

ENV_PREFIX: Final = "AGI_BRIDGE_"
CONFIG_ENV: Final = ENV_PREFIX + "CONFIG"

# Loopback by default: neither FastAGI nor /metrics has any authentication.
LISTEN: Final = "127.0.0.1:4573"
METRICS_LISTEN: Final = "127.0.0.1:9573"


def env_name(field: str) -> str:
    """The environment variable that overrides setting ``field``."""
    return ENV_PREFIX + field.upper()
