"""``agi-bridge demo``: the bridge and a NoojeeContact simulator in one process, so a newcomer
can point Asterisk (or ``agi-bridge fake-call``) at it with nothing else configured."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from agi_bridge.app import Bridge, run_until_signal
from agi_bridge.loading import load_settings
from agi_bridge.logs import configure_logging, get_logger
from agi_bridge.settings import Settings
from agi_bridge.testing.defaults import DEMO_DATA_DIR, DEMO_KEY, DEMO_PORT
from agi_bridge.testing.simulator import NoojeeSimulator, ReceivedRequest, SimulatorConfig

log = get_logger("agi_bridge.testing.demo")


async def run_demo(config_file: Path | None) -> int:
    """Serve until SIGTERM/SIGINT with the simulator as NoojeeContact (plain HTTP, loopback).

    Every setting but NoojeeContact's address and key still comes from the file/environment.
    """
    key = SecretStr(DEMO_KEY)
    if config_file is None:
        settings = Settings(
            noojee_url="http://127.0.0.1", noojee_api_key=key, data_dir=DEMO_DATA_DIR
        )
    else:
        settings = load_settings(config_file)
    configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=[DEMO_KEY])

    def received(request: ReceivedRequest) -> None:
        params = {k: v for k, v in request.params.items() if k not in ("apiKey", "hash")}
        log.info(
            "simulator.received",
            path=request.path,
            params=params,
            http_status=request.http_status,
            answered_code=request.answered_code,
        )

    simulator = NoojeeSimulator(SimulatorConfig(api_key=DEMO_KEY), on_request=received)
    await simulator.start("127.0.0.1", DEMO_PORT)
    try:
        log.info(
            "demo.simulator.listening",
            base_url=simulator.base_url,
            api_key=DEMO_KEY,
            agents=sorted(simulator.config.agents),
        )
        settings = settings.model_copy(
            update={
                "noojee_url": simulator.base_url,
                "noojee_auth": "apikey",
                "noojee_api_key": key,
                # Always its own spool, whatever the environment or file say: the simulator
                # must never "deliver" (and so delete) stops queued for a real NoojeeContact.
                "data_dir": DEMO_DATA_DIR,
            }
        )
        return await run_until_signal(Bridge(settings))
    finally:
        await simulator.stop()
