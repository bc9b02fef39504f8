"""Defaults defined once, importable without loading the settings: what the command line's
help says (the variables' names, the listeners' defaults), and the values both a setting and
the part that uses it start from (the NoojeeContact client's limits, delivery's timings).
:mod:`agi_bridge.settings` takes them from here, so ``agi-bridge --help`` does not pay for
pydantic and a part built without settings (a test, a script) agrees with a configured one.
"""

from __future__ import annotations

from typing import Final

ENV_PREFIX: Final = "AGI_BRIDGE_"
CONFIG_ENV: Final = ENV_PREFIX + "CONFIG"

# Loopback by default: neither FastAGI nor /metrics has any authentication.
LISTEN: Final = "127.0.0.1:4573"
METRICS_LISTEN: Final = "127.0.0.1:9573"

# What a request names when the call does not say: the extension, which every dialplan has.
DEFAULT_BY: Final = "extension"

# --- NoojeeContact: connections and timeouts ---------------------------------------------
# Connecting is a TCP plus TLS handshake to a server on the same site or a nearby data centre:
# 2 s is many round trips; longer only keeps an Asterisk channel waiting on a dead host.
NOOJEE_CONNECT_TIMEOUT: Final = 2.0
# Per read/write/pool wait. NoojeeContact answers recording calls in milliseconds; 5 s covers
# a loaded server while still telling the dialplan something before a caller notices.
NOOJEE_TIMEOUT: Final = 5.0
# Pool size and request concurrency are one number: a pool smaller than the requests in flight
# reopens TLS connections all the time, a larger one idles. 64 is far more than the concurrent
# recording changes one PBX produces, and small enough that a flood cannot exhaust the
# server's connector threads (Tomcat's default is 200).
NOOJEE_MAX_CONNECTIONS: Final = 64

# --- Delivery --------------------------------------------------------------------------------
# A sync attempt confirmed this fast never touches the disk: writing the request ahead only to
# delete it again cost a quarter of the bridge's CPU per stop (bench/README.md). What that
# gives up: a crash (kill -9, power) in an attempt's first 100 ms, while Asterisk still waits
# and then reports AGISTATUS=FAILURE, loses that one request; the restart that follows any
# crash makes every call fail that way for seconds, which dwarfs this window.
WRITE_AHEAD_AFTER: Final = 0.1
# A phone's or a dialplan's repeat of the same action on the same call comes within seconds
# (a double press, a hangup handler after a stop); a minute covers them all.
DEDUP_WINDOW: Final = 60.0
# A request by extension acts on whatever call the extension is on when it ARRIVES; queue
# calls follow each other within seconds when wrap-up is 0. 10 s covers a NoojeeContact blip
# (the worker's first retries) while the agent is still on the call that asked; past it the
# request is settled "expired", never sent. (The call's own stop by uniqueid or linkedid
# cancels it sooner, and is kept for retry_max_age.)
EXTENSION_MAX_AGE: Final = 10.0
# A day of attempts with backoff capped at 5 minutes: an outage over a weekend night is ridden
# out, and a request nobody can deliver reaches the dead letters (and a page) within a day.
RETRY_MAX_ATTEMPTS: Final = 200
RETRY_MAX_AGE: Final = 86400.0
RETRY_INITIAL_DELAY: Final = 1.0
RETRY_MAX_DELAY: Final = 300.0


def env_name(field: str) -> str:
    """The environment variable that overrides setting ``field``."""
    return ENV_PREFIX + field.upper()
