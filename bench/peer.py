"""carseg against a peer server, side by side in one run: the same bundled model and the same sampler
code behind Ray Serve, driven by the same closed-loop client.

    make bench-peer          (builds .venv-bench with the optional extra `bench`, which pins ray)
    .venv-bench/bin/python bench/peer.py [--seconds 6] [--rounds 3] [--concurrency 1,4,16,64] [--ks 1,16] [--json bench/results/peer-cpu.json]

Both servers run the model on the CPU with the same structure and knobs:

- carseg: ``carseg serve`` (the in-process queue; by default one single-thread executor per CPU
  thread, which takes every thread for a batch of 4 samples or more while the others idle), batch
  budget ``--budget`` samples, closing after 2 ms;
- Ray Serve: one deployment with as many replicas, each with one torch thread, ``@serve.batch``
  with the same sample budget (``batch_size_fn`` counts each request's k, so a batch holds at most
  ``--budget`` samples) and the same 2 ms wait; each request decodes the PNG, runs
  ``training.sampling.sample`` for the masks and answers carseg's JSON (base64 PNG masks), with the
  same codecs.

For each k and concurrency: throughput, p50/p95/p99; per server: start-up to the first answered
request, and memory as PSS summed over every process of the server (Ray's GCS, raylet, proxy,
controller and replicas; carseg's one process), read while it is loaded. The raw sampler's ceiling
is measured in the same run, twice: at each concurrency (bench/serve.py ``ceiling_at``: the best the
sampler reaches with as many images in flight as the clients keep, which is all a closed loop of
that concurrency can ask of a server), and its best at any load (``raw_sampler``: one call at a time,
batched, single-thread executors side by side). Masks for the same image, seed and k must be identical between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DELAY_S = 0.002  # carseg's default batch_max_delay_ms


def ray_app(port: int, model_dir: str, model: str, budget: int, replicas: int) -> None:
    """The Ray Serve side, in a process of its own (``--ray-serve``): serves until killed."""
    import numpy as np
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    ray.init(num_cpus=replicas, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": threads})
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=512)
    class Sampler:
        def __init__(self) -> None:
            import torch

            from training.checkpoint import load_model

            torch.set_num_threads(1)
            torch.set_flush_denormal(True)  # as carseg's use_device does
            self.networks = load_model(Path(model_dir) / model, torch.device("cpu")).networks

        @serve.batch(max_batch_size=budget, batch_wait_timeout_s=DELAY_S, batch_size_fn=lambda items: sum(k for _, k, _ in items))
        async def run(self, items: list[tuple[np.ndarray, int, int]]) -> list[list[str]]:
            from service.codecs.outputs import png_bytes
            from training.sampling import LABELS, sample

            images = self.networks.prepare([image for image, _, _ in items])
            out = sample(self.networks, images, [k for _, k, _ in items], [seed for _, _, seed in items], outputs=[LABELS])
            return [[base64.b64encode(png_bytes(mask)).decode() for mask in o[LABELS].cpu().numpy()] for o in out]

        async def __call__(self, request: Request) -> JSONResponse:
            from PIL import Image

            form = await request.form()
            data = await form["image"].read()
            image = np.asarray(Image.open(io.BytesIO(data)))[..., None]
            k, seed = int(request.query_params.get("k", 16)), int(request.query_params.get("seed", 0))
            masks = await self.run((image, k, seed))
            return JSONResponse({"model": model, "k": k, "seed": seed, "height": image.shape[0], "width": image.shape[1], "masks": masks})

    serve.run(Sampler.bind(), route_prefix=f"/v1/models/{model}/samples")
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def pss_mib(pid: int) -> tuple[float, int]:
    """PSS of a process tree in MiB (shared pages split among the sharers), and its process count."""
    from bench.procs import process_trees

    total, count = 0, 0
    for p in process_trees([pid])[0]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    count += 1
        except OSError:
            continue
    return total / 1024, count


def start_server(kind: str, port: int, args: argparse.Namespace, executors: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CARSEG_MODEL_DIR": args.model_dir, "CARSEG_DEVICE": "cpu",
           "CARSEG_BATCH_MAX_SAMPLES": str(args.budget), "CARSEG_EXECUTORS": str(executors)}
    if kind == "carseg":
        command = [sys.executable, "-m", "carseg", "serve", "--port", str(port)]
    else:
        command = [sys.executable, __file__, "--ray-serve", str(port), "--model-dir", args.model_dir, "--model", args.model,
                   "--budget", str(args.budget), "--replicas", str(executors)]
    # a session of its own, so that stopping it stops every process it started
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def post(url: str, data: bytes, k: int, seed: int, timeout: float = 120.0):
    import httpx

    return httpx.post(url, files={"image": ("img.png", data)}, params={"k": k, "seed": seed}, timeout=timeout)


def wait_answering(url: str, data: bytes, proc: subprocess.Popen, started: float, timeout_s: float = 300.0) -> float:
    """Seconds from ``started`` until the server answers a real request with 200."""
    import httpx

    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while starting")
        try:
            if post(url, data, 1, 0, timeout=30).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # polling interval
    raise TimeoutError(f"no answer within {timeout_s} s")


def masks_of(url: str, data: bytes, k: int, seed: int) -> list:
    import numpy as np
    from PIL import Image

    reply = post(url, data, k, seed)
    reply.raise_for_status()
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(m)))) for m in reply.json()["masks"]]


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
    # Ray's daemons leave the session's group on their own terms; make sure none outlives the run
    subprocess.run(["pkill", "-f", "ray::|raylet|gcs_server|ray/dashboard"], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(REPO / "models"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--ks", default="1,16")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=6.0, help="per measured cell")
    parser.add_argument("--budget", type=int, default=16, help="batch budget in samples, both servers and the ceiling")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ceilings and both servers; figures are their medians")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "peer-cpu.json"))
    parser.add_argument("--ray-serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray_serve:
        ray_app(args.ray_serve, args.model_dir, args.model, args.budget, args.replicas)
        return

    import numpy as np
    import torch
    from PIL import Image

    from bench.procs import free_port
    from bench.serve import ceiling_at, closed_loop, raw_sampler, sampler_run
    from carseg.threads import available_cores
    from training.data import open_dataset

    ks = [int(k) for k in args.ks.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    executors = available_cores()
    case = open_dataset("lidc-sample", "test")[0]
    buf = io.BytesIO()
    Image.fromarray(case.image[:, :, 0]).save(buf, format="PNG")
    data = buf.getvalue()

    model_path = Path(args.model_dir) / args.model
    run = sampler_run(model_path, case.image, "cpu")
    rounds: list[dict] = []
    masks: dict[str, dict] = {}
    for r in range(args.rounds):
        # this machine's speed drifts over minutes: each round measures the ceilings and both servers,
        # in turn (the order alternating), and every figure below is the median over the rounds
        found = {"ceiling": raw_sampler(run, ks, args.budget, args.seconds, "cpu", executors=executors),
                 "ceiling_at": {f"{k}/{c}": ceiling_at(run, k, c, args.budget, args.seconds / 2, executors) for k in ks for c in levels}}
        for kind in ("carseg", "ray")[:: 1 if r % 2 == 0 else -1]:
            port = free_port()
            url = f"http://127.0.0.1:{port}/v1/models/{args.model}/samples"
            started = time.monotonic()
            proc = start_server(kind, port, args, executors)
            try:
                startup = wait_answering(url, data, proc, started)
                asyncio.run(closed_loop(url, data, [1], 2, 2.0))  # warm-up
                cells, peak = {}, (0.0, 0)
                for k in ks:
                    for c in levels:
                        cells[f"{k}/{c}"] = asyncio.run(closed_loop(url, data, [k], c, args.seconds))
                        peak = max(peak, pss_mib(proc.pid))  # read right after the load, before it is freed
                if r == 0:
                    masks[kind] = {f"{k}/{seed}": masks_of(url, data, k, seed) for k in ks for seed in (0, 7)}
                found[kind] = {"startup_s": startup, "pss_mib": peak[0], "processes": peak[1], "cells": cells}
            finally:
                stop_server(proc)
        rounds.append(found)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    def median(get) -> float:
        return float(np.median([get(found) for found in rounds]))

    ceiling = {k: {"ceiling_images_per_s": median(lambda f, k=k: f["ceiling"][k]["ceiling_images_per_s"])} for k in ks}
    at = {cell: {"images_per_s": median(lambda f, cell=cell: f["ceiling_at"][cell]["images_per_s"]),
                 "by": [f["ceiling_at"][cell]["by"] for f in rounds]} for cell in rounds[0]["ceiling_at"]}
    servers = {
        kind: {"startup_s": median(lambda f, kind=kind: f[kind]["startup_s"]),
               "pss_mib": max(f[kind]["pss_mib"] for f in rounds), "processes": max(f[kind]["processes"] for f in rounds),
               "cells": {cell: {stat: median(lambda f, kind=kind, cell=cell, stat=stat: f[kind]["cells"][cell][stat])
                                for stat in ("images_per_s", "p50_ms", "p95_ms", "p99_ms", "client_cores")}
                                | {"errors": sum(f[kind]["cells"][cell]["errors"] for f in rounds)} for cell in rounds[0][kind]["cells"]}}
        for kind in ("carseg", "ray")
    }
    identical = all(np.array_equal(a, b) for key in masks["carseg"] for a, b in zip(masks["carseg"][key], masks["ray"][key], strict=True))
    print(f"\ncarseg vs Ray Serve: {args.model} on the CPU ({os.cpu_count()} cpus, {executors} executors/replicas of 1 thread), "
          f"128x128 LIDC crop, budget {args.budget} samples, {args.seconds:.0f} s per cell, medians of {args.rounds} rounds")
    print(f"{'k':>3} {'conc':>5} | {'carseg img/s':>12} {'p50':>6} {'p95':>6} {'p99':>6} | {'ray img/s':>9} {'p50':>6} {'p95':>6} {'p99':>6} |"
          f" {'ratio':>5} {'ceiling':>7} {'carseg/ceil':>11} {'carseg/best':>11} {'client cores':>12}")
    ratios = {}
    for k in ks:
        for c in levels:
            a, b = servers["carseg"]["cells"][f"{k}/{c}"], servers["ray"]["cells"][f"{k}/{c}"]
            ratio = a["images_per_s"] / b["images_per_s"] if b["images_per_s"] else float("inf")
            here = at[f"{k}/{c}"]["images_per_s"]
            share, of_best = a["images_per_s"] / here, a["images_per_s"] / ceiling[k]["ceiling_images_per_s"]
            ratios[f"{k}/{c}"] = {"throughput": ratio, "p99": a["p99_ms"] / b["p99_ms"] if b["p99_ms"] else float("nan"),
                                  "of_ceiling": share, "of_best_ceiling": of_best, "ray_of_ceiling": b["images_per_s"] / here}
            print(f"{k:>3} {c:>5} | {a['images_per_s']:>12.2f} {a['p50_ms']:>6.0f} {a['p95_ms']:>6.0f} {a['p99_ms']:>6.0f} |"
                  f" {b['images_per_s']:>9.2f} {b['p50_ms']:>6.0f} {b['p95_ms']:>6.0f} {b['p99_ms']:>6.0f} |"
                  f" {ratio:>5.2f} {here:>7.2f} {share:>11.2f} {of_best:>11.2f} {a['client_cores']:>12.2f}")
        print(f"    the sampler's best k={k} (any load): {ceiling[k]['ceiling_images_per_s']:.2f} img/s")
    print("ceiling: the raw sampler's best with as many images in flight as the clients keep (bench/serve.py ceiling_at); best: its best at any load;\n"
          "client cores: what the client took of the same cores while it drove carseg (the ceiling had them all)")
    for kind, s in servers.items():
        print(f"{kind:>7}: start-up to the first answer {s['startup_s']:.1f} s; PSS {s['pss_mib']:.0f} MiB in {s['processes']} processes")
    print(f"masks identical for the same image, seed and k: {identical}")
    out = {"cpus": os.cpu_count(), "executors": executors, "torch": torch.__version__, "budget": args.budget, "seconds_per_cell": args.seconds,
           "rounds": rounds, "ceiling": ceiling, "ceiling_at": at, "servers": servers, "ratios": ratios, "masks_identical": identical, "ray": _ray_version()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


if __name__ == "__main__":
    main()
