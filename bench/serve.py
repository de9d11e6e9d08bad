"""Service throughput and latency against the raw sampler's ceiling, measured in one run.

    python bench/serve.py [--model-dir models] [--model default] [--seconds 6] [--json bench/results/serve.json]

1. The raw sampler, in this process: single-image latency and batched throughput (images/s at the
   batch a full sample budget holds) for each k. This is the ceiling.
2. The service in subprocesses, driven over HTTP by closed-loop clients at concurrency 1, 4, 16,
   64 for each k: throughput and p50/p95/p99 latency. Paths: ``local`` (`carseg serve`, in-process
   queue), ``redis1`` / ``redis2`` (`carseg serve --queue redis` + 1 or 2 `carseg worker`
   processes, against a redis-server the bench starts on a free port; the machine's threads are
   split between the workers).
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
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# before torch loads: its OpenMP pool reads these once. Idle threads must sleep, or the ceiling's
# threads spin on the cores its own other threads (the parallel ceiling) and the services need
from carseg.threads import configure  # noqa: E402

configure()

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.procs import free_port, log_tail, logged, redis_server, service_arguments, stop  # noqa: E402
from training.checkpoint import load_model  # noqa: E402
from training.data import open_dataset  # noqa: E402
from training.sampling import LABELS, sample  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


SamplerRun = Callable[[int, int, int], None]


def sampler_run(model_dir: Path, image: np.ndarray, device: str) -> SamplerRun:
    """``run(batch, k, seed)``: the sampler on ``batch`` copies of ``image``, k samples each, computing
    what a /samples request needs (the masks, on the host)."""
    networks = load_model(model_dir, device).networks
    x = networks.prepare([image])

    def run(batch: int, k: int, seed: int) -> None:
        for out in sample(networks, x.expand(batch, -1, -1, -1).contiguous(), [k] * batch, range(seed, seed + batch), outputs=[LABELS]):
            out[LABELS].cpu()

    return run


def rate(run: SamplerRun, batch: int, k: int, seconds: float) -> float:
    """Images/s of calls of ``batch`` images one after another for ``seconds`` (at least 2 calls)."""
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or images < 2 * batch:
        run(batch, k, images)
        images += batch
    return images / (time.perf_counter() - t0)


def raw_sampler(run: SamplerRun, ks: list[int], budget: int, seconds: float, device: str, executors: int = 1) -> dict:
    results = {}
    for k in ks:
        batch = max(1, budget // k)
        run(batch, k, 0)  # warm-up
        single = []
        t_end = time.perf_counter() + seconds / 2
        while time.perf_counter() < t_end or len(single) < 5:
            t0 = time.perf_counter()
            run(1, k, len(single))
            single.append(time.perf_counter() - t0)
        batched = rate(run, batch, k, seconds / 2)
        single_rate = 1 / statistics.median(single)
        parallel = parallel_sampler(run, batch, k, seconds / 2, executors) if device == "cpu" and executors > 1 else 0.0
        # the ceiling is the best of one-at-a-time, batched, and (on a CPU) single-thread executors
        # side by side, as the in-process pool runs: on a CPU, big batches are slower
        results[k] = {
            "single_p50_ms": 1000 * statistics.median(single),
            "single_images_per_s": single_rate,
            "batch": batch,
            "batched_images_per_s": batched,
            "executors": executors,
            "parallel_images_per_s": parallel,
            "ceiling_images_per_s": max(single_rate, batched, parallel),
        }
    return results


def ceiling_at(run: SamplerRun, k: int, concurrency: int, budget: int, seconds: float, executors: int) -> dict:
    """The raw sampler's best images/s with at most ``concurrency`` images in flight, as a closed-loop
    client of that concurrency keeps them: what a server without overhead could reach at that load.
    The best of one call at a time on all threads or on one (each call holding up to
    ``concurrency`` images, within the budget), and single-thread executors side by side (as many
    as there are images in flight, up to ``executors``), each with its share of them."""
    per_call = max(1, min(concurrency, budget // k))
    threads = torch.get_num_threads()
    options = {}
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        try:
            run(per_call, k, 0)  # warm-up
            options[f"one call of {per_call} on {n} thread(s)"] = rate(run, per_call, k, seconds)
        finally:
            torch.set_num_threads(threads)
    side = min(concurrency, executors)
    if side > 1:
        share = max(1, min(-(-concurrency // side), budget // k))
        options[f"{side} executors with calls of {share}"] = parallel_sampler(run, share, k, seconds, side)
    best = max(options, key=options.__getitem__)
    return {"images_per_s": options[best], "by": best, "options": options}


def parallel_sampler(run: SamplerRun, batch: int, k: int, seconds: float, executors: int) -> float:
    """Images/s of ``executors`` threads side by side, each calling ``run`` on batches of ``batch``
    with one torch thread (torch releases the GIL inside its ops): the in-process pool's ceiling."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    counts = [0] * executors
    stop_at = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop_at:
            run(batch, k, 1000 * i + counts[i])
            counts[i] += batch

    try:
        t0 = time.perf_counter()
        workers = [threading.Thread(target=loop, args=(i,)) for i in range(executors)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(counts) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


async def closed_loop(url: str, data: bytes, ks: Sequence[int], concurrency: int, seconds: float, headers: dict[str, str] | None = None) -> dict:
    """``concurrency`` clients, each posting ``data`` and waiting for the answer before the next,
    for ``seconds``; client w's i-th request asks for k = ks[(w + i) % len(ks)]. The one closed-loop
    driver of the benches (serve, threads, soak's saturation probe)."""
    latencies: list[float] = []
    per_k = {k: 0 for k in ks}
    errors = 0
    stop_at = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=120, headers=headers, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def worker(wid: int) -> None:
            nonlocal errors
            i = 0
            while time.perf_counter() < stop_at:
                k = ks[(wid + i) % len(ks)]
                t0 = time.perf_counter()
                r = await client.post(url, files={"image": ("img.png", data)}, params={"k": k, "seed": wid * 100003 + i})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    per_k[k] += 1
                else:
                    errors += 1
                i += 1

        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed, client_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "requests": len(latencies),
        "per_k": per_k,
        "errors": errors,
        "seconds": elapsed,
        "images_per_s": len(latencies) / elapsed,  # /samples answers one image per request
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "p99_ms": 1000 * percentile(latencies, 99),
        # the cores this client took from the server's machine (it runs on the same cores here)
        "client_cores": client_cpu / elapsed,
    }


