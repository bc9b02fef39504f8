"""NoojeeContact behind an older internal CA without keyUsage: Python 3.13's strict X.509 mode.

The CA is built with ``cryptography`` (trustme's CAs carry keyUsage, so they pass either way) and
served by the simulator over real HTTPS on loopback.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agi_bridge.noojee import NoojeeClient
from agi_bridge.testing.simulator import NoojeeSimulator
from agi_bridge.tls import (
    CA_FILE_ADVICE,
    STRICT_ADVICE,
    cas_without_key_usage,
    client_context,
    strict_by_default,
    verify_advice,
)
from agi_bridge.vocabulary import NoojeeResult, RecordingRequest, ResultKind
from tests.bridge_helpers import API_KEY, running_simulator
from tests.test_cli import agi_bridge, assert_no_traceback

# The oracle is the version, not the code under test: 3.13 made strict mode the default.
STRICT_PYTHON = sys.version_info >= (3, 13)
MISSING_KEY_USAGE = "CA cert does not include key usage extension"
STOP_FRED = RecordingRequest("stop", "410", "Fred")
CA_SUBJECT = "Old Internal CA"


@dataclass(frozen=True, slots=True)
class LegacyCA:
    ca_file: Path  # what an operator puts in noojee_ca_file
    server_context: ssl.SSLContext  # NoojeeContact's side: a leaf for 127.0.0.1 it signed


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    """A certificate for ``key``, valid from yesterday to tomorrow."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


@pytest.fixture(scope="module")
def legacy_ca(tmp_path_factory: pytest.TempPathFactory) -> LegacyCA:
    """A CA as older on-premises tools made them: CA basic constraints, no keyUsage at all."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_SUBJECT)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        _builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    # The leaf meets every strict rule (AKI, SKI, SAN, keyUsage): only the CA is at fault.
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "noojee.local")])
    leaf = (
        _builder(leaf_name, ca_name, leaf_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("legacy-ca")
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(_pem(ca))
    chain, key = folder / "server.pem", folder / "server.key"
    chain.write_bytes(_pem(leaf))
    key.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(chain, key)
    return LegacyCA(ca_file, server_context)


@pytest.fixture
async def legacy_noojee(legacy_ca: LegacyCA) -> AsyncIterator[NoojeeSimulator]:
    """The simulator over HTTPS with a certificate from the legacy CA."""
    async with running_simulator(legacy_ca.server_context) as simulator:
        yield simulator


async def _stop(simulator: NoojeeSimulator, ca_file: Path | None, *, strict: bool) -> NoojeeResult:
    client = NoojeeClient(
        base_url=simulator.base_url,
        auth="apikey",
        api_key=API_KEY,
        ca_file=ca_file,
        tls_strict=strict,
    )
    async with client:
        return await client.send(STOP_FRED)


def test_strict_by_default_from_python_3_13() -> None:
    """strict_by_default() tells whether this Python's default context is strict (3.13+)."""
    assert strict_by_default() is STRICT_PYTHON


def test_relaxed_context_clears_only_the_strict_flag(ca_file: Path) -> None:
    """tls_strict=False differs from Python's default by VERIFY_X509_STRICT alone."""
    default = ssl.create_default_context(cafile=str(ca_file))
    relaxed = client_context(ca_file, strict=False)
    assert relaxed.verify_flags == default.verify_flags & ~ssl.VERIFY_X509_STRICT
    assert relaxed.verify_mode is ssl.CERT_REQUIRED
    assert relaxed.check_hostname
    assert relaxed.get_ca_certs() == default.get_ca_certs()
    assert client_context(ca_file, strict=True).verify_flags == default.verify_flags


async def test_default_verification_is_pythons_own(
    legacy_noojee: NoojeeSimulator, legacy_ca: LegacyCA
) -> None:
    """By default a CA without keyUsage fails on 3.13+ (told why, not retried), works before."""
    result = await _stop(legacy_noojee, legacy_ca.ca_file, strict=True)
    if STRICT_PYTHON:
        assert result.kind is ResultKind.TRANSPORT
        assert result.tls_verify_failed
        assert not result.transient
        assert MISSING_KEY_USAGE in result.message
        assert legacy_noojee.received == []
    else:
        assert result.kind is ResultKind.OK, result.message
        assert len(legacy_noojee.received) == 1


async def test_relaxed_strict_mode_accepts_a_ca_without_key_usage(
    legacy_noojee: NoojeeSimulator, legacy_ca: LegacyCA
) -> None:
    """noojee_tls_strict=false: the request through the legacy CA succeeds on every Python."""
    result = await _stop(legacy_noojee, legacy_ca.ca_file, strict=False)
    assert result.kind is ResultKind.OK, result.message
    (received,) = legacy_noojee.received
    assert received.params["agentLoginName"] == "Fred"


