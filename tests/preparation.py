"""A slow setup that runs once per test run (an Asterisk root, a container image) and decides
whether the tests needing it run, skip loudly, or fail when the machine is required to run them.

The setup runs from ``pytest_runtestloop``, before the first test, so that no test's timeout
counts it; a fixture calls ``check()`` (a no-op run when the hook already did it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest


class Preparation:
    """``setup()`` returns why the tests cannot run, or None; it is called at most once."""

    def __init__(self, tests: str, *, require_env: str, setup: Callable[[], str | None]) -> None:
        self.tests = tests
        self.require_env = require_env
        # Read now, at conftest import: the suite's autouse fixture clears AGI_BRIDGE_*
        # variables before each test.
        self.required = os.environ.get(require_env, "") not in ("", "0", "no")
        self._setup = setup
        self._done = False
        self.error: str | None = None

    def run(self) -> None:
        if not self._done:
            self._done = True
            self.error = self._setup()

    @property
    def succeeded(self) -> bool:
        return self._done and self.error is None

    def check(self) -> None:
        """Skip (or fail, when required) the calling test if the setup failed."""
        self.run()
        if self.error:
            self.skip_or_fail(self.error)

    def skip_or_fail(self, reason: str) -> None:
        msg = f"{self.tests} NOT RUN: {reason}"
        if self.required:
            pytest.fail(f"{msg} ({self.require_env} is set)", pytrace=False)
        pytest.skip(msg)
