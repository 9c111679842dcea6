"""The `callboard` command: `server` (the embedded LiveKit-compatible server) and `demo`.

Only this module installs signal handlers and maps errors to exit codes:
0 ok, 1 runtime failure, 2 invalid options.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Final

from callboard.log import LogFormat, get_logger, setup_logging
from callboard.server.app import EmbeddedServer
from callboard.server.config import DEFAULT_PORT, ConfigError, ServerConfig, parse_keys

log = get_logger("cli")

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2


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


def _demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="run the whole flow on one machine: server, workers, a call, its job"
    )
    p.add_argument("--calls", type=int, default=3, help="how many calls to place (default 3)")
    p.add_argument("--workers", type=int, default=2, help="simulated workers (default 2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callboard", description=__doc__)
    parser.add_argument("--log-format", choices=["json", "pretty"], default=None)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _server_parser(sub)
    _demo_parser(sub)
    return parser


def _install_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def _run_server(config: ServerConfig) -> None:
    stop = asyncio.Event()
    _install_stop(stop)
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
            )
            asyncio.run(_run_server(config))
        elif args.command == "demo":
            from callboard.demo import run_demo

            if args.calls < 1 or args.workers < 1:
                raise ConfigError("--calls and --workers must be at least 1")
            return asyncio.run(run_demo(calls=args.calls, workers=args.workers))
    except ConfigError as e:
        print(f"callboard: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        logging.getLogger("callboard").exception("callboard failed")
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
