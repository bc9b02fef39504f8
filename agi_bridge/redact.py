"""One set of masking rules for every text that may carry a secret: log events, result
messages built from NoojeeContact's answers and from exceptions, the URL in a configuration
error, and the simulator's record of what it received.

What is masked, wherever the text came from:

* the API key itself, its URL-encoded form (as an echoed URL carries it), and either as a JSON
  string writes it;
* the value of an ``apiKey``, ``hash`` or ``timeStamp`` parameter (any case), up to the next
  ``&``, white space or quote: the key, the hash of the hash scheme, and the time stamp that
  goes with that hash;
* the password of a ``scheme://user:password@`` URL;
* any 64-hex-digit run (a sha256 hash a server page may echo without its parameter name).

:func:`redact_url` is the narrower form for a URL shown whole to an operator: it masks the
secrets (key, hash, password) and keeps the time stamp readable, which alone gives nothing away.
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote

__all__ = ["MASK", "SECRET_PARAMETERS", "may_hold_secret", "redact_url", "scrub"]

MASK: Final = "***"
# Query parameters whose values are masked in any text (case-insensitive names).
SECRET_PARAMETERS: Final = frozenset({"apikey", "hash", "timestamp"})

# A parameter's value ends at the next '&', white space or quote; '\b' lets any non-word
# character (?, &, ;, space, quote, bracket) or the start of the text precede the name.
_PARAM_RE: Final = re.compile(r"(?i)\b((?:apikey|hash|timestamp)=)[^&\s\"']*")
_URL_PARAM_RE: Final = re.compile(r"(?i)\b((?:apikey|hash)=)[^&#\s\"'<>]*")
# user:password@ in a URL's authority.
_USERINFO_RE: Final = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/@\s:]*:)[^/@\s]*@")
# A sha256 hex digest anywhere (the hash of the hash scheme, echoed back by some page).
_HEX64_RE: Final = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")


def redact_url(url: object) -> str:
    """``url`` as text with the values of ``apiKey`` and ``hash`` and any password masked."""
    text = str(url)
    text = _URL_PARAM_RE.sub(rf"\1{MASK}", text)
    return _USERINFO_RE.sub(rf"\1{MASK}@", text)


@functools.lru_cache(maxsize=16)
def _forms(secret: str) -> tuple[str, ...]:
    """``secret`` as it is and URL-encoded (as an echoed URL carries it), each also as a JSON
    string writes it (as a log line or an echoed JSON body carries it). Cached: the same key
    is looked for in every log line."""
    plain = (secret, quote(secret, safe=""))
    return tuple(dict.fromkeys([*plain, *(json.dumps(form)[1:-1] for form in plain)]))


# Hex digits as "x", every other byte as " ": a run of 64 digits is then one substring test,
# a tenth of what the regular expression's search costs over a log line.
_HEX_MARKS: Final = bytes(0x78 if chr(byte) in string.hexdigits else 0x20 for byte in range(256))
_HEX64_MARKED: Final = b"x" * 64


def may_hold_secret(text: str, secrets: Iterable[str] = ()) -> bool:
    """False when :func:`scrub` is sure to leave ``text`` as it is, and every string that
    ``text`` holds JSON-encoded as well: a log line is checked once, as it will be written, and
    only a line that may hold a secret has its values scrubbed one by one. (JSON escapes none
    of ``=``, ``@`` and the hex digits, and a secret's escaped forms are among those looked
    for.)"""
    if "=" in text or "@" in text:
        return True
    for secret in secrets:
        if secret and any(form in text for form in _forms(secret)):
            return True
    return _HEX64_MARKED in text.encode(errors="surrogatepass").translate(_HEX_MARKS)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every rule of this module applied, ``secrets`` being the literal values
    (the API key) to mask as they are and URL-encoded."""
    for secret in secrets:
        if not secret:
            continue
        for form in _forms(secret):
            if form in text:
                text = text.replace(form, MASK)
    if "=" in text:
        text = _PARAM_RE.sub(rf"\1{MASK}", text)
    if "@" in text:
        text = _USERINFO_RE.sub(rf"\1{MASK}@", text)
    if len(text) >= 64:
        text = _HEX64_RE.sub(MASK, text)
    return text