@pytest.mark.parametrize("trusted", ["another CA", "the system's CAs"])
async def test_relaxed_strict_mode_still_refuses_an_untrusted_ca(
    legacy_noojee: NoojeeSimulator, ca_file: Path, trusted: str
) -> None:
    """noojee_tls_strict=false still verifies: a certificate from an untrusted CA is refused."""
    result = await _stop(legacy_noojee, ca_file if trusted == "another CA" else None, strict=False)
    assert result.kind is ResultKind.TRANSPORT
    assert result.tls_verify_failed
    assert "unable to get local issuer certificate" in result.message
    assert legacy_noojee.received == []


def test_cas_without_key_usage_names_them(legacy_ca: LegacyCA, ca_file: Path) -> None:
    """The legacy CA is found by its subject; trustme's CA, which has keyUsage, is not."""
    assert cas_without_key_usage(legacy_ca.ca_file) == [f"commonName={CA_SUBJECT}"]
    assert cas_without_key_usage(ca_file) == []


def test_verify_advice_tells_strict_failures_apart() -> None:
    """Strict-only verify messages point at noojee_tls_strict, others at noojee_ca_file."""
    message = f"TLS certificate verification failed: {MISSING_KEY_USAGE}"
    assert verify_advice(message) == STRICT_ADVICE
    assert "noojee_tls_strict = false" in STRICT_ADVICE
    unknown_ca = "TLS certificate verification failed: unable to get local issuer certificate"
    assert verify_advice(unknown_ca) == CA_FILE_ADVICE


@pytest.fixture
def legacy_env(
    tmp_path: Path, legacy_noojee: NoojeeSimulator, legacy_ca: LegacyCA
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGI_BRIDGE_")}
    return env | {
        "AGI_BRIDGE_DATA_DIR": str(tmp_path / "data"),
        "AGI_BRIDGE_NOOJEE_URL": legacy_noojee.base_url,
        "AGI_BRIDGE_NOOJEE_API_KEY": API_KEY,
        "AGI_BRIDGE_NOOJEE_CA_FILE": str(legacy_ca.ca_file),
    }


async def test_send_says_what_to_do_about_the_ca(
    tmp_path: Path, legacy_env: dict[str, str]
) -> None:
    """send points at noojee_tls_strict on 3.13+, and the relaxed setting makes it succeed."""
    send = ("send", "stop", "--extension", "410", "--agent", "Fred")
    ran = await agi_bridge(*send, env=legacy_env, cwd=tmp_path)
    assert_no_traceback(ran)
    if STRICT_PYTHON:
        assert ran.returncode == 1
        assert MISSING_KEY_USAGE in ran.stdout
        assert f"what to do: {STRICT_ADVICE}" in ran.stderr
    else:
        assert ran.returncode == 0, ran.stderr
    relaxed = legacy_env | {"AGI_BRIDGE_NOOJEE_TLS_STRICT": "false"}
    ran = await agi_bridge(*send, env=relaxed, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr


async def test_send_says_what_to_do_about_an_untrusted_ca(
    tmp_path: Path, legacy_env: dict[str, str], ca_file: Path
) -> None:
    """send with a CA file that did not sign the certificate points at noojee_ca_file."""
    env = legacy_env | {"AGI_BRIDGE_NOOJEE_CA_FILE": str(ca_file)}
    ran = await agi_bridge(
        "send", "stop", "--extension", "410", "--agent", "Fred", env=env, cwd=tmp_path
    )
    assert ran.returncode == 1
    assert f"what to do: {CA_FILE_ADVICE}" in ran.stderr
    assert_no_traceback(ran)


async def test_check_config_warns_about_a_ca_without_key_usage(
    tmp_path: Path, legacy_env: dict[str, str]
) -> None:
    """check-config names the CA strict mode will refuse, on 3.13+ and unless relaxed; exit 0."""
    ran = await agi_bridge("check-config", env=legacy_env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    warned = f"the CA commonName={CA_SUBJECT} has no keyUsage extension" in ran.stderr
    assert warned is STRICT_PYTHON
    assert (STRICT_ADVICE in ran.stderr) is STRICT_PYTHON
    relaxed = legacy_env | {"AGI_BRIDGE_NOOJEE_TLS_STRICT": "false"}
    ran = await agi_bridge("check-config", env=relaxed, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "warning" not in ran.stderr
