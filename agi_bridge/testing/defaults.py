"""The testing tools' defaults the CLI shows in ``--help``: apart from the tools themselves, so
that printing the help loads none of them."""

from __future__ import annotations

from pathlib import Path
from typing import Final

DEMO_PORT: Final = 8089  # the simulator's loopback port, fixed so the README's curl lines work
DEMO_KEY: Final = "demo-key"  # the simulator's own key, published on purpose
DEFAULT_CHANNEL: Final = "PJSIP/410-00000001"
DEFAULT_UNIQUEID: Final = "1795811316.1"
DEMO_DATA_DIR: Final = Path("var/demo")  # the demo's spool, never mixed with a real one
