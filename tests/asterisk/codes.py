"""The feature codes as the shipped dialplan/ defines them, read from their one definition.

In-call codes: the ``[applicationmap]`` lines of dialplan/features.conf; dialled codes: the
``exten`` lines of ``[agi-bridge-dialled]`` in dialplan/extensions.conf. Tests press what these
say, so a site's one-line change (or ours) needs no second edit here.
"""

from __future__ import annotations

import re
from pathlib import Path

DIALPLAN = Path(__file__).resolve().parent.parent.parent / "dialplan"
APPLICATIONMAP = re.compile(r"^(agi_bridge_\w+)\s*=>\s*([^,\s]+),", re.MULTILINE)
DIALLED = re.compile(
    r"^exten\s*=>\s*([^,\s]+),1,Goto\(agi-bridge-dialled-code,(\w+),1\)", re.MULTILINE
)


def in_call_codes(features: Path = DIALPLAN / "features.conf") -> dict[str, str]:
    """applicationmap entry name -> digits (agi_bridge_stop -> *7)."""
    return dict(APPLICATIONMAP.findall(features.read_text()))


def dialled_codes(extensions: Path = DIALPLAN / "extensions.conf") -> dict[str, str]:
    """action -> dialled code (stop -> *37)."""
    return {action: code for code, action in DIALLED.findall(extensions.read_text())}


_IN_CALL = in_call_codes()
STOP = _IN_CALL["agi_bridge_stop"]
START = _IN_CALL["agi_bridge_start"]
TOGGLE = _IN_CALL["agi_bridge_toggle"]
_DIALLED = dialled_codes()
DIALLED_STOP = _DIALLED["stop"]
DIALLED_START = _DIALLED["start"]