def start_path(path: str, model_dir: Path, device: str, budget: int) -> tuple[str, list[subprocess.Popen]]:
    """Start one service path; return its base URL and the processes to stop afterwards."""
    port = free_port()
    env = {"CARSEG_BATCH_MAX_SAMPLES": str(budget), "CARSEG_MODEL_DIR": str(model_dir), "CARSEG_DEVICE": device}
    procs: list[subprocess.Popen] = []
    if path == "local":
        procs.append(logged(["serve", "--port", str(port)], env))
    else:
        workers = int(path.removeprefix("redis"))
        redis_port = free_port()
        procs.append(redis_server(redis_port))
        env["CARSEG_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        threads = max(1, (os.cpu_count() or 1) // workers) if device == "cpu" else 1
        procs.append(logged(["serve", "--port", str(port), "--queue", "redis"], env))
        procs += [logged(["worker", "--threads", str(threads)], env) for _ in range(workers)]
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, procs)
    return url, procs


def wait_ready(url: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a service process exited: {log_tail(proc)}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # polling interval
    stop(procs)
    raise TimeoutError("service not ready in 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    service_arguments(parser, "serve.json")
    parser.add_argument("--ks", default="1,16")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=6.0, help="per measured cell")
    parser.add_argument("--budget", type=int, default=16, help="batch budget in samples (service and ceiling alike)")
    parser.add_argument("--paths", default="local", help="comma-separated: local, redis1, redis2")
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
    ceiling = raw_sampler(sampler_run(model_path, case.image, args.device), ks, args.budget, args.seconds, args.device, executors=torch.get_num_threads())

    paths = args.paths.split(",")
    service: dict[str, dict[int, dict[int, dict]]] = {}
    for path in paths:
        url, procs = start_path(path, Path(args.model_dir), args.device, args.budget)
        endpoint = f"{url}/v1/models/{args.model}/samples"
        try:
            asyncio.run(closed_loop(endpoint, data, [1], 2, 1.0))  # warm-up
            service[path] = {k: {c: asyncio.run(closed_loop(endpoint, data, [k], c, args.seconds)) for c in levels} for k in ks}
        finally:
            stop(procs)

    print(f"\ncarseg serve bench: {args.model} on {args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus), 128x128 LIDC crop")
    print(f"{'path':>7} {'k':>3} {'conc':>5} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    summary: dict[str, dict[int, dict]] = {}
    for k in ks:
        c = ceiling[k]
        raw = f"{'sampler':>7} {k:>3} {'-':>5} {c['ceiling_images_per_s']:>8.2f} {c['single_p50_ms']:>8.1f}"
        print(f"{raw} {'':>8} {'':>8} {'':>6}   (ceiling: max of one-at-a-time {c['single_images_per_s']:.2f}, "
              f"batch-{c['batch']} {c['batched_images_per_s']:.2f} and {c['executors']} executors {c['parallel_images_per_s']:.2f} img/s; "
              "single-image p50)")
        for path in paths:
            for conc, r in service[path][k].items():
                print(f"{path:>7} {k:>3} {conc:>5} {r['images_per_s']:>8.2f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>6}")
            best = max(r["images_per_s"] for r in service[path][k].values())
            row = {
                "saturation_throughput_ratio": best / c["ceiling_images_per_s"],
                "c1_p50_overhead_ms": service[path][k][levels[0]]["p50_ms"] - c["single_p50_ms"],
                "c1_p50_ms": service[path][k][levels[0]]["p50_ms"],
            }
            summary.setdefault(path, {})[k] = row
            print(f"        {path} k={k}: service/ceiling throughput {row['saturation_throughput_ratio']:.3f}; "
                  f"p50 at concurrency {levels[0]} minus sampler single-image p50: {row['c1_p50_overhead_ms']:+.1f} ms")
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
