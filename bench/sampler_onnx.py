"""G's decoder under ONNX Runtime against torch's, side by side in one process: the part of a
/samples request that runs once per sample (F and G's encoder run once per image, in torch either
way), for the bundled default model on a 128x128 LIDC crop.

    make .venv-bench/.installed     (the optional extra `bench` pins onnx, onnxscript, onnxruntime)
    .venv-bench/bin/python bench/sampler_onnx.py [--rounds 3] [--json bench/results/sampler-onnx-cpu.json]

torch: ``RefinementNet.decode_shared`` as the sampler calls it (region noise projected per region,
NHWC, BatchNorm folded). ONNX Runtime: the same ``decode_shared`` exported with the noise as an
input (one sample's region-noise map per row, ``training.noise_field.field``, built in torch and
counted in its time), the batch of samples dynamic, run by ORT's CPU provider with all graph
optimisations. For k = 1 and 16, at 1 and 2 threads (torch's and ORT's intra-op threads alike), the
median ms per call over rounds that alternate the two; the masks (logits' argmax) compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from carseg.threads import configure  # noqa: E402

configure()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from training import noise_field  # noqa: E402
from training.checkpoint import load_model  # noqa: E402
from training.data import open_dataset  # noqa: E402
from training.sampling import noise, region_vectors  # noqa: E402


class OneImageDecoder(nn.Module):
    """``decode_shared`` for the samples of one image of a G with 4 widths (the default's): its
    shared tensors (batch 1, broadcast) and a noise map per sample -> logits (n, C, H, W)."""

    def __init__(self, refinement: nn.Module) -> None:
        super().__init__()
        self.refinement = refinement

    def forward(self, noise_map: Tensor, s0: Tensor, s1: Tensor, s2: Tensor, s3: Tensor, s4: Tensor) -> Tensor:
        return self.refinement.decode_shared([s0, s1, s2, s3, s4], lambda t: t, noise_map)


def timed(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per cell and round")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "sampler-onnx-cpu.json"))
    args = parser.parse_args()

    networks = load_model(args.model, torch.device("cpu")).networks
    g, config = networks.refinement, networks.refinement.config
    x = networks.prepare([open_dataset("lidc-sample", "test")[0].image])
    with torch.inference_mode():
        p_f = networks.calibration(x).softmax(dim=1)
        shared = g.share(g.encode(x, p_f))
        labels, counts = noise_field.doubt_regions(p_f, config.doubt_threshold, config.region_grow)
    shares = noise_field.RegionShares(labels, counts[0])

    def torch_decode(k: int) -> Tensor:
        with torch.inference_mode():
            vectors = region_vectors(noise(7, k, config.noise_dim), counts * k)
            return g.decode_shared(shared, lambda t: t[0:1], noise_field.RegionNoise(shares, lambda t: t[0:1], vectors))

    export_started = time.perf_counter()
    path = Path(tempfile.mkdtemp()) / "decoder.onnx"
    example = noise_field.field(labels.repeat(2, 1, 1), region_vectors(noise(7, 2, config.noise_dim), counts * 2))
    names = ["noise_map", *(f"s{i}" for i in range(len(shared)))]
    torch.onnx.export(
        OneImageDecoder(g).eval(), (example, *shared), str(path), input_names=names, output_names=["logits"],
        dynamic_shapes={"noise_map": {0: torch.export.Dim("n", min=1, max=256)}, **{f"s{i}": None for i in range(len(shared))}},
    )
    export_s = time.perf_counter() - export_started
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {}
    for threads in (1, 2):
        options.intra_op_num_threads = threads
        sessions[threads] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds_shared = {f"s{i}": t.contiguous().numpy() for i, t in enumerate(shared)}

    def ort_decode(k: int, threads: int) -> np.ndarray:
        with torch.inference_mode():
            vectors = region_vectors(noise(7, k, config.noise_dim), counts * k)
            noise_map = noise_field.field(labels.repeat(k, 1, 1), vectors).contiguous().numpy()
        return sessions[threads].run(["logits"], {"noise_map": noise_map, **feeds_shared})[0]

    cells: dict[str, dict] = {}
    for threads in (1, 2):
        for k in (1, 16):
            expected, got = torch_decode(k), torch.from_numpy(ort_decode(k, threads))
            same = (expected.argmax(1) == got.argmax(1)).float().mean().item()
            cells[f"{threads}/{k}"] = {"threads": threads, "k": k, "torch_ms": [], "ort_ms": [], "mask_pixels_identical": same,
                                      "max_abs_logit_diff": (expected - got).abs().max().item()}
    for r in range(args.rounds):
        for cell in cells.values():
            threads, k = cell["threads"], cell["k"]
            torch.set_num_threads(threads)
            runs = [("torch_ms", lambda k=k: torch_decode(k)), ("ort_ms", lambda k=k, threads=threads: ort_decode(k, threads))]
            for key, call in runs if r % 2 == 0 else runs[::-1]:
                cell[key].append(1000 * timed(call, args.repeats))
    print(f"G's decoder for one 128x128 LIDC crop ({platform.node()}, {torch.get_num_threads()} threads available, "
          f"{counts[0]} regions of doubt): ms per call, median of {args.rounds} rounds; ONNX export took {export_s:.1f} s")
    print("threads   k  torch ms  ORT ms  ORT speed-up  mask pixels identical  max |logit diff|")
    for cell in cells.values():
        cell["torch_ms"], cell["ort_ms"] = statistics.median(cell["torch_ms"]), statistics.median(cell["ort_ms"])
        cell["speedup"] = cell["torch_ms"] / cell["ort_ms"]
        print(f"{cell['threads']:>7} {cell['k']:>3} {cell['torch_ms']:>9.1f} {cell['ort_ms']:>7.1f} {cell['speedup']:>13.2f}"
              f" {cell['mask_pixels_identical']:>22.6f} {cell['max_abs_logit_diff']:>17.2e}")
    model = args.model.resolve()
    out = {"model": str(model.relative_to(REPO) if model.is_relative_to(REPO) else model), "regions": counts[0], "export_s": export_s,
           "onnxruntime": ort.__version__,
           "torch": torch.__version__, "rounds": args.rounds, "cells": list(cells.values())}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
