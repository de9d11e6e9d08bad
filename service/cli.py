"""``carseg serve`` and ``carseg worker``: the serving side of the command. Registering them
imports nothing heavy; ``serve --queue redis`` never imports torch at all."""

from __future__ import annotations

import argparse

from service.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve every model under the model dir over HTTP")
    p.add_argument("--model-dir", help="default: the repository's models/ ($CARSEG_MODEL_DIR)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--queue", choices=("local", "redis"))
    p.add_argument("--redis-url")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (the in-process queue's runner)")
    p.add_argument("--threads", type=int, help="CPU threads for torch/OpenMP (default: the cores this process may use; see README, CPU threads)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="consume the Redis job streams and run the sampler (one process per GPU)")
    p.add_argument("--redis-url")
    p.add_argument("--model-dir")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--models", nargs="*", help="models to serve (default: all in the model dir)")
    p.add_argument("--metrics-port", type=int, dest="worker_metrics_port", help="serve Prometheus metrics on this port")
    p.add_argument("--threads", type=int, help="CPU threads for torch/OpenMP (default: the cores this process may use; see README, CPU threads)")
    p.set_defaults(func=_worker)


def _settings(args: argparse.Namespace) -> Settings:
    from pydantic import ValidationError

    from service import logs

    try:
        settings = Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None})
    except ValidationError as exc:
        raise SystemExit(f"invalid settings: {exc}") from exc
    logs.configure(settings.log_format)
    return settings


def _serve(args: argparse.Namespace) -> None:
    from service.server import serve

    serve(_settings(args))


def _worker(args: argparse.Namespace) -> None:
    from service.worker import serve_worker
    from training.sampling import use_device

    settings = _settings(args)
    try:
        device = use_device(settings.device, args.threads)
    except ValueError as exc:
        raise SystemExit(f"--device: {exc}") from exc
    serve_worker(settings, device, args.models)
