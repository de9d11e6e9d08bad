"""Workers that share cores: throughput with OpenMP's defaults against the threads ``carseg``
derives (carseg/threads.py), measured in one run.

    python bench/threads.py [--seconds 60] [--workers 2] [--clients 3] [--json bench/results/threads-cpu.json]

Each setting starts redis + ``carseg serve --queue redis`` + N ``carseg worker`` processes and
drives ``/samples`` with closed-loop clients, k cycling 1/4/16. Settings: ``default``: the workers
run with the configuration step bypassed (OpenMP's defaults: a pool the size of the machine, idle
threads spinning), as before it existed; ``auto``: the plain entry point (threads from the cores,
``OMP_WAIT_POLICY=PASSIVE``); ``threads1``: ``--threads 1``. The ratio is what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.procs import carseg, free_port, redis_server, stop  # noqa: E402
from bench.serve import closed_loop, wait_ready  # noqa: E402

KS = (1, 4, 16)
# the entry point with the configuration step replaced by a no-op: the code as it was before
UNCONFIGURED = "import sys, carseg.threads as t; t.configure = lambda threads=None: {}; from carseg.cli import main; sys.argv[0] = 'carseg'; main()"
OMP_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def worker(setting: str, env: dict[str, str], log) -> subprocess.Popen:
    if setting == "default":
        return subprocess.Popen([sys.executable, "-c", UNCONFIGURED, "worker"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                                stdout=subprocess.DEVNULL, stderr=log)
    return carseg(["worker", *(["--threads", "1"] if setting == "threads1" else [])], env, stderr=log)


def run(setting: str, args: argparse.Namespace, data: bytes) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    os.environ.clear()
    os.environ.update(base)  # the bench's own shell settings must not leak into the workers
    port, redis_port = free_port(), free_port()
    env = {"CARSEG_MODEL_DIR": args.model_dir, "CARSEG_DEVICE": "cpu", "CARSEG_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    procs = [redis_server(redis_port)]
    # logs to a file, not a pipe nobody reads while the clients run (a full pipe would stall a process)
    log = tempfile.TemporaryFile()
    try:
        procs.append(carseg(["serve", "--port", str(port), "--queue", "redis"], env, stderr=log))
        procs += [worker(setting, env, log) for _ in range(args.workers)]
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, procs)
        except RuntimeError:
            log.seek(0)
            raise RuntimeError(f"a service process exited: {log.read().decode()[-3000:]}") from None
        endpoint = f"{url}/v1/models/{args.model}/samples"
        asyncio.run(closed_loop(endpoint, data, KS, args.clients, 5.0))  # warm-up
        result = asyncio.run(closed_loop(endpoint, data, KS, args.clients, args.seconds))
    finally:
        stop(procs)
        log.close()
    print(f"{setting:>9}: {result['images_per_s']:.2f} req/s ({result['requests']} requests, {result['errors']} errors)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(REPO / "models"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--settings", default="default,auto,threads1")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "threads-cpu.json"))
    args = parser.parse_args()

    from PIL import Image

    from carseg.threads import available_cores
    from training.data import open_dataset

    buf = io.BytesIO()
    Image.fromarray(open_dataset("lidc-sample", "test")[0].image[:, :, 0]).save(buf, format="PNG")
    results = {s: run(s, args, buf.getvalue()) for s in args.settings.split(",")}
    out = {
        "cpus": os.cpu_count(), "available_cores": available_cores(), "workers": args.workers, "clients": args.clients, "ks": KS,
        "seconds": args.seconds, "model": args.model, "results": results,
        "ratios_to_default": {s: r["images_per_s"] / results["default"]["images_per_s"] for s, r in results.items()} if "default" in results else None,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
