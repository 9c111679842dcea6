"""Command lines: `callboard server|demo`, and `cli.run_app(opts)` for agent scripts
(`python agent.py start|dev|connect --room NAME`).

Only this module installs signal handlers and maps errors to exit codes: 0 ok (including a
drain after SIGTERM/SIGINT), 1 runtime failure (server unreachable past max_retry, the
worker could not start — HTTP port taken, job executor failed — or the `connect` job failed),
2 invalid options.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final

from callboard.log import LogFormat, get_logger, setup_logging
from callboard.server.config import DEFAULT_PORT, ConfigError, ServerConfig, parse_keys
from callboard.worker.errors import ConnectionGiveUp, WorkerStartError
from callboard.worker.options import OptionsError, WorkerOptions

if TYPE_CHECKING:
    from callboard.worker.worker import Worker

log = get_logger("cli")

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
DEV_MODE_ENV: Final = "LIVEKIT_DEV_MODE"


def _server_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("server", help="run the embedded LiveKit-compatible server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 7880; 0 = any)")
    p.add_argument(
        "--keys",
        help="API keys as 'key: secret[, key2: secret2]' (or LIVEKIT_KEYS); "
        "default: the dev pair devkey/secret",
    )
    p.add_argument(
        "--dev", action="store_true", help="allow the dev keys on a non-loopback address"
    )
    p.add_argument("--region", default="local", help="region reported to workers")
    p.add_argument(
        "--sip-port", type=int, default=None, help="run the SIP gateway on this UDP/TCP port"
    )


def _demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="a phone conversation with a voice agent on one machine, offline"
    )
    p.add_argument("--calls", type=int, default=1, help="concurrent calls to place (default 1)")
    p.add_argument(
        "--out", type=Path, default=None, help="where to save the calls' WAVs and the log"
    )


def _call_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("call", help="place a SIP call from this terminal (e.g. to the gateway)")
    p.add_argument("address", nargs="?", default="127.0.0.1:5060", help="SIP server host:port")
    p.add_argument("--to", default="+15550100", help="number to call")
    p.add_argument("--from", dest="caller", default="+56975231235", help="calling number")
    p.add_argument("--wav", type=Path, help="16-bit WAV file to play")
    p.add_argument("--say", default="", help="text to speak (espeak-ng) instead of --wav")
    p.add_argument("--save", type=Path, help="save what the other side says to this WAV")
    p.add_argument("--listen", type=float, default=5.0, help="seconds to listen after speaking")
    p.add_argument("--dtmf", default="", help="digits to send (RFC 4733)")
    p.add_argument("--username", default="", help="digest username, if the trunk asks")
    p.add_argument("--password", default="", help="digest password, if the trunk asks")
    p.add_argument(
        "--no-wait-greeting",
        dest="wait_greeting",
        action="store_false",
        help="speak at once instead of after the other side's greeting",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callboard", description=__doc__)
    parser.add_argument("--log-format", choices=["json", "pretty"], default=None)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _server_parser(sub)
    _demo_parser(sub)
    _call_parser(sub)
    return parser


def install_stop(stop: asyncio.Event, exit_now: Callable[[int], object] = os._exit) -> None:
    """SIGINT or SIGTERM sets `stop`; a second one exits at once: a shutdown stuck waiting
    for a thread would otherwise ignore every further signal."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("signal received: stopping", extra={"signal": sig.name})
            stop.set()
            return
        log.warning(
            "second signal: exiting without finishing the shutdown",
            extra={"signal": sig.name},
        )
        logging.shutdown()
        exit_now(128 + sig.value)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


