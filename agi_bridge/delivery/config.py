"""What delivery is configured with: small frozen objects built once at start-up from the
settings (:func:`agi_bridge.app.delivery_config`), each part given the one it uses. Their
defaults are the settings' (:mod:`agi_bridge.defaults`), so a part built without settings (a
test) behaves like a configured one."""

from __future__ import annotations

from dataclasses import dataclass, field

from agi_bridge import defaults


@dataclass(frozen=True, slots=True, kw_only=True)
class Connections:
    """How many requests may be in flight to NoojeeContact, and how long one may take."""

    max_connections: int = defaults.NOOJEE_MAX_CONNECTIONS
    connect_timeout: float = defaults.NOOJEE_CONNECT_TIMEOUT
    request_timeout: float = defaults.NOOJEE_TIMEOUT

    @property
    def lease(self) -> float:
        """Longest one attempt can take: /Time, the request, and its one retry after an
        expired timestamp, plus a margin. Until then no one else sends the same spool entry."""
        return self.connect_timeout + 3 * self.request_timeout + 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """How often and how long a spooled request is tried before it is dead-lettered."""

    max_attempts: int = defaults.RETRY_MAX_ATTEMPTS
    max_age: float = defaults.RETRY_MAX_AGE
    initial_delay: float = defaults.RETRY_INITIAL_DELAY
    max_delay: float = defaults.RETRY_MAX_DELAY


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryConfig:
    """Everything delivery is configured with; the facade hands each part its share."""

    connections: Connections = field(default_factory=Connections)
    retry: Retry = field(default_factory=Retry)
    write_ahead_after: float = defaults.WRITE_AHEAD_AFTER
    dedup_window: float = defaults.DEDUP_WINDOW
    extension_max_age: float = defaults.EXTENSION_MAX_AGE
