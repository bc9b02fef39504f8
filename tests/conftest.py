"""Shared fixtures: a throwaway certificate authority for real HTTPS on loopback."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import trustme


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A certificate authority that exists only for this test run."""
    return trustme.CA()


@pytest.fixture(scope="session")
def server_ssl_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """Server side TLS for 127.0.0.1 and localhost, signed by ``tls_ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEM file of ``tls_ca``, as an operator would pass it in ``AGI_BRIDGE_NOOJEE_CA_FILE``."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(autouse=True)
def _no_operator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own AGI_BRIDGE_* variables must not change what a test sees."""
    for name in list(os.environ):
        if name.startswith("AGI_BRIDGE_"):
            monkeypatch.delenv(name)