async def _run_server(config: ServerConfig) -> None:
    stop = asyncio.Event()
    install_stop(stop)
    from callboard.server.app import EmbeddedServer

    await EmbeddedServer(config).serve_forever(stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fmt: LogFormat = args.log_format or ("pretty" if sys.stderr.isatty() else "json")
    setup_logging(fmt, args.log_level.upper())
    # The public dev secret is short by design; pyjwt would warn on every token.
    warnings.filterwarnings("ignore", message="The HMAC key is")
    try:
        if args.command == "server":
            config = ServerConfig.from_env(
                host=args.host,
                port=args.port,
                keys=parse_keys(args.keys) if args.keys else None,
                dev=args.dev,
                region=args.region,
                sip_port=args.sip_port,
            )
            asyncio.run(_run_server(config))
        elif args.command == "demo":
            from callboard.demo import run_demo

            if args.calls < 1:
                raise ConfigError("--calls must be at least 1")
            return asyncio.run(run_demo(calls=args.calls, out_dir=args.out))
        elif args.command == "call":
            return _call(args)
    except ConfigError as e:
        print(f"callboard: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        logging.getLogger("callboard").exception("callboard failed")
        return EXIT_FAILURE
    return EXIT_OK


def _call(args: argparse.Namespace) -> int:
    from callboard.server.sip.phone import CallOptions, CallOptionsError, run_call

    fields = ("address", "to", "caller", "wav", "say", "save", "listen", "dtmf")
    try:
        options = CallOptions(
            **{
                name: getattr(args, name)
                for name in (*fields, "username", "password", "wait_greeting")
            }
        )
    except CallOptionsError as e:
        raise ConfigError(str(e)) from None
    # the phone's own SIP socket is not news to a person placing a call
    logging.getLogger("callboard.server.sip.transport").setLevel(logging.WARNING)
    return asyncio.run(run_call(options))


# -- cli.run_app: `python agent.py start | dev | connect --room NAME` ---------------------------


def _app_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run a callboard agent worker.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("start", "production: JSON logs, production defaults"),
        ("dev", "development: readable debug logs, dev defaults"),
        ("connect", "run one job for a room (created if missing) without registering, exit"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--url", help="LiveKit server URL (default: LIVEKIT_URL)")
        p.add_argument("--api-key", help="API key (default: LIVEKIT_API_KEY)")
        p.add_argument("--api-secret", help="API secret (default: LIVEKIT_API_SECRET)")
        p.add_argument("--log-level", default=None)
        p.add_argument(
            "--jobs-per-process",
            type=int,
            default=None,
            help="jobs one job process may run at once (default: the agent's options, 1)",
        )
        if name == "connect":
            p.add_argument("--room", required=True, help="room to dispatch the agent to")
    return parser


def _bad_options_exit(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """An agent script builds its WorkerOptions before it reaches run_app: an invalid option
    raised there is also one line and exit 2, not a traceback."""
    if issubclass(exc_type, OptionsError):
        print(f"callboard: error: invalid worker options: {exc}", file=sys.stderr, flush=True)
        os._exit(EXIT_USAGE)
    _previous_excepthook(exc_type, exc, tb)


_previous_excepthook = sys.excepthook
sys.excepthook = _bad_options_exit


def run_app(opts: WorkerOptions, argv: Sequence[str] | None = None) -> None:
    """Entry point of an agent script; exits with the worker's exit code."""
    sys.exit(app_main(opts, argv))


def app_main(opts: WorkerOptions, argv: Sequence[str] | None = None) -> int:
    args = _app_parser().parse_args(argv)
    devmode = args.command in ("dev", "connect")
    setup_logging(
        "pretty" if devmode else "json",
        (args.log_level or ("DEBUG" if devmode else "INFO")).upper(),
    )
    warnings.filterwarnings("ignore", message="The HMAC key is")
    overrides = {
        k: v
        for k, v in (
            ("ws_url", args.url),
            ("api_key", args.api_key),
            ("api_secret", args.api_secret),
            ("jobs_per_process", args.jobs_per_process),
        )
        if v is not None and v != ""
    }
    from callboard.worker.worker import Worker  # the agent module imports this file cheaply

    if args.command == "dev":
        os.environ[DEV_MODE_ENV] = "1"  # as livekit-agents' dev: some plugins read it
    try:
        worker = Worker(
            dataclasses.replace(opts, **overrides),
            devmode=devmode,
            register=args.command != "connect",
        )
    except OptionsError as e:
        print(f"callboard: error: invalid worker options: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "connect":
            return asyncio.run(_connect_one(worker, args.room))
        asyncio.run(_run_worker(worker, watch=args.command == "dev"))
    except (ConnectionGiveUp, WorkerStartError) as e:
        print(f"callboard: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _install_worker_signals(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        log.info("signal received", extra={"signal": sig.name, "count": signals_seen})
        worker.request_shutdown(fast=signals_seen > 1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


async def _run_worker(worker: Worker, watch: bool = False) -> None:
    _install_worker_signals(worker)
    reloader = asyncio.create_task(_reload_on_change(worker)) if watch else None
    try:
        await worker.run()
    finally:
        if reloader is not None:
            reloader.cancel()


def _agent_dir() -> str:
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    return os.path.dirname(os.path.abspath(main_file)) if main_file else os.getcwd()


async def _reload_on_change(worker: Worker) -> None:
    """`dev`: when a .py file under the agent's directory changes, reload idle processes."""
    import watchfiles

    root = _agent_dir()
    reload = getattr(worker.executor, "reload", None)
    if reload is None:
        return
    log.info("watching for changes", extra={"path": root})
    async for changes in watchfiles.awatch(root, watch_filter=watchfiles.PythonFilter()):
        log.info("files changed, reloading", extra={"files": sorted(p for _, p in changes)})
        await reload()


async def _connect_one(worker: Worker, room: str) -> int:
    """`connect --room`, as livekit-agents does it: the worker does not register, the room is
    created if it does not exist, and exactly one job for it runs here; returns when it ended."""
    from livekit import api

    _install_worker_signals(worker)
    run = asyncio.create_task(worker.run())
    started = asyncio.create_task(worker.started.wait())
    await asyncio.wait({run, started}, return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        started.cancel()
        await run  # a WorkerStartError surfaces here
        return EXIT_FAILURE
    r = worker.options
    try:
        async with api.LiveKitAPI(r.ws_url, r.api_key, r.api_secret) as lk:
            listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
            info = (
                listed.rooms[0]
                if listed.rooms
                else await lk.room.create_room(api.CreateRoomRequest(name=room))
            )
        ended = asyncio.ensure_future(worker.wait_first_job_end())
        await worker.run_local_job(info, f"agent-{secrets.token_hex(6)}")
        await asyncio.wait({ended, run}, return_when=asyncio.FIRST_COMPLETED)
    except Exception as e:
        print(f"callboard: error: connect to room {room!r} failed: {e}", file=sys.stderr)
        worker.request_shutdown(fast=True)
        await run
        return EXIT_FAILURE
    worker.request_shutdown()
    await run
    return EXIT_OK if ended.done() and ended.result().ok else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
