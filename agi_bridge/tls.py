"""TLS to NoojeeContact: the client's SSL context and Python 3.13's strict X.509 checks.

Python 3.13 verifies certificates with OpenSSL's ``VERIFY_X509_STRICT``, which refuses chains
that 3.11 and 3.12 accept, typically an older on-premises CA without a keyUsage extension
("CA cert does not include key usage extension"). ``noojee_tls_strict = false`` clears that one
flag; the chain, the host name and the dates are still verified.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Final, cast

# Verify errors OpenSSL reports only in strict mode (X509_V_ERR_CA_CERT_MISSING_KEY_USAGE,
# ..._MISSING_AUTHORITY_KEY_IDENTIFIER, ..._MISSING_SUBJECT_KEY_IDENTIFIER,
# ..._CA_BCONS_NOT_CRITICAL): the omissions of older internal CAs and their certificates.
STRICT_ONLY_REASONS: Final = (
    "CA cert does not include key usage extension",
    "Missing Authority Key Identifier",
    "Missing Subject Key Identifier",
    "Basic Constraints of CA cert not marked critical",
)
STRICT_ADVICE: Final = (
    "this Python verifies certificates in strict X.509 mode (the default from Python 3.13) "
    "and NoojeeContact's CA or certificate does not meet it: have the CA reissued with the "
    "missing extension, or set noojee_tls_strict = false (AGI_BRIDGE_NOOJEE_TLS_STRICT=false), "
    "which relaxes only those checks and still verifies the certificate"
)
CA_FILE_ADVICE: Final = (
    "set noojee_ca_file (AGI_BRIDGE_NOOJEE_CA_FILE) to the PEM of the CA that signed "
    "NoojeeContact's certificate, and check that noojee_url names the host in it"
)

# DER encoding of OBJECT IDENTIFIER 2.5.29.15 (id-ce-keyUsage), as it opens the extension.
_KEY_USAGE_OID: Final = bytes.fromhex("0603551d0f")
_EXTENSIONS_TAG: Final = 0xA3  # [3] EXPLICIT Extensions in a TBSCertificate


def client_context(ca_file: Path | None, *, strict: bool) -> ssl.SSLContext:
    """Python's default client context, trusting exactly ``ca_file`` when given; ``strict=False``
    clears only ``VERIFY_X509_STRICT`` (verification itself stays on)."""
    context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    if not strict:
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


def strict_by_default() -> bool:
    """True when this Python's default context verifies in strict X.509 mode (3.13+)."""
    return bool(ssl.create_default_context().verify_flags & ssl.VERIFY_X509_STRICT)


def verify_advice(message: str) -> str:
    """What to do about a certificate verification failure, told by its message."""
    if any(reason.casefold() in message.casefold() for reason in STRICT_ONLY_REASONS):
        return STRICT_ADVICE
    return CA_FILE_ADVICE


def cas_without_key_usage(ca_file: Path) -> list[str]:
    """Subjects of the CA certificates in ``ca_file`` that have no keyUsage extension.

    Raises :class:`ssl.SSLError` or :class:`OSError` when the file cannot be loaded.
    """
    store = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    store.load_verify_locations(cafile=str(ca_file))
    found = []
    for der, info in zip(
        store.get_ca_certs(binary_form=True), store.get_ca_certs(binary_form=False), strict=True
    ):
        if not _has_key_usage(der):
            # ((("commonName", "Old CA"),), ...): one tuple of pairs per RDN.
            subject = cast(tuple[tuple[tuple[str, str], ...], ...], info.get("subject", ()))
            found.append(", ".join(f"{k}={v}" for rdn in subject for k, v in rdn) or "?")
    return found


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER element at offset ``at``."""
    tag, length, at = der[at], der[at + 1], at + 2
    if length & 0x80:  # long form: the low bits count the length's bytes
        count = length & 0x7F
        length, at = int.from_bytes(der[at : at + count], "big"), at + count
    return tag, at, at + length


def _children(der: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    while start < end:
        element = _element(der, start)
        yield element
        start = element[2]


def _has_key_usage(der: bytes) -> bool:
    """Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { ..., [3] { SEQUENCE OF
    Extension ::= SEQUENCE { extnID, ... } } }, ... }: is one extnID keyUsage?"""
    _, certificate, _ = _element(der, 0)
    _, tbs, tbs_end = _element(der, certificate)
    for tag, start, _ in _children(der, tbs, tbs_end):
        if tag == _EXTENSIONS_TAG:
            _, extensions, extensions_end = _element(der, start)
            return any(
                der[extension : extension + len(_KEY_USAGE_OID)] == _KEY_USAGE_OID
                for _, extension, _ in _children(der, extensions, extensions_end)
            )
    return False
