"""``agi-bridge``: the command line. Every setting lives in :mod:`agi_bridge.settings`; the CLI
only adds ``--config`` and the arguments of one-off commands, so nothing is defined twice.

Each command imports what it needs when it runs: ``--help`` (and a usage error), which end in
the parser, load neither the settings' pydantic, the HTTP client, the spool nor the event loop,
and ``serve`` loads none of the testing tools."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from agi_bridge import __version__, defaults
from agi_bridge.defaults import CONFIG_ENV, env_name
from agi_bridge.testing.defaults import (
    DEFAULT_CHANNEL,
    DEFAULT_UNIQUEID,
    DEMO_DATA_DIR,
    DEMO_KEY,
    DEMO_PORT,
)
from agi_bridge.vocabulary import ACTIONS, Action, RecordingRequest, target_kind

if TYPE_CHECKING:
    from agi_bridge.settings import Settings
    from agi_bridge.spool import SpoolEntry

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # the command ran and what it tried failed (send, spool)
EXIT_CONFIG: Final = 2  # the configuration is unusable: nothing was started


def _settings(args: argparse.Namespace) -> Settings:
    from agi_bridge.loading import load_settings, settings_warnings
    from agi_bridge.logs import configure_logging, get_logger

    settings = load_settings(args.config)
    configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=[settings.api_key])
    log = get_logger("agi_bridge.cli")
    for warning in settings_warnings(settings):
        log.warning("settings.warning", problem=warning)
    return settings


def _run(main: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    """Run ``main()`` on the fastest event loop installed (uvloop: the ``fast`` extra)."""
    import asyncio

    try:
        import uvloop  # optional: measured in bench/, not required
    except ImportError:
        return asyncio.run(main()) or EXIT_OK
    return uvloop.run(main()) or EXIT_OK


# --- commands ------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from agi_bridge.app import serve

    settings = _settings(args)
    return _run(lambda: serve(settings))


def cmd_check_config(args: argparse.Namespace) -> int:
    from agi_bridge.loading import load_settings, settings_warnings

    settings = load_settings(args.config)
    json.dump(settings.masked(), sys.stdout, indent=2, sort_keys=True)
    print()
    for warning in (*settings_warnings(settings), *_tls_warnings(settings)):
        print(f"warning: {warning}", file=sys.stderr)
    print("configuration OK", file=sys.stderr)
    # The spool is not configuration, but a damaged one is what the operator must hear of
    # before (re)starting: the bridge runs on it and fails to queue.
    from agi_bridge.spool import SALVAGE, SPOOL_FILE, damage

    spool = settings.data_dir / SPOOL_FILE
    problem = damage(spool)
    if problem is not None:
        print(f"agi-bridge: the spool {spool} is damaged ({problem}): {SALVAGE}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _send_request(args: argparse.Namespace, settings: Settings) -> RecordingRequest:
    """The checks and the agent lookup of a call from the dialplan: what send tries is what
    the bridge would send. The identifier goes out as given, which is what id= means."""
    from agi_bridge.calls import Rejected, parameters_from, request_for

    given = (("id", args.uniqueid or args.extension), ("agent", args.agent), ("tag", args.tag))
    parameters = parameters_from(
        ((key, value) for key, value in given if value is not None), "the command line"
    )
    if parameters.id is None:
        raise Rejected("the extension or uniqueid is empty")
    kind = target_kind("extension" if args.extension else "id")
    return request_for(
        args.action, parameters.id, args.extension, parameters, settings.call_defaults, kind
    )


def _tls_warnings(settings: Settings) -> list[str]:
    """CA certificates this Python's strict X.509 mode will refuse (3.13+, a CA without keyUsage).

    Warnings, not problems: the file may hold other CAs besides the one NoojeeContact's
    certificate chains to, and only a handshake (``send``) tells for sure.
    """
    from agi_bridge.settings import setting_name
    from agi_bridge.tls import STRICT_ADVICE, cas_without_key_usage, strict_by_default

    ca_file = settings.noojee_ca_file
    if ca_file is None or not (
        settings.noojee_verify_tls and settings.noojee_tls_strict and strict_by_default()
    ):
        return []
    where = f"{setting_name('noojee_ca_file')} {ca_file}"
    try:
        subjects = cas_without_key_usage(ca_file)
    except OSError as exc:  # ssl.SSLError included: not PEM certificates
        return [f"{where} cannot be loaded as PEM certificates: {exc}"]
    return [
        f"{where}: the CA {subject} has no keyUsage extension, so requests will fail with "
        f"'CA cert does not include key usage extension': {STRICT_ADVICE}"
        for subject in subjects
    ]


def cmd_send(args: argparse.Namespace) -> int:
    from agi_bridge.app import noojee_client
    from agi_bridge.calls import Rejected
    from agi_bridge.tls import verify_advice

    settings = _settings(args)
    try:
        request = _send_request(args, settings)
    except Rejected as exc:
        print(f"agi-bridge: not sent: {exc.reason}", file=sys.stderr)
        return EXIT_FAILED

    async def send() -> int:
        # One request: one connection.
        async with noojee_client(settings, max_connections=1) as client:
            params = {"extenOrUniqueId": request.target}
            if request.agent:
                params["agentLoginName"] = request.agent
            if request.tag:
                params["tag"] = request.tag
            shown = "&".join(f"{k}={v}" for k, v in params.items())
            print(
                f"POST {settings.noojee_url}/CallManagementAPI/{request.action}?{shown}"
                f" (+ {settings.noojee_auth} authentication, secret not shown)"
            )
            started = time.monotonic()
            result = await client.send(request)
            elapsed = (time.monotonic() - started) * 1000
        print(
            f"{result.kind.value}: {result.message}"
            f" (HTTP {result.http_status}, Code {result.code}, {elapsed:.0f} ms)"
        )
        if not result.ok:
            print(
                "transient: try again later"
                if result.transient
                else "permanent: fix the request or NoojeeContact's settings",
                file=sys.stderr,
            )
            if result.tls_verify_failed:
                print(f"what to do: {verify_advice(result.message)}", file=sys.stderr)
        return EXIT_OK if result.ok else EXIT_FAILED

    return _run(send)


def _print_entries(entries: Sequence[SpoolEntry], now: float, *, dead: bool) -> None:
    """One line per entry: the target's kind (extension: acts on whatever call the extension
    is on when it arrives) and, for a dead letter, why it was settled."""
    why = f"  {'why':11}" if dead else ""
    print(
        f"{'id':>6}  {'action':6}  {'target':20}  {'agent':12}  {'kind':9}  {'age':>8}  "
        f"{'tries':>5}{why}  error"
    )
    for e in entries:
        r = e.request
        why = f"  {e.reason or '-':11}" if dead else ""
        print(
            f"{e.id:>6}  {r.action:6}  {r.target[:20]:20}  {(r.agent or '-')[:12]:12}"
            f"  {r.kind:9}  {_age(now - e.created):>8}  {e.attempts:>5}{why}  {e.last_error or ''}"
        )


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_spool(args: argparse.Namespace) -> int:
    from agi_bridge.loading import load_settings
    from agi_bridge.spool import Spool

    settings = load_settings(args.config, for_noojee=False)
    spool = Spool(settings.data_dir, fsync=settings.spool_fsync)
    spool.open(create=False)
    admin = spool.admin
    try:
        if args.spool_command == "list":
            table: Literal["pending", "dead"] = "dead" if args.dead else "pending"
            entries = admin.list(table)
            _print_entries(entries, time.time(), dead=args.dead)
            stats = admin.stats()
            oldest = (
                "-" if stats.oldest_pending is None else _age(time.time() - stats.oldest_pending)
            )
            print(f"\npending {stats.pending} (oldest {oldest}), dead letters {stats.dead}")
        elif args.spool_command == "retry":
            moved = admin.retry_dead(args.ids or None, force=args.force)
            print(
                f"{len(moved)} dead letter(s) moved back to pending, same ids"
                f"{': ' if moved else ''}{', '.join(map(str, moved))}; a running bridge sends "
                "them within a second"
            )
        else:
            table = "dead" if args.dead else "pending"
            if not args.ids and not args.all:
                print("name the entries to purge (ids) or pass --all", file=sys.stderr)
                return EXIT_FAILED
            removed = admin.purge(table, args.ids or None)
            print(f"{removed} {table} entr{'y' if removed == 1 else 'ies'} deleted for good")
    finally:
        spool.close()
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from agi_bridge.testing.simulator import SimulatorConfig, run_simulator

    config = SimulatorConfig(api_key=args.api_key)
    if args.agent:
        every: frozenset[Action] = frozenset(ACTIONS)
        config = dataclasses.replace(config, agents=dict.fromkeys(args.agent, every))
    host, _, port = args.listen.rpartition(":")
    return _run(
        lambda: run_simulator(
            listen_host=host.strip("[]"),
            listen_port=int(port),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            config=config,
            record=args.record,
        )
    )


def cmd_fake_call(args: argparse.Namespace) -> int:
    import asyncio

    from agi_bridge.settings import Address
    from agi_bridge.testing.fake_asterisk import Call, run_call

    address = Address.parse(args.to)
    call = Call(
        script=args.script,
        arguments=tuple(args.arguments),
        channel=args.channel,
        uniqueid=args.uniqueid,
        host=address.host,
        port=address.port,
    )
    result = asyncio.run(run_call(call))
    print(f"AGISTATUS={result.agistatus}")
    for name, value in result.variables.items():
        print(f"{name}={value}")
    print(f"held the channel {result.hold * 1000:.1f} ms", file=sys.stderr)
    if result.reason:
        print(f"agi-bridge: {result.reason}", file=sys.stderr)
    return EXIT_OK if result.agistatus == "SUCCESS" else EXIT_FAILED


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"agi-bridge {__version__}")
    return EXIT_OK


# --- parser --------------------------------------------------------------------------------


def _global_options(default: object) -> argparse.ArgumentParser:
    """The options every command takes, accepted before or after the command's name.

    argparse shares an option's action between a parent and the parsers built from it, so the
    top level (``default=None``) and the commands (``default=SUPPRESS``: a command must not
    reset ``--config`` given before its name) each get their own copy of this one definition.
    """
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--config",
        type=Path,
        default=default,
        help=f"TOML settings file (default: ${CONFIG_ENV})",
    )
    return options


def build_parser() -> argparse.ArgumentParser:
    common = _global_options(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="agi-bridge",
        parents=[_global_options(None)],
        description="FastAGI server that stops and starts NoojeeContact call recordings "
        "for the Asterisk dialplan.",
        epilog=f"Settings come from a TOML file (--config or ${CONFIG_ENV}) and AGI_BRIDGE_* "
        "environment variables; `agi-bridge check-config` shows the effective values.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", parents=[common], help="run the FastAGI server in the foreground"
    )
    serve.set_defaults(func=cmd_serve)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="run the bridge against a built-in NoojeeContact simulator (try it out)",
        description=f"The bridge on {defaults.LISTEN} (metrics, health: "
        f"{defaults.METRICS_LISTEN}; {env_name('listen')} and "
        f"{env_name('metrics_listen')} change them), NoojeeContact's simulator on "
        f"127.0.0.1:{DEMO_PORT} (plain HTTP, key {DEMO_KEY}), the spool in "
        f"{DEMO_DATA_DIR}/ under the working directory whatever the settings say, so it never "
        f"mixes with a real one: `AGI_BRIDGE_DATA_DIR={DEMO_DATA_DIR} agi-bridge spool list` "
        "shows it. Stop with Ctrl-C.",
    )
    demo.set_defaults(func=cmd_demo)

    check = commands.add_parser(
        "check-config",
        parents=[common],
        help="validate the settings and print them (secrets masked)",
    )
    check.set_defaults(func=cmd_check_config)

    send = commands.add_parser(
        "send",
        parents=[common],
        help="send one stop/start to NoojeeContact now (tests credentials, TLS, IP list)",
    )
    send.add_argument("action", choices=list(ACTIONS))
    target = send.add_mutually_exclusive_group(required=True)
    target.add_argument("--uniqueid", help="an Asterisk uniqueid, e.g. 1795811316.1")
    target.add_argument("--extension", help="an extension, e.g. 410")
    send.add_argument(
        "--agent", help="agentLoginName (default: as for a call, from agents or default_agent)"
    )
    send.add_argument("--tag", help="tag stored with the recording (start only)")
    send.set_defaults(func=cmd_send)

    spool = commands.add_parser(
        "spool", parents=[common], help="inspect and manage queued and dead-lettered requests"
    )
    spool_commands = spool.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    listing = spool_commands.add_parser(
        "list", parents=[common], help="list pending (or --dead) requests"
    )
    listing.add_argument("--dead", action="store_true", help="list the dead letters")
    retry = spool_commands.add_parser(
        "retry", parents=[common], help="move dead letters back to pending"
    )
    retry.add_argument("ids", nargs="*", type=int, help="entry ids (default: all dead letters)")
    retry.add_argument(
        "--force",
        action="store_true",
        help="also unconfirmed starts (may add a recording leg) and expired or cancelled "
        "requests by extension (may reach another call): check NoojeeContact first",
    )
    purge = spool_commands.add_parser("purge", parents=[common], help="delete entries for good")
    purge.add_argument("ids", nargs="*", type=int, help="entry ids")
    purge.add_argument("--dead", action="store_true", help="purge dead letters, not pending")
    purge.add_argument("--all", action="store_true", help="every entry of the table")
    spool.set_defaults(func=cmd_spool)

    simulate = commands.add_parser(
        "simulate-noojee", help="run a NoojeeContact simulator (try the dialplan without one)"
    )
    simulate.add_argument(
        "--listen", default=f"127.0.0.1:{DEMO_PORT}", help="host:port (default %(default)s)"
    )
    simulate.add_argument(
        "--api-key", default=DEMO_KEY, help="key it accepts (default %(default)s)"
    )
    simulate.add_argument(
        "--agent",
        action="append",
        default=[],
        help="an agentLoginName it knows, may repeat (default: Fred, Wilma, Barney, Pebbles)",
    )
    simulate.add_argument("--tls-cert", type=Path, help="PEM certificate: serve HTTPS")
    simulate.add_argument("--tls-key", type=Path, help="PEM key for --tls-cert")
    simulate.add_argument("--record", type=Path, help="append each request as a JSON line here")
    simulate.set_defaults(func=cmd_simulate)

    fake = commands.add_parser(
        "fake-call",
        help="act as Asterisk: run one AGI session against a bridge and print the "
        "variables it sets",
    )
    fake.add_argument("script", help="route, e.g. recording/stop or 'recording/stop?by=uniqueid'")
    fake.add_argument(
        "arguments", nargs="*", help="AGI arguments, e.g. Fred or agent=Fred mode=async"
    )
    fake.add_argument(
        "--to", default=defaults.LISTEN, help="bridge host:port (default %(default)s)"
    )
    fake.add_argument(
        "--channel", default=DEFAULT_CHANNEL, help="agi_channel (default %(default)s)"
    )
    fake.add_argument(
        "--uniqueid", default=DEFAULT_UNIQUEID, help="agi_uniqueid (default %(default)s)"
    )
    fake.set_defaults(func=cmd_fake_call)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from agi_bridge.testing.demo import run_demo

    return _run(lambda: run_demo(args.config))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Past the parser, which ends --help: from here on a command runs and loads what it needs.
    from agi_bridge.settings import ConfigError
    from agi_bridge.spool import SpoolError

    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"agi-bridge: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SpoolError as exc:
        print(f"agi-bridge: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # `agi-bridge check-config | head`: the reader left; nothing is wrong with us. Before
        # OSError, of which it is a subclass. Output still buffered for the closed pipe would
        # fail again at exit: point stdout at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:  # e.g. the listen address is in use or not ours
        print(f"agi-bridge: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
