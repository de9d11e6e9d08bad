"""Evaluate the bundled models and their baselines on one device and write the reports as JSON:
the numbers the README's results table shows, and a check that the CUDA path of the evaluation,
the baselines and ``carseg reproduce`` runs. Runs where only torch, scipy and PIL are installed
(no service stack): ``python bench/gpu_eval.py --device cuda --out DIR``."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from training.baselines import BASELINES, baseline
from training.checkpoint import load_model
from training.data import open_dataset
from training.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
RUNS = (("default", "synthetic:halo"), ("flips", "synthetic:flips"), ("default", "lidc-sample"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, help="cap on synthetic test cases (default: the split's 200)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for name, data in RUNS:
        model = load_model(REPO / "models" / name, args.device)
        dataset = open_dataset(data, "test", length=args.cases)
        methods = ("model", *BASELINES) if data.startswith("synthetic:") else ("model",)
        for method in methods:
            networks = model.networks if method == "model" else baseline(model.networks, method)
            started = time.perf_counter()
            result = evaluate(networks, dataset, n_samples=16, n_large=100)
            seconds = time.perf_counter() - started
            key = f"{data}:test" if method == "model" else f"{data}:test:{method}"
            reports[f"{name}|{key}"] = {
                **result.to_json(), "method": model.manifest.get("method", "car") if method == "model" else method,
                "model": name, "version": model.version, "data": data, "split": "test", "device": str(args.device),
                "seconds": round(seconds, 1),
            }
            print(f"{name:8} {key:40} ged_16 {result.summary['ged_16']:.4f} {seconds:6.1f} s", flush=True)
    (args.out / "evals.json").write_text(json.dumps(reports, indent=1) + "\n")
    if args.device.startswith("cuda"):
        from tests.test_reproduce import TINY
        from training.reproduce import reproduce

        started = time.perf_counter()
        reproduce(args.out / "tiny", replace(TINY, name="tiny-cuda"), device=args.device)
        print(f"reproduce (tiny plan) on {args.device}: {time.perf_counter() - started:.1f} s", flush=True)
        print(torch.cuda.get_device_name(), flush=True)


if __name__ == "__main__":
    main()
