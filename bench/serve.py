"""Service throughput and latency against the raw sampler's ceiling, measured in one run.

    python bench/serve.py [--model-dir models] [--model default] [--seconds 6] [--json bench/results/serve.json]

1. The raw sampler, in this process: single-image latency and batched throughput (images/s at the
   batch a full sample budget holds) for each k. This is the ceiling.
2. The service (`carseg serve`, in-process queue) in a subprocess, driven over HTTP by closed-loop
   clients at concurrency 1, 4, 16, 64 for each k: throughput and p50/p95/p99 latency.
Ratios are what to read (service / ceiling); absolute numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.embedded import free_port  # noqa: E402
from training.checkpoint import load_model  # noqa: E402
from training.data import open_dataset  # noqa: E402
from training.sampling import sample  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def raw_sampler(model_dir: Path, image: np.ndarray, ks: list[int], budget: int, seconds: float, device: str) -> dict:
    model = load_model(model_dir, device)
    x = torch.from_numpy(model.normalisation.apply(image))[None].to(device)
    results = {}
    for k in ks:
        batch = max(1, budget // k)
        xb = x.expand(batch, -1, -1, -1).contiguous()
        sample(model.calibration, model.refinement, xb, k, list(range(batch)))  # warm-up
        single = []
        t_end = time.perf_counter() + seconds / 2
        while time.perf_counter() < t_end or len(single) < 5:
            t0 = time.perf_counter()
            out = sample(model.calibration, model.refinement, x, k, [len(single)])
            out.labels.cpu()
            single.append(time.perf_counter() - t0)
        images, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2 or images < 2 * batch:
            sample(model.calibration, model.refinement, xb, k, list(range(batch))).labels.cpu()
            images += batch
        results[k] = {
            "single_p50_ms": 1000 * statistics.median(single),
            "batch": batch,
            "batched_images_per_s": images / (time.perf_counter() - t0),
        }
    return results


async def closed_loop(url: str, data: bytes, k: int, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def worker(wid: int) -> None:
            nonlocal errors
            i = 0
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                r = await client.post(url, files={"image": ("img.png", data)}, params={"k": k, "seed": wid * 100003 + i})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "requests": len(latencies),
        "errors": errors,
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "p99_ms": 1000 * percentile(latencies, 99),
    }


def start_server(model_dir: Path, port: int, device: str, env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(model_dir), "--port", str(port), "--device", device]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # polling interval
    proc.kill()
    raise TimeoutError("server not ready in 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(REPO / "models"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--ks", default="1,16")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=6.0, help="per measured cell")
    parser.add_argument("--budget", type=int, default=64, help="batch budget in samples (service and ceiling alike)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "serve.json"))
    args = parser.parse_args()

    ks = [int(k) for k in args.ks.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    case = open_dataset("lidc-sample", "test")[0]
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(case.image[:, :, 0]).save(buf, format="PNG")
    data = buf.getvalue()

    model_path = Path(args.model_dir) / args.model
    ceiling = raw_sampler(model_path, case.image, ks, args.budget, args.seconds, args.device)

    port = free_port()
    proc = start_server(Path(args.model_dir), port, args.device, {"CARSEG_BATCH_MAX_SAMPLES": str(args.budget)})
    url = f"http://127.0.0.1:{port}/v1/models/{args.model}/samples"
    service: dict[int, dict[int, dict]] = {}
    try:
        asyncio.run(closed_loop(url, data, 1, 2, 1.0))  # warm-up
        for k in ks:
            service[k] = {c: asyncio.run(closed_loop(url, data, k, c, args.seconds)) for c in levels}
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"\ncarseg serve bench: {args.model} on {args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus), 128x128 LIDC crop")
    print(f"{'k':>3} {'conc':>5} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    summary = {}
    for k in ks:
        c = ceiling[k]
        raw = f"{k:>3} {'raw':>5} {c['batched_images_per_s']:>8.2f} {c['single_p50_ms']:>8.1f}"
        print(f"{raw} {'':>8} {'':>8} {'':>6}   (sampler: batch {c['batch']} throughput, single-image p50)")
        for conc, r in service[k].items():
            print(f"{k:>3} {conc:>5} {r['images_per_s']:>8.2f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>6}")
        best = max(r["images_per_s"] for r in service[k].values())
        summary[k] = {
            "saturation_throughput_ratio": best / c["batched_images_per_s"],
            "c1_p50_overhead_ms": service[k][levels[0]]["p50_ms"] - c["single_p50_ms"],
        }
        print(f"    k={k}: service/ceiling throughput {summary[k]['saturation_throughput_ratio']:.3f}; "
              f"p50 at concurrency {levels[0]} minus sampler single-image p50: {summary[k]['c1_p50_overhead_ms']:+.1f} ms")
    out = {
        "device": args.device, "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "cpus": os.cpu_count(), "torch": torch.__version__, "model": args.model, "seconds_per_cell": args.seconds,
        "ceiling": ceiling, "service": service, "summary": summary,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
