"""What rounding costs against the argmax: a /samples request's sampler call (the masks and the
uncertainty summary) on a 128x128 LIDC crop with the bundled default model, k = 1, 16 and 64, both
decisions in one process on one torch thread, alternating call by call so that the machine's drift
lands on both; a cell is the median of its calls. Peak memory is the sampler's memory model's bound
for each (``training.sampling.MemoryModel``), which the service sizes its chunks by.

    python bench/decision.py [--calls 9] [--json bench/results/decision-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KS = (1, 16, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=9)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "decision-cpu.json"))
    args = parser.parse_args()

    import torch

    from training import sampling
    from training.checkpoint import load_model
    from training.data import open_dataset

    sampling.use_device("cpu", threads=1)
    base = load_model(args.model, torch.device("cpu")).networks
    nets = {name: replace(base, decision_override=name) for name in sampling.DECISIONS}
    x = base.prepare([open_dataset("lidc-sample", "test")[0].image])
    outputs = (sampling.LABELS, sampling.SUMMARY)
    pixels = x.shape[-2] * x.shape[-1]
    ms: dict[str, dict[int, float]] = {name: {} for name in nets}
    for k in KS:
        times: dict[str, list[float]] = {name: [] for name in nets}
        for n in nets.values():
            sampling.sample(n, x, [k], [7], outputs=outputs)  # warm-up
        for _ in range(args.calls if k < 64 else max(3, args.calls // 3)):
            for name, n in nets.items():
                start = time.perf_counter()
                sampling.sample(n, x, [k], [7], outputs=outputs)
                times[name].append(1000 * (time.perf_counter() - start))
        for name in nets:
            ms[name][k] = statistics.median(times[name])
    bound = {name: {k: (lambda m: m.fixed(pixels, k) + k * m.per_sample * pixels)(sampling.MemoryModel.of(n)) for k in KS} for name, n in nets.items()}
    print(f"\nsampler, default model, one 128x128 crop, 1 thread ({os.cpu_count()} cpus): median ms of the calls; memory bound MB")
    print(f"{'k':>3} {'argmax ms':>10} {'rounding ms':>12} {'ratio':>6} {'argmax MB':>10} {'rounding MB':>12}")
    for k in KS:
        a, r = ms[sampling.ARGMAX][k], ms[sampling.ROUNDING][k]
        print(f"{k:>3} {a:>10.1f} {r:>12.1f} {r / a:>6.2f} {bound[sampling.ARGMAX][k] / 1e6:>10.1f} {bound[sampling.ROUNDING][k] / 1e6:>12.1f}")
    out = {"cpus": os.cpu_count(), "calls": args.calls, "ms": ms, "ratio": {k: ms[sampling.ROUNDING][k] / ms[sampling.ARGMAX][k] for k in KS},
           "memory_bound_bytes": bound}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
