"""Helpers for service tests: a small random-weight model on disk and request builders."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.checkpoint import save_model
from training.networks import CalibrationConfig, CalibrationNet, RefinementConfig, RefinementNet


def write_tiny_model(
    model_dir: Path, name: str = "tiny", channels: int = 1, classes: int = 2, seed: int = 0, position: bool = False
) -> Path:
    torch.manual_seed(seed)
    f_cfg = CalibrationConfig(channels, classes, widths=(8, 16, 16), position=position)
    g_cfg = RefinementConfig(channels, classes, widths=(8, 16, 16), noise_dim=4)
    f, g = CalibrationNet(f_cfg), RefinementNet(g_cfg)
    torch.nn.init.normal_(g.head.weight)  # an untrained G with the prior skip ignores z
    manifest = {
        "name": name,
        "architecture": {
            "calibration": {"in_channels": channels, "num_classes": classes, "widths": [8, 16, 16], "position": position},
            "refinement": {"in_channels": channels, "num_classes": classes, "widths": [8, 16, 16], "noise_dim": 4, "dropout": 0.1, "prior_skip": True},
        },
        "classes": ["background", "nodule", *[f"class{i}" for i in range(2, classes)]][:classes],
        "in_channels": channels,
        "normalisation": {"low": -1.0, "high": 1.0},
        "metrics": {"validation": {"ged": 0.5}},
    }
    return save_model(model_dir / name / "1", f, g, manifest)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def grey(h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))
