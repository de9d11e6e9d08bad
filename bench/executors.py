"""CPU contention: the in-process queue with one executor, the in-process pool of executors, and two
Redis workers, under the same mixed load, measured in one run.

    python bench/executors.py [--seconds 60] [--clients 2,3] [--json bench/results/executors-cpu.json]

Each path serves the bundled model on the CPU and is driven over HTTP by closed-loop clients (k
cycling 1/4/16, a 128x128 LIDC crop, bench.serve.closed_loop), after a 5 s warm-up:

- ``local1``: ``carseg serve`` with ``CARSEG_EXECUTORS=1``, one executor computing with every
  thread (OpenMP's idle threads sleep, ``OMP_WAIT_POLICY=PASSIVE``): the in-process queue before
  it had a pool;
- ``pool``: ``carseg serve`` as it starts by default, one single-thread executor per thread;
- ``redis2``: ``carseg serve --queue redis`` and two ``carseg worker --threads 1`` processes;
- ``before`` (with ``--against OTHER_CHECKOUT``): that checkout's ``carseg serve`` as it starts.

The ratios are what to read: pool / local1 and pool / redis2, per client count.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.procs import free_port, logged, redis_server, service_arguments, stop  # noqa: E402
from bench.serve import closed_loop, wait_ready  # noqa: E402

KS = (1, 4, 16)
PATHS = ("local1", "pool", "redis2")


def start(path: str, model_dir: str, against: Path | None) -> tuple[str, list]:
    port = free_port()
    env = {"CARSEG_MODEL_DIR": model_dir, "CARSEG_DEVICE": "cpu"}
    procs = []
    if path == "before":
        assert against is not None, "the path 'before' needs --against"
        procs.append(logged(["serve", "--port", str(port)], env, repo=against))
    elif path == "redis2":
        redis_port = free_port()
        procs.append(redis_server(redis_port))
        env["CARSEG_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        procs.append(logged(["serve", "--port", str(port), "--queue", "redis"], env))
        procs += [logged(["worker", "--threads", "1"], env) for _ in range(2)]
    else:
        procs.append(logged(["serve", "--port", str(port)], {**env, **({"CARSEG_EXECUTORS": "1"} if path == "local1" else {})}))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, procs)
    return url, procs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    service_arguments(parser, "executors-cpu.json")
    parser.add_argument("--seconds", type=float, default=60.0, help="per measured cell")
    parser.add_argument("--clients", default="2,3")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--against", type=Path, help="another checkout: adds the path 'before', its carseg serve")
    args = parser.parse_args()
    if args.against and "before" not in args.paths.split(","):
        args.paths = "before," + args.paths

    from PIL import Image

    from carseg.threads import available_cores
    from training.data import open_dataset

    buf = io.BytesIO()
    Image.fromarray(open_dataset("lidc-sample", "test")[0].image[:, :, 0]).save(buf, format="PNG")
    data = buf.getvalue()
    clients = [int(c) for c in args.clients.split(",")]
    paths = args.paths.split(",")
    results: dict[str, dict[str, dict]] = {p: {} for p in paths}
    for path in paths:
        url, procs = start(path, args.model_dir, args.against.resolve() if args.against else None)
        try:
            endpoint = f"{url}/v1/models/{args.model}/samples"
            asyncio.run(closed_loop(endpoint, data, KS, max(clients), 5.0))  # warm-up
            for n in clients:
                results[path][str(n)] = asyncio.run(closed_loop(endpoint, data, KS, n, args.seconds))
        finally:
            stop(procs)
    print(f"\n{'path':<8} {'clients':>7} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for path in paths:
        for n in clients:
            r = results[path][str(n)]
            print(f"{path:<8} {n:>7} {r['images_per_s']:>7.2f} {r['p50_ms']:>8.0f} {r['p95_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['errors']:>6}")
    ratios = {}
    if "pool" in results:
        for other in (p for p in paths if p != "pool"):
            ratios[f"pool/{other}"] = {str(n): results["pool"][str(n)]["images_per_s"] / results[other][str(n)]["images_per_s"] for n in clients}
            print(f"pool / {other}: " + ", ".join(f"{n} clients {ratios[f'pool/{other}'][str(n)]:.2f}" for n in clients))
    out = {"cpus": os.cpu_count(), "available_cores": available_cores(), "ks": KS, "seconds": args.seconds, "model": args.model,
           "results": results, "ratios": ratios}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
