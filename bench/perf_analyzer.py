"""The service under Triton's own load generator, beside the benches' closed-loop driver, in one run.

    python bench/perf_analyzer.py [--model default] [--ks 1,16] [--concurrency 1,4] [--seconds 6] [--json bench/results/perf_analyzer.json]

Starts `carseg serve` (in-process queue) on the bundled model and, for each k and concurrency:
perf_analyzer on ``/v2`` (HTTP, binary tensors in and out, a 128x128 LIDC crop as ``image`` and k
as an input tensor; it asks for every output) and ``bench.serve.closed_loop`` on ``/v1/.../samples``
(the crop's JPEG; ``Accept: application/x-npz``, so that it too gets masks, p_F and entropy).
Same server, same work per request: where the two disagree, look at the protocol or the client.

perf_analyzer is tritonclient 2.51's binary, installed by the Makefile under ``.venv/tools``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.procs import carseg, free_port, service_arguments, stop  # noqa: E402
from bench.serve import closed_loop, wait_ready  # noqa: E402

TOOLS = Path(sys.prefix) / "tools"
MISSING_LIBRARY = re.compile(r"error while loading shared libraries: (\S+?):")


class PerfAnalyzerMissing(RuntimeError):
    """perf_analyzer or a library it loads is not installed; the message says how to install it."""


@dataclass(frozen=True)
class PerfAnalyzer:
    path: Path
    env: dict[str, str] = field(repr=False)  # the whole environment: not for a failure message

    def command(self, url: str, model: str, input_data: Path, concurrency: int, *extra: str) -> list[str]:
        """Binary tensors both ways over HTTP, as a Triton client would send them."""
        host = url.removeprefix("http://")
        return [
            str(self.path), "-m", model, "-u", host, "-i", "http", "--input-data", str(input_data),
            "--input-tensor-format", "binary", "--output-tensor-format", "binary", "--concurrency-range", str(concurrency), *extra,
        ]


def locate(tools: Path = TOOLS) -> PerfAnalyzer:
    """perf_analyzer of this virtualenv's tools folder, with the CUDA runtime it links even on a
    CPU; PerfAnalyzerMissing when it or a library will not load."""
    path = tools / "bin" / "perf_analyzer"
    if not path.is_file():
        raise PerfAnalyzerMissing(f"{path} is missing: run `make install` (it installs tritonclient 2.51's perf_analyzer under {tools})")
    libs = tools / "nvidia" / "cuda_runtime" / "lib"
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")]))}
    probe = subprocess.run([str(path), "--version"], env=env, capture_output=True, text=True, timeout=30)
    missing = MISSING_LIBRARY.search(probe.stderr)
    if missing:
        library = missing.group(1)
        fix = "apt-get install libb64-0d" if library.startswith("libb64") else f"make install (it installs nvidia-cuda-runtime-cu12 under {tools})"
        raise PerfAnalyzerMissing(f"perf_analyzer cannot load {library}: {fix}")
    if probe.returncode != 0:
        raise PerfAnalyzerMissing(f"perf_analyzer --version failed ({probe.returncode}): {probe.stderr.strip()[-500:]}")
    return PerfAnalyzer(path, env)


def input_data(path: Path, image: np.ndarray, k: int | None = None) -> Path:
    """perf_analyzer's --input-data JSON: one request's tensors (it sends them binary all the same)."""
    request = {"image": {"content": image.reshape(-1).tolist(), "shape": list(image.shape)}}
    if k is not None:
        request["k"] = [k]
    path.write_text(json.dumps({"data": [request]}))
    return path


def read_csv(path: Path) -> dict[str, float]:
    """The one row of perf_analyzer's -f report: throughput and client latency percentiles (ms)."""
    with path.open() as fh:
        row = next(csv.DictReader(fh))
    return {
        "requests_per_s": float(row["Inferences/Second"]),
        **{f"p{q}_ms": float(row[f"p{q} latency"]) / 1000 for q in (50, 95, 99)},
    }


def windows(seconds: float) -> list[str]:
    """Three measurement windows that fill ``seconds``; the stability bound is loose on purpose: on
    a shared machine the windows vary more than perf_analyzer's default 10 %, and what is wanted is
    the same stretch of time the closed loop measures, not a search for a quiet one."""
    return ["--measurement-interval", str(max(500, int(seconds * 1000 / 3))), "--stability-percentage", "1000", "--max-trials", "6"]


