"""``petals-gateway serve``: build the settings once, configure logging, run uvicorn with create_app."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from gateway.settings import GatewaySettings
from swarm.runtime import prefer_passive_openmp

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petals-gateway",
        description="OpenAI-compatible HTTP gateway to a petals-next swarm. Every flag can also be set with "
        "an environment variable PETALS_GATEWAY_<NAME> (e.g. PETALS_GATEWAY_API_KEYS=k1,k2); flags win.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the OpenAI API",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models and /health. Without "
        "--initial-peers, start a local dev swarm (a bootstrap peer and block servers) first.",
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")
    serve.add_argument(
        "--initial-peers", nargs="+", metavar="MADDR",
        help="multiaddrs of swarm peers to join; omit to start an embedded local swarm",
    )  # fmt: skip
    serve.add_argument("--models", nargs="+", metavar="REF", help="model references to serve")
    serve.add_argument(
        "--prompts", nargs="+", metavar="NAME=PATH",
        help="tuned prompts (saved by swarm.tuning) served as model id MODEL:NAME of the first model",
    )  # fmt: skip
    serve.add_argument("--api-keys", nargs="+", metavar="KEY", help="accepted bearer tokens (default: no auth)")
    serve.add_argument("--api-keys-file", help="file of accepted bearer tokens, one per line")
    serve.add_argument("--rate-limit-rpm", type=int, help="requests per minute per API key (default 0: no limit)")
    serve.add_argument("--rate-limit-tpm", type=int, help="tokens per minute per API key (default 0: no limit)")
    serve.add_argument(
        "--swarm-secret",
        help="secret of a private swarm (prefer PETALS_GATEWAY_SWARM_SECRET: flags show in process lists)",
    )
    serve.add_argument(
        "--spot-check-probability", type=float,
        help="share of span steps re-run on a second server to catch wrong activations (default 0.02; 0: off)",
    )  # fmt: skip
    serve.add_argument(
        "--push", action=argparse.BooleanOptionalAction, default=None,
        help="servers pass each step's output straight to the next server (default off)",
    )  # fmt: skip
    serve.add_argument("--cache-dir", help="where converted models are kept")
    serve.add_argument("--embedded-servers", type=int, help="block servers of the embedded swarm (default 2)")
    serve.add_argument("--device", help="torch device of the local head (default cpu)")
    serve.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the local head (default float32)"
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="logging level")
    return parser


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    """Flags that were given override the environment; the rest comes from env or defaults."""
    overrides: dict[str, Any] = {
        key: value for key, value in vars(args).items() if key != "command" and value is not None
    }
    return GatewaySettings(**overrides)


def configure_logging(level: str) -> None:
    from gateway.request_context import RequestIdLogFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdLogFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> None:
    prefer_passive_openmp()
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    configure_logging(settings.log_level)

    import uvicorn

    from gateway.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the handler configured above
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
