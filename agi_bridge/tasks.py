"""The one way the bridge ends work it started: let it finish within a time, then cancel it."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any


async def finish_within(tasks: Collection[asyncio.Future[Any]], grace: float) -> None:
    """Wait up to ``grace`` seconds for ``tasks`` to end by themselves, cancel the rest, and
    return once every one has ended; their results and errors are left to their owners."""
    if not tasks:
        return
    _, pending = await asyncio.wait(set(tasks), timeout=max(0.0, grace))
    for task in pending:
        task.cancel()
    # Cancelled tasks end at their next await; gather returns their CancelledError, not raises.
    await asyncio.gather(*pending, return_exceptions=True)
