"""Getting a request to NoojeeContact without holding the call and without losing it:
:class:`~agi_bridge.delivery.facade.Delivery` and its parts."""

from agi_bridge.delivery.facade import Delivery

__all__ = ["Delivery"]
