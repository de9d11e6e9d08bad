"""The sampler on a CPU against another checkout's, side by side in one run: what a /samples request
computes (the masks, plus the uncertainty summary where the checkout has one), for k = 1, 16, 64 on
a 128x128 LIDC crop with the bundled default model, at 1 and 2 torch threads.

    python bench/sampler_cpu.py --against ../older-checkout [--rounds 3] [--json bench/results/sampler-cpu.json]

Each (checkout, threads) pair runs in a fresh process (its own torch and OpenMP settings), and the
pairs alternate round by round, so that the machine's drift lands on both; a cell is the median of
its rounds' medians. The masks of the same image, seed and k are compared between the checkouts.
Ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KS = (1, 16, 64)

# run inside each checkout: its own sampler and loader on this repository's model and crop
PROBE = r"""
import json, os, sys, time
import numpy as np
import torch
repo, model, threads, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, repo)
torch.set_num_threads(threads)
torch.set_flush_denormal(True)
from training.checkpoint import load_model
from training.data import open_dataset
import training.sampling as sampling
networks = load_model(model, torch.device("cpu")).networks
image = open_dataset("lidc-sample", "test")[0].image
x = networks.prepare([image])
outputs = [sampling.LABELS] + ([sampling.SUMMARY] if hasattr(sampling, "SUMMARY") else [])
result = {"ms": {}, "masks": None}
for k in (1, 16, 64):
    run = lambda: sampling.sample(networks, x, [k], [7], outputs=outputs)
    run()
    times = []
    for _ in range(9 if k < 64 else 3):
        t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    result["ms"][k] = 1000 * float(np.median(times))
np.save(out + ".npy", sampling.sample(networks, x, [16], [7], outputs=[sampling.LABELS])[0][sampling.LABELS].numpy())
json.dump(result, open(out, "w"))
"""


def probe(checkout: Path, threads: int, model: Path, workdir: Path, tag: str) -> dict:
    out = workdir / f"{tag}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update({"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(checkout)})
    subprocess.run([sys.executable, "-c", PROBE, str(checkout), str(model), str(threads), str(out)], check=True, cwd=checkout, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, required=True, help="another checkout (e.g. a worktree of an older commit)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "sampler-cpu.json"))
    args = parser.parse_args()
    checkouts = {"this": REPO, "other": args.against.resolve()}
    threads = [int(t) for t in args.threads.split(",")]
    runs: dict[str, dict[int, list[dict]]] = {name: {t: [] for t in threads} for name in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for t in threads:
                for name, checkout in checkouts.items():
                    runs[name][t].append(probe(checkout, t, args.model.resolve(), Path(tmp), f"{name}-{t}-{r}"))
        masks = {name: np.load(Path(tmp) / f"{name}-{threads[0]}-0.json.npy") for name in checkouts}
    identical = bool(np.array_equal(masks["this"], masks["other"]))
    table = {name: {t: {k: statistics.median(run["ms"][str(k)] for run in runs[name][t]) for k in KS} for t in threads} for name in checkouts}
    print(f"\nsampler on the CPU ({os.cpu_count()} cpus): ms per 128x128 image, median of {args.rounds} rounds; other = {checkouts['other']}")
    print(f"{'threads':>7} {'k':>3} {'other ms':>9} {'this ms':>8} {'speed-up':>8}")
    for t in threads:
        for k in KS:
            other, this = table["other"][t][k], table["this"][t][k]
            print(f"{t:>7} {k:>3} {other:>9.1f} {this:>8.1f} {other / this:>8.2f}")
    print(f"masks identical (k=16, seed 7): {identical}")
    out = {"cpus": os.cpu_count(), "rounds": args.rounds, "other": str(checkouts["other"]), "ms": table, "masks_identical": identical,
           "speedup": {t: {k: table["other"][t][k] / table["this"][t][k] for k in KS} for t in threads}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
