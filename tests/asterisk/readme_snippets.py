"""The dialplan snippets of dialplan/README.md (its ```asterisk blocks), as an admin copies them.

The sandbox loads them (conftest.py, ``--extensions``) next to the shipped files, and
test_dialplan.py checks that Asterisk has each context with the priorities the text claims.
The FreePBX section's files (a block right after ``<!-- freepbx-file: NAME -->``) go, as
written, into the imitation of FreePBX (test_freepbx.py) under their names.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parent.parent.parent / "dialplan" / "README.md"
FENCE = re.compile(r"^( *)```asterisk\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
CONTEXT = re.compile(r"^\[([^\]]+)\]")
EXTEN = re.compile(r"^exten\s*=>\s*([^,]+),(\w+),")
SAME = re.compile(r"^same\s*=>\s*n\b")
FREEPBX_FILE = re.compile(r"^<!-- freepbx-file: (\S+) -->\n```\w*\n(.*?)^```", re.M | re.DOTALL)

# context -> extension -> number of priorities
Claims = dict[str, dict[str, int]]


def snippets(readme: Path = README) -> list[str]:
    """The text of every ```asterisk block, unindented (a block may sit in a list item)."""
    return [textwrap.dedent(m.group(2)) for m in FENCE.finditer(readme.read_text())]


def claims(text: str) -> Claims:
    """The contexts, extensions and priority counts a snippet's lines claim."""
    out: Claims = {}
    context = exten = None
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        if not line:  # a blank or comment line ends an extension's run of priorities:
            exten = None  # a 'same' after it would continue one the reader no longer sees
        elif m := CONTEXT.match(line):
            context, exten = m.group(1), None
            out.setdefault(context, {})
        elif m := EXTEN.match(line):
            assert context is not None, f"extension outside a context: {raw!r}"
            exten = m.group(1).strip()
            out[context][exten] = out[context].get(exten, 0) + 1
        elif SAME.match(line):
            if context is None or exten is None:
                raise AssertionError(f"'same' without 'exten' right above it: {raw!r}")
            out[context][exten] += 1
        else:
            raise AssertionError(f"a line the snippet test does not understand: {raw!r}")
    return out


def write_all(path: Path) -> Path:
    """Every snippet in one file, for the sandbox to #include: the README copied as written."""
    path.write_text(
        "".join(
            f"; dialplan/README.md snippet {i}\n{text}\n" for i, text in enumerate(snippets(), 1)
        )
    )
    return path


def freepbx_files(readme: Path = README) -> dict[str, str]:
    """File name -> text of each block the FreePBX section tells the admin to put in a file."""
    found = FREEPBX_FILE.findall(readme.read_text())
    files = dict(found)
    assert len(files) == len(found), "two FreePBX snippets for one file"
    return files
