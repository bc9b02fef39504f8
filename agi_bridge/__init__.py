"""agi-bridge: a FastAGI server that stops and starts NoojeeContact recordings."""

__version__ = "0.1.0"