def run_perf_analyzer(tool: PerfAnalyzer, url: str, model: str, data: Path, concurrency: int, seconds: float, report: Path) -> dict:
    command = tool.command(url, model, data, concurrency, *windows(seconds), "-f", str(report))
    run = subprocess.run(command, env=tool.env, capture_output=True, text=True, timeout=seconds * 6 + 60)
    if run.returncode != 0:  # perf_analyzer stops at a failed request: its message is the result
        return {"errors": 1, "failure": (run.stdout + run.stderr).strip()[-1000:]}
    return {**read_csv(report), "errors": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    service_arguments(parser, "perf_analyzer.json")
    parser.add_argument("--ks", default="1,16")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--seconds", type=float, default=6.0, help="per measured cell and tool")
    args = parser.parse_args()

    from PIL import Image

    tool = locate()
    ks = [int(k) for k in args.ks.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    crop_path = sorted((REPO / "data" / "lidc-sample" / "testing").glob("*/image_*.jpg"))[0]
    jpeg = crop_path.read_bytes()
    image = np.asarray(Image.open(io.BytesIO(jpeg)))[:, :, None]  # the pixels /v1 decodes from the same file

    port = free_port()
    env = {"CARSEG_MODEL_DIR": args.model_dir, "CARSEG_DEVICE": args.device, "CARSEG_RATE_LIMIT_PER_S": "0"}
    url = f"http://127.0.0.1:{port}"
    v1 = f"{url}/v1/models/{args.model}/samples"
    npz = {"Accept": "application/x-npz"}
    cells = []
    # the service's log goes to a file: a pipe nobody reads fills with access lines and stalls the server
    with tempfile.TemporaryDirectory() as tmp, (Path(tmp) / "serve.log").open("wb") as log:
        procs = [carseg(["serve", "--port", str(port)], env, stderr=log)]
        try:
            wait_ready(url, procs)
            asyncio.run(closed_loop(v1, jpeg, [1], 2, 1.0, npz))  # warm-up
            shown = tool.command(url, args.model, Path("k<k>.json"), 0, *windows(args.seconds), "-f", "k<k>-c<c>.csv")
            template = " ".join(shown).replace("--concurrency-range 0", "--concurrency-range <c>").replace(f"{REPO}/", "")
            print("perf_analyzer:", template)
            for k in ks:
                data = input_data(Path(tmp) / f"k{k}.json", image, k)
                for conc in levels:
                    pa = run_perf_analyzer(tool, url, args.model, data, conc, args.seconds, Path(tmp) / f"k{k}-c{conc}.csv")
                    loop = asyncio.run(closed_loop(v1, jpeg, [k], conc, args.seconds, npz))
                    loop = {"requests_per_s": loop["images_per_s"], **{key: loop[key] for key in ("p50_ms", "p95_ms", "p99_ms", "errors", "requests")}}
                    cells.append({"k": k, "concurrency": conc, "perf_analyzer": pa, "closed_loop": loop})
        except Exception:
            print((Path(tmp) / "serve.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            stop(procs)

    print(f"\nperf_analyzer (/v2, binary tensors) vs closed_loop (/v1 npz): {args.model} on {args.device} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cpus), 128x128 LIDC crop {crop_path.relative_to(REPO)}")
    print(f"{'k':>3} {'conc':>5} {'tool':>14} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for cell in cells:
        for name in ("perf_analyzer", "closed_loop"):
            r = cell[name]
            if "failure" in r:
                print(f"{cell['k']:>3} {cell['concurrency']:>5} {name:>14} failed: {r['failure'][-300:]}")
                continue
            print(f"{cell['k']:>3} {cell['concurrency']:>5} {name:>14} {r['requests_per_s']:>8.2f} {r['p50_ms']:>8.1f} "
                  f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>6}")
    out = {
        "device": args.device, "cpus": os.cpu_count(), "model": args.model, "crop": str(crop_path.relative_to(REPO)),
        "seconds_per_cell": args.seconds, "perf_analyzer_command": template, "cells": cells,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
