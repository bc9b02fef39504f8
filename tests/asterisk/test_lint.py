"""asterisklint on the shipped dialplan/extensions.conf (needs no Asterisk: no asterisk marker).

asterisklint has no features.conf checker (it reports false errors there): features.conf is
proven by the real Asterisk in test_dialplan.py instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
EXTENSIONS = REPO / "dialplan" / "extensions.conf"

# Narrow, reasoned exceptions. Both are style hints about a COMPLETE extensions.conf;
# dialplan/extensions.conf is a snippet that admins #include into theirs:
#  - H_DP_GENERAL_MISPLACED: "[general] not at top of file". [general] (static, writeprotect,
#    ...) belongs to the admin's own file; a second one in a snippet would only confuse.
#  - H_DP_GLOBALS_MISPLACED: "[globals] not at position two". Asterisk 22 reads [globals]
#    anywhere, also from an #included file, and a later [globals] overrides an earlier one:
#    test_dialplan.py::test_sandbox_overrides_the_bridge_address_without_editing_the_shipped_file
#    proves both on the real Asterisk.
IGNORED = ("H_DP_GENERAL_MISPLACED", "H_DP_GLOBALS_MISPLACED")
# Functions Asterisk 22 has and asterisklint's function list (from Asterisk 13) lacks:
# CHANNEL_EXISTS (func_channel, since 16.22) and AGENT (app_agent_pool). Only these names are
# let through; any other unknown function is still an error. The real Asterisk runs both in
# test_transfer.py.
NEWER_FUNCTIONS = re.compile(r"E_FUNC_MISSING: function '(CHANNEL_EXISTS|AGENT)' does not exist")
# The FreePBX contexts ([agi-bridge-freepbx-*]) go on to contexts FreePBX generates on a site:
# only these two names may be missing here. test_freepbx.py runs them in the imitation.
FREEPBX_CONTEXTS = re.compile(
    r"E_DP_GOTO_NOCONTEXT: context not found for goto to (ext-queues|macro-auto-blkvm), "
)

_RUN = (
    "import os, sys; from asterisklint.main import main; sys.exit(main(sys.argv[1:], os.environ))"
)


def asterisklint(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ALINT_IGNORE": ",".join(IGNORED)}
    return subprocess.run(
        [sys.executable, "-c", _RUN, "dialplan-check", path.name],
        cwd=path.parent, env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def test_shipped_extensions_conf_is_lint_clean() -> None:
    """asterisklint finds nothing in the shipped extensions.conf but the functions it predates
    and the two FreePBX contexts the FreePBX hooks go on to."""
    res = asterisklint(EXTENSIONS)
    report = (res.stdout + res.stderr).strip()
    problems = [
        line
        for line in report.splitlines()
        if not NEWER_FUNCTIONS.search(line) and not FREEPBX_CONTEXTS.search(line)
    ]
    assert problems == [], report
    assert res.returncode == 0 or report, "asterisklint failed without saying why"


def test_lint_would_catch_a_broken_dialplan(tmp_path: Path) -> None:
    """The check is not vacuous: a typo in the shipped file would fail the test above."""
    broken = tmp_path / "extensions.conf"
    broken.write_text(EXTENSIONS.read_text() + "exten => x,1,Set(A=${B)\nexten => y,1,Nope()\n")
    res = asterisklint(broken)
    assert res.returncode != 0
    assert "E_APP_PARSE_ERROR" in res.stdout + res.stderr
    assert "E_APP_MISSING" in res.stdout + res.stderr
