"""The feature codes: one definition each, clash-free, and the documentation names those.

No Asterisk needed: these read dialplan/ and the READMEs. The real Asterisk proves the clash
rule on FreePBX's active codes in test_freepbx.py (``features show``).
"""

from __future__ import annotations

import re

from .codes import DIALPLAN, dialled_codes, in_call_codes

REPO = DIALPLAN.parent
# In-call codes active in the same bridge on a FreePBX or a stock Asterisk install (see
# dialplan/README.md, "The codes and how to change them"), apart from stock disconnect "*".
FREEPBX_IN_CALL = {"##", "*2", "**", "*1", "*3", "*4", "*5", "*6"}
ASTERISK_IN_CALL = {"*1", "*2", "*3", "*4", "#1", "*0", "#72", "#9", "#8"}
# FreePBX's default dialled feature codes that start with "*" (the Feature Codes page).
FREEPBX_DIALLED = [
    "*0",
    "*11",
    "*12",
    "*21",
    "*30",
    "*31",
    "*32",
    "*34",
    "*35",
    "*43",
    "*45",
    "*46",
    "*47",
    "*52",
    "*53",
    "*54",
    "*55",
    "*56",
    "*57",
    "*58",
    "*59",
    "*60",
    "*65",
    "*68",
    "*69",
    "*70",
    "*71",
    "*72",
    "*73",
    "*74",
    "*75",
    "*76",
    "*78",
    "*79",
    "*80",
    "*85",
    "*87",
    "*88",
    "*90",
    "*91",
    "*92",
    "*93",
    "*94",
    "*95",
    "*96",
    "*97",
    "*98",
    "*8",
    "**",
]


def clashes(a: str, b: str) -> bool:
    """Two DTMF codes clash when one equals, or is a prefix of, the other."""
    return a.startswith(b) or b.startswith(a)


def test_each_code_is_defined_once() -> None:
    """Each code's digits appear in exactly one definition line of dialplan/."""
    features = (DIALPLAN / "features.conf").read_text()
    extensions = (DIALPLAN / "extensions.conf").read_text()
    for digits in in_call_codes().values():
        lines = [line for line in features.splitlines() if not line.startswith(";")]
        assert sum(f"=> {digits}," in line for line in lines) == 1, digits
    for code in dialled_codes().values():
        assert len(re.findall(rf"^exten\s*=>\s*{re.escape(code)},", extensions, re.M)) == 1


def test_in_call_codes_clash_with_nothing_freepbx_or_asterisk_enables() -> None:
    """No shipped in-call code equals or prefixes another, or one FreePBX / Asterisk enables."""
    ours = list(in_call_codes().values())
    assert len(ours) == 3
    for i, code in enumerate(ours):
        assert not any(clashes(code, other) for other in ours[i + 1 :]), code
        assert not any(clashes(code, other) for other in FREEPBX_IN_CALL | ASTERISK_IN_CALL)


def test_dialled_codes_overlap_no_freepbx_feature_code() -> None:
    """The dialled codes neither equal nor prefix a FreePBX default feature code."""
    for code in dialled_codes().values():
        assert not any(clashes(code, other) for other in FREEPBX_DIALLED), code


def test_readmes_name_the_codes_a_site_presses() -> None:
    """README.md's five-minute section and dialplan/README.md's table name the shipped codes."""
    readme = (REPO / "README.md").read_text()
    five = readme[readme.index("## The dialplan in five minutes") :]
    five = five[: five.index("\n## ", 1)]
    table = (DIALPLAN / "README.md").read_text()
    table = table[table.index("## The codes and how to change them") :]
    for code in [*in_call_codes().values(), *dialled_codes().values()]:
        assert f"`{code}`" in five, code
        assert f"| `{code}` |" in table, code
