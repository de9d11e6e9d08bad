"""What an API replica in Redis mode costs and what one job puts on the stream, measured in one run.

    python bench/footprint.py [--against OTHER_CHECKOUT] [--runs 3] [--json bench/results/footprint.json]

For each checkout (this one, and ``--against`` another, e.g. a worktree of an older commit) the bench
starts a redis-server on a free port, one ``carseg worker`` and ``carseg serve --queue redis``, and
measures the API process:
- start-up: seconds from spawning it until ``/health/live`` answers 200 (median of ``--runs``);
- RSS after start-up and after one answered k=16 request on a 128x128 LIDC crop (VmRSS, VmHWM);
- whether libtorch is mapped into it (``/proc/PID/maps``): a Redis-mode API should never load torch;
- bytes one job occupies on the stream: the sum of its field names and values as ``XRANGE`` returns
  them, for the same crop, read while no worker consumes.
Ratios (this / other) are what to read; absolute numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import redis
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procs import REPO, carseg, free_port, proc_status, redis_server, stop


def crop_png() -> bytes:
    path = sorted((REPO / "data" / "lidc-sample" / "testing").glob("*/image_*.jpg"))[0]
    buf = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(path).convert("L"))).save(buf, format="PNG")
    return buf.getvalue()


def poll(url: str, status: int, timeout_s: float, proc: subprocess.Popen) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == status:
                return time.perf_counter()
        except httpx.HTTPError:
            pass
        time.sleep(0.01)  # polling interval
    raise TimeoutError(url)


def torch_mapped(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def measure(repo: Path, runs: int, data: bytes) -> dict:
    redis_port = free_port()
    server = redis_server(redis_port)
    env = {"CARSEG_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "CARSEG_MODEL_DIR": str(repo / "models"), "CARSEG_DEVICE": "cpu"}
    client = redis.Redis(port=redis_port)
    rows = []
    try:
        # bytes per job: an API and a heartbeat that takes nothing, so the job stays on the stream
        client.zadd("carseg:heartbeats:default", {"bench-idle": time.time() + 3600})
        port = free_port()
        api = carseg(["serve", "--queue", "redis", "--port", str(port)], repo=repo, env={**env, "CARSEG_REQUEST_TIMEOUT_S": "1"})
        try:
            poll(f"http://127.0.0.1:{port}/health/live", 200, 120, api)
            httpx.post(f"http://127.0.0.1:{port}/v1/models/default/samples", files={"image": ("x.png", data)},
                       params={"k": 16, "seed": 1}, timeout=30)
            entries = client.xrange("carseg:jobs:default")
            job_bytes = sum(len(k) + len(v) for k, v in entries[-1][1].items())
            image_bytes = len(entries[-1][1][b"image"])
        finally:
            stop([api])
        client.flushall()
        worker = carseg(["worker", "--threads", "1"], repo=repo, env=env)
        try:
            for _ in range(runs):
                port = free_port()
                t0 = time.perf_counter()
                api = carseg(["serve", "--queue", "redis", "--port", str(port)], repo=repo, env=env)
                try:
                    live = poll(f"http://127.0.0.1:{port}/health/live", 200, 120, api) - t0
                    started = proc_status(api.pid)
                    poll(f"http://127.0.0.1:{port}/health/ready", 200, 120, api)
                    r = httpx.post(f"http://127.0.0.1:{port}/v1/models/default/samples", files={"image": ("x.png", data)},
                                   params={"k": 16, "seed": 1}, timeout=60)
                    assert r.status_code == 200, r.text
                    after = proc_status(api.pid)
                    rows.append({"startup_s": live, "rss_started": started["VmRSS"], "rss_after_request": after["VmRSS"],
                                 "peak_rss": after["VmHWM"], "torch_loaded": torch_mapped(api.pid)})
                finally:
                    stop([api])
        finally:
            stop([worker])
    finally:
        stop([server])
    return {
        "repo": str(repo),
        "runs": rows,
        "startup_s": statistics.median(r["startup_s"] for r in rows),
        "rss_started_mib": statistics.median(r["rss_started"] for r in rows) / 2**20,
        "rss_after_request_mib": statistics.median(r["rss_after_request"] for r in rows) / 2**20,
        "peak_rss_mib": statistics.median(r["peak_rss"] for r in rows) / 2**20,
        "torch_loaded": any(r["torch_loaded"] for r in rows),
        "job_bytes": job_bytes,
        "job_image_bytes": image_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="another checkout to measure the same way (e.g. a worktree of the previous commit)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "footprint.json"))
    args = parser.parse_args()
    data = crop_png()
    repos = {"this": REPO, **({"other": Path(args.against).resolve()} if args.against else {})}
    results = {name: measure(repo, args.runs, data) for name, repo in reversed(repos.items())}
    print(f"\nAPI replica in Redis mode, 128x128 grayscale crop ({len(data)} PNG bytes), median of {args.runs} start-ups")
    print(f"{'checkout':>8} {'start-up s':>10} {'RSS MiB':>8} {'after req':>9} {'peak':>7} {'torch':>6} {'job bytes':>10} {'image bytes':>11}")
    for name, r in results.items():
        print(f"{name:>8} {r['startup_s']:>10.2f} {r['rss_started_mib']:>8.1f} {r['rss_after_request_mib']:>9.1f} "
              f"{r['peak_rss_mib']:>7.1f} {r['torch_loaded']!s:>6} {r['job_bytes']:>10} {r['job_image_bytes']:>11}")
    if "other" in results:
        this, other = results["this"], results["other"]
        ratios = {key: this[key] / other[key] for key in ("startup_s", "rss_after_request_mib", "peak_rss_mib", "job_bytes")}
        print("this / other: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        results["ratios"] = ratios
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
