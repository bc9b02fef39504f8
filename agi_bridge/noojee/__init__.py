"""The NoojeeContact client: :class:`~agi_bridge.noojee.client.NoojeeClient` and its parts."""

from agi_bridge.noojee.client import NoojeeClient

__all__ = ["NoojeeClient"]
