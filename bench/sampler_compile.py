"""What ``torch.compile`` (Inductor, C++ on a CPU) gives the sampler, against eager, in one process:
the decoder step CAR's G runs per chunk of samples (``RefinementNet.decode_shared``) compiled, the
rest eager; what a /samples request computes for the masks, 128x128 LIDC crop, bundled default
model, k = 1 and 16 at 1 and 2 torch threads. Also what the service would pay for it: the first
call (compilation) at the crop's size and again at another size, and whether the masks are identical.

    python bench/sampler_compile.py [--reps 6] [--json bench/results/sampler-compile-cpu.json]

Needs a C++ compiler (Inductor's CPU backend). Eager and compiled cells alternate round by round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from carseg.threads import configure  # noqa: E402

configure()  # before torch loads: OpenMP reads its settings once

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training.checkpoint import load_model  # noqa: E402
from training.data import open_dataset  # noqa: E402
from training.networks import RefinementNet  # noqa: E402
from training.sampling import LABELS, flush_denormals, sample  # noqa: E402

KS = (1, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "default"))
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "sampler-compile-cpu.json"))
    args = parser.parse_args()

    flush_denormals()
    networks = load_model(Path(args.model), torch.device("cpu")).networks
    image = open_dataset("lidc-sample", "test")[0].image
    other = np.ascontiguousarray(image[:96, :112])  # another size: a new shape for the compiled graph
    g = networks.refinement
    eager_decode = g.decode_shared
    compiled = torch.compile(RefinementNet.decode_shared)

    def use(kind: str) -> None:
        g.decode_shared = eager_decode if kind == "eager" else (lambda shared, take, z: compiled(g, shared, take, z))

    def masks(picture: np.ndarray, k: int, seed: int) -> torch.Tensor:
        return sample(networks, networks.prepare([picture]), [k], [seed], outputs=[LABELS])[0][LABELS].cpu()

    use("eager")
    reference = {k: masks(image, k, 3) for k in KS}
    reference_other = masks(other, 16, 3)
    use("compiled")
    first = {}
    t0 = time.perf_counter()
    compiled_masks = {k: masks(image, k, 3) for k in KS}
    first["128x128"] = time.perf_counter() - t0
    identical: dict[str, bool | str] = {f"{k}": bool(torch.equal(compiled_masks[k], reference[k])) for k in KS}
    t0 = time.perf_counter()
    try:
        # a second size: dynamo recompiles with symbolic shapes ("automatic dynamic")
        identical["96x112/16"] = bool(torch.equal(masks(other, 16, 3), reference_other))
        first["96x112"] = time.perf_counter() - t0
    except Exception as error:  # what a request of a new size would meet
        identical["96x112/16"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        first["96x112"] = float("nan")
        torch._dynamo.reset()
        compiled = torch.compile(RefinementNet.decode_shared)
        masks(image, 16, 3)  # compiled again at the crop's size for the timings

    threads = torch.get_num_threads()
    cells: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            for kind in ("eager", "compiled"):
                use(kind)
                for k in KS:
                    masks(image, k, 0)
                    for rep in range(args.reps):
                        t0 = time.perf_counter()
                        masks(image, k, rep)
                        cells.setdefault(f"{kind}/{n}/{k}", []).append(1000 * (time.perf_counter() - t0))
    torch.set_num_threads(threads)
    use("eager")

    print(f"\ntorch.compile of G's decoder step vs eager, 128x128 LIDC crop, median of {args.rounds} x {args.reps} calls")
    print(f"{'threads':>7} {'k':>3} | {'eager ms':>8} {'compiled ms':>11} {'speed-up':>8}")
    rows = {}
    for n in sorted({1, threads}):
        for k in KS:
            e, c = statistics.median(cells[f"eager/{n}/{k}"]), statistics.median(cells[f"compiled/{n}/{k}"])
            rows[f"{n}/{k}"] = {"eager_ms": e, "compiled_ms": c, "speed_up": e / c}
            print(f"{n:>7} {k:>3} | {e:>8.1f} {c:>11.1f} {e / c:>8.2f}")
    print(f"first call (compiling): {first['128x128']:.1f} s at 128x128 (k = 1 and 16), {first['96x112']:.1f} s more at 96x112")
    print(f"masks at 96x112: {identical['96x112/16']}")
    print(f"masks identical to eager: {identical}")
    out = {"torch": torch.__version__, "threads": threads, "rows": rows, "first_call_s": first, "masks_identical": identical}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
