"""What one request costs the serving process in memory and time, measured in one run against
another checkout (e.g. a worktree of an older commit):

    python bench/limits.py [--against OTHER_CHECKOUT] [--json bench/results/limits.json]

For each checkout and case a fresh ``carseg serve`` (in-process queue, the bundled default model,
one OpenMP thread) is started; after it is ready the bench reads its VmRSS, sends one request, and
reads VmHWM, the process's peak: the growth is what that request cost. Cases:
- ``samples SIDE k=K``: a random SIDE x SIDE grey PNG at k samples (the cost limit raised so that
  1024 x 1024 at k=16 is admitted);
- ``json 30 MB refused``: a JSON body of 30 MB of base64 whose bytes are not an image, so that
  what is measured is holding and decoding the upload, not the networks.
Ratios are what to read; absolute numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procs import REPO, carseg, free_port, proc_status, stop


def png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def cases() -> list[tuple[str, dict]]:
    out = [(f"samples {side}x{side} k=16", {"files": {"image": ("x.png", png(side))}, "params": {"k": 16, "seed": 1}}) for side in (256, 512, 1024)]
    junk = b"\x89PNG\r\n\x1a\n" + os.urandom(30 * 2**20 * 3 // 4)
    out.append(("json 30 MB refused", {"json": {"image": base64.b64encode(junk).decode()}}))
    return out


def measure(repo: Path, name: str, request: dict) -> dict:
    port = free_port()
    env = {"CARSEG_MODEL_DIR": str(REPO / "models"), "CARSEG_PORT": str(port), "CARSEG_MAX_PIXEL_SAMPLES": str(2**24),
           "CARSEG_RATE_LIMIT_PER_S": "0", "OMP_NUM_THREADS": "1", "CARSEG_MAX_UPLOAD_BYTES": str(32 * 2**20)}
    proc = carseg(["serve", "--port", str(port)], env, repo)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{repo} did not become ready")
            time.sleep(0.1)  # polling for readiness
        before = proc_status(proc.pid)
        started = time.perf_counter()
        r = httpx.post(f"{url}/v1/models/default/samples", timeout=600, **request)
        seconds = time.perf_counter() - started
        after = proc_status(proc.pid)
    finally:
        stop([proc])
    return {"case": name, "status": r.status_code, "seconds": round(seconds, 2), "rss_before_mb": round(before["VmRSS"] / 2**20),
            "peak_growth_mb": round((after["VmHWM"] - before["VmRSS"]) / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, help="another checkout to measure the same way")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "limits.json")
    args = parser.parse_args()
    checkouts = {"this": REPO, **({"other": args.against.resolve()} if args.against else {})}
    rows = []
    for label, repo in checkouts.items():
        for name, request in cases():
            row = {"checkout": label, **measure(repo, name, request)}
            rows.append(row)
            print(f"{label:6s} {row['case']:24s} {row['status']}  {row['seconds']:7.2f} s  peak +{row['peak_growth_mb']:6d} MB")
    print(f"\n{'case':24s} " + "  ".join(f"{label:>22s}" for label in checkouts))
    for name, _ in cases():
        cells = [next(r for r in rows if r["checkout"] == label and r["case"] == name) for label in checkouts]
        print(f"{name:24s} " + "  ".join(f"{c['status']} {c['seconds']:6.1f} s +{c['peak_growth_mb']:5d} MB" for c in cells))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"checkouts": {k: str(v) for k, v in checkouts.items()}, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
