"""What a 3-D request costs: a 128 x 128 x 64 CT volume at k = 8 through ``carseg serve`` on the
bundled default model, as NIfTI in -> NIfTI out (samples; uncertainty maps), as a 64-file DICOM
series -> DICOM SEG, and, in the same run, the same 64 slices sent as 64 separate 2-D requests
one after another: wall time, request and response sizes, and the API's peak RSS.

The volume is built from the LIDC sample's crops turned back into Hounsfield units through the
default model's window (so the model sees what it saw in training), each crop a run of slices."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.procs import REPO, free_port, logged, proc_status, stop
from bench.serve import wait_ready


def ct_volume(depth: int, lidc: Path) -> np.ndarray:
    """(depth, 128, 128) Hounsfield units from the LIDC crops through the default model's window."""
    window = json.loads((REPO / "models/default/1/manifest.json").read_text())["window"]
    crops = [np.asarray(Image.open(p), dtype=np.float32) / 255.0 for p in sorted(lidc.glob("*/*/image_*.jpg"))]
    low = window["center"] - window["width"] / 2
    return np.stack([crops[(d * len(crops)) // depth] * window["width"] + low for d in range(depth)])


def nifti(hu: np.ndarray) -> bytes:
    import nibabel as nib

    affine = np.diag([-0.7, -0.7, 1.25, 1.0])
    image = nib.Nifti1Image(np.round(hu.transpose(2, 1, 0)[::-1, ::-1]).astype(np.int16), affine)
    return gzip.compress(image.to_bytes(), compresslevel=6)


def dicom_series(hu: np.ndarray) -> list[bytes]:
    import sys

    sys.path.insert(0, str(REPO))
    from tests.medical_fixtures import ct_slice

    return [ct_slice(hu[d], d, spacing=(0.7, 0.7), thickness=1.25) for d in range(len(hu))]


def timed(label: str, call, pid: int, request_bytes: int) -> dict:
    started = time.perf_counter()
    response = call()
    wall = time.perf_counter() - started
    assert response.status_code == 200, response.text[:500]
    return {"request": label, "seconds": round(wall, 2), "request_mb": round(request_bytes / 1e6, 2),
            "response_mb": round(len(response.content) / 1e6, 2), "api_peak_rss_mb": round(proc_status(pid)["VmHWM"] / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "bench/results/volume.json"))
    args = parser.parse_args()
    hu = ct_volume(args.depth, REPO / "data/lidc-sample")
    volume, series = nifti(hu), dicom_series(hu)
    port = free_port()
    proc = logged(["serve", "--port", str(port)], {"CARSEG_MODEL_DIR": str(REPO / "models")})
    url = f"http://127.0.0.1:{port}/v1/models/default"
    params = {"k": args.k, "seed": 3}
    rows = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", [proc])
        with httpx.Client(timeout=600) as client:
            client.post(f"{url}/samples", files={"image": ("warm.nii.gz", nifti(hu[:2]))}, params=params)  # load the model
            rows.append(timed("NIfTI in -> samples NIfTI", lambda: client.post(f"{url}/samples", files={"image": ("v.nii.gz", volume)},
                              params={**params, "format": "nifti"}), proc.pid, len(volume)))
            rows.append(timed("NIfTI in -> uncertainty zip", lambda: client.post(f"{url}/uncertainty", files={"image": ("v.nii.gz", volume)},
                              params={**params, "format": "nifti"}), proc.pid, len(volume)))
            parts = [("image", (f"IM{d}.dcm", data)) for d, data in enumerate(series)]
            rows.append(timed("DICOM series -> DICOM SEG zip", lambda: client.post(f"{url}/samples", files=parts,
                              params={**params, "format": "dicom-seg"}), proc.pid, sum(len(s) for s in series)))

            def slices_alone() -> httpx.Response:
                for d in range(args.depth):
                    buf = io.BytesIO()
                    np.save(buf, np.clip((hu[d] - hu.min()) / np.ptp(hu), 0, 1).astype(np.float32))
                    response = client.post(f"{url}/samples", files={"image": ("s.npy", buf.getvalue())}, params={**params, "seed": 3 + d})
                    assert response.status_code == 200
                return response

            alone = timed(f"{args.depth} x 2-D requests, one after another", slices_alone, proc.pid, 0)
            alone["response_mb"] = None
            rows.append(alone)
    finally:
        stop([proc])
    print(f"\n{args.depth} slices x 128 x 128, k = {args.k}, bundled default model, CPU\n")
    print(f"{'request':44s} {'seconds':>8s} {'in MB':>7s} {'out MB':>7s} {'API peak RSS MB':>16s}")
    for row in rows:
        out = "" if row["response_mb"] is None else f"{row['response_mb']:.2f}"
        print(f"{row['request']:44s} {row['seconds']:8.2f} {row['request_mb']:7.2f} {out:>7s} {row['api_peak_rss_mb']:16d}")
    Path(args.out).write_text(json.dumps({"depth": args.depth, "k": args.k, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
