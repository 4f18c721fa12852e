"""`petals-server`: host transformer blocks in a swarm (`run`), start a swarm's entry point (`bootstrap`), or
show who serves what (`status`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from server.settings import ServerSettings
from swarm.runtime import prefer_passive_openmp

EPILOG = """examples:
  petals-server bootstrap --host-maddrs /ip4/0.0.0.0/tcp/31337
  petals-server run --model smollm2-135m-instruct --new-swarm
  petals-server run --model smollm2-135m-instruct --blocks 15 --initial-peers /ip4/10.0.0.5/tcp/31337/p2p/Qm...
  petals-server status --initial-peers /ip4/10.0.0.5/tcp/31337/p2p/Qm...
Every flag can also be set as an environment variable PETALS_SERVER_<FLAG> (e.g. PETALS_SERVER_CACHE_BUDGET_MB).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petals-server",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="serve a span of a model's blocks",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fields = ServerSettings.model_fields
    for name, field in fields.items():
        if name in ("new_swarm",):
            continue
        flag = "--" + name.replace("_", "-")
        kwargs: dict = {"dest": name, "default": None, "help": field.description}
        if name in ("initial_peers", "host_maddrs", "announce_maddrs"):
            kwargs["nargs"] = "+"
            kwargs["metavar"] = "MADDR"
        elif name == "adapters":
            kwargs["nargs"] = "+"
            kwargs["metavar"] = "NAME=PATH"
        elif _scalar_type(field.annotation) in (int, float):
            kwargs["type"] = _scalar_type(field.annotation)
        run.add_argument(flag, **kwargs)
    run.add_argument(
        "--new-swarm",
        dest="new_swarm",
        action="store_true",
        default=None,
        help=fields["new_swarm"].description,
    )

    boot = commands.add_parser("bootstrap", help="run a DHT-only peer that others join through")
    boot.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"], metavar="MADDR")
    boot.add_argument("--identity-path", type=Path, default=None, help="private key file for a stable peer id")
    boot.add_argument("--ready-file", type=Path, default=None, help="write join info as JSON here once up")
    boot.add_argument("--log-level", default="INFO")

    status = commands.add_parser(
        "status", help="print each model's block coverage and a table of servers, then exit (1 if not all ready)"
    )
    status.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="any peer of the swarm")
    status.add_argument("--model", default=None, metavar="ID", help="only this model (default: every announced one)")
    status.add_argument("--probe-timeout-s", type=float, default=2.0, help="how long each server may take to answer")
    status.add_argument("--log-level", default="WARNING")
    return parser


def _scalar_type(annotation: object) -> object:
    """int for ``int`` and ``int | None``, float likewise; anything else is passed through as a string."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0] if len(args) == 1 else None


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("hivemind", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: list[str] | None = None) -> None:
    prefer_passive_openmp()
    args = build_parser().parse_args(argv)
    if args.command == "bootstrap":
        configure_logging(args.log_level)
        from server.node import run_bootstrap

        asyncio.run(run_bootstrap(args.host_maddrs, args.identity_path, args.ready_file))
        return
    if args.command == "status":
        configure_logging(args.log_level)
        from server.status import run_status

        raise SystemExit(run_status(args.initial_peers, args.model, args.probe_timeout_s))
    given = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    try:
        settings = ServerSettings(**given)
    except ValidationError as e:
        raise SystemExit(f"petals-server: invalid settings:\n{e}") from None
    configure_logging(settings.log_level)
    from server.node import serve

    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
