"""The ``carseg`` command: training commands come from ``training.cli``, serving ones from here."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from training import cli as training_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carseg", description="calibrated stochastic segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    training_cli.register(sub)
    p = sub.add_parser("serve", help="serve every model under the model dir over HTTP")
    p.add_argument("--model-dir", help="default: the repository's models/ ($CARSEG_MODEL_DIR)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--queue", choices=("local", "redis"))
    p.add_argument("--redis-url")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="consume the Redis job streams and run the sampler (one process per GPU)")
    p.add_argument("--redis-url")
    p.add_argument("--model-dir")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--models", nargs="*", help="models to serve (default: all in the model dir)")
    p.add_argument("--metrics-port", type=int, dest="worker_metrics_port", help="serve Prometheus metrics on this port")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=_worker)
    return parser


def _settings(args: argparse.Namespace):
    from service.config import Settings

    return Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None})


def _worker(args: argparse.Namespace) -> None:
    from service.worker import serve_worker

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = _settings(args)
    serve_worker(settings, training_cli.resolve_device(settings.device), args.models)


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.api.app import create_app

    settings = _settings(args)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    # near-zero weights and activations as CPU denormals slow convolutions several-fold (measured
    # 5x on a training state); flushing them to zero changes no result that matters here
    torch.set_flush_denormal(True)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
