"""One set of masking rules for every text that may carry a secret: log events, result
messages built from NoojeeContact's answers and from exceptions, the URL in a configuration
error, and the simulator's record of what it received.

What is masked, wherever the text came from:

* the API key itself, and its URL-encoded form (as an echoed URL carries it);
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
import re
from collections.abc import Iterable, Sequence
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
    """``secret`` as it is and URL-encoded (as an echoed URL carries it). Cached: the same key
    is scrubbed from every string of every log event."""
    quoted = quote(secret, safe="")
    return (secret,) if quoted == secret else (secret, quoted)


def may_hold_secret(texts: Sequence[str], secrets: Iterable[str] = ()) -> bool:
    """False when :func:`scrub` is sure to leave every one of ``texts`` as it is: a log event's
    strings are checked in one pass, and only an event that may hold a secret is scrubbed
    string by string."""
    joined = "\0".join(texts)  # no rule matches a NUL, so none matches across two texts
    if "=" in joined or "@" in joined:
        return True
    for secret in secrets:
        if secret and any(form in joined for form in _forms(secret)):
            return True
    # Searched text by text, and only when one is long enough: the search costs more than all
    # the rest together.
    if max(map(len, texts), default=0) < 64:
        return False
    return any(_HEX64_RE.search(text) is not None for text in texts)


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
