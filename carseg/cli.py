"""``carseg``: one command for training and serving. Each package registers its own subcommands;
a subcommand imports what it runs only when it runs (``carseg serve --queue redis`` loads no torch)."""

from __future__ import annotations

import argparse
import logging

from service import cli as service_cli
from training import cli as training_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carseg", description="calibrated stochastic segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    training_cli.register(sub)
    service_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)
