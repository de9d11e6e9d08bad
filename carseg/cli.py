"""``carseg``: one command for training and serving. Each package registers its own subcommands;
a subcommand imports what it runs only when it runs (``carseg serve --queue redis`` loads no torch)."""

from __future__ import annotations

import argparse

from carseg import threads
from service import cli as service_cli
from service import logs
from training import cli as training_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carseg", description="calibrated stochastic segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    training_cli.register(sub)
    service_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    logs.configure_early()
    parser = build_parser()
    args = parser.parse_args(argv)
    # before any command imports torch: OpenMP reads its thread count and wait policy when it loads
    # (registering the commands imports no torch; tests/test_threads.py checks it)
    try:
        threads.configure(getattr(args, "threads", None))
    except ValueError as exc:
        parser.error(f"--threads: {exc}")
    args.func(args)
