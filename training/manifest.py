"""What a model folder holds, read without torch: the API of a Redis-mode service lists models,
validates requests and routes jobs from manifests alone and never loads a network.

On disk (``training.checkpoint`` writes and loads the weights)::

    MODEL/<version>/manifest.json            architecture, classes, in_channels, input_size, normalisation,
                                             data, metrics, training, format_version, sha256 of each tensor file
    MODEL/<version>/calibration.safetensors  F
    MODEL/<version>/refinement.safetensors   G
    MODEL/train-state/                       the discriminator and optimisers, for resuming; not a version

Versions are folders named by integers; the highest is the latest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TENSOR_FILES = {"calibration": "calibration.safetensors", "refinement": "refinement.safetensors"}
REQUIRED_KEYS = frozenset({"architecture", "classes", "in_channels", "normalisation", "sha256"})


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match its manifest."""


@dataclass(frozen=True)
class Normalisation:
    """Maps stored pixel values to the network's input range: integer images are divided by the
    maximum of their dtype (255 or 65535), float images are taken as already in [0, 1]; then
    [0, 1] is mapped linearly onto [low, high]."""

    low: float = -1.0
    high: float = 1.0

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) uint8 | uint16 | float -> (C, H, W) float32."""
        if np.issubdtype(image.dtype, np.integer):
            unit = image.astype(np.float32) / float(np.iinfo(image.dtype).max)
        else:
            unit = image.astype(np.float32)
        return (self.low + (self.high - self.low) * unit).transpose(2, 0, 1)


@dataclass(frozen=True)
class ModelEntry:
    """One version of a model as its manifest describes it; no weights loaded."""

    name: str
    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def in_channels(self) -> int:
        return int(self.manifest["in_channels"])

    @property
    def normalisation(self) -> Normalisation:
        return Normalisation(**self.manifest["normalisation"])

    @property
    def sees_position(self) -> bool:
        """Whether F sees each pixel's place in the image (``networks.CalibrationConfig.position``):
        such a model expects images framed as its training images were (crops centred on a lesion)."""
        return bool(self.manifest.get("architecture", {}).get("calibration", {}).get("position", False))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    missing = REQUIRED_KEYS - set(manifest)
    if missing:
        raise CheckpointError(f"{path}: missing keys {sorted(missing)}")
    return manifest


def version_folders(model_dir: Path) -> list[Path]:
    """The version folders of a model folder (names that are integers), oldest first."""
    if not model_dir.is_dir():
        return []
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def resolve(path: Path, version: str | None = None) -> Path:
    """A version folder as given, or a model folder's pinned or latest version."""
    if (path / MANIFEST).exists() and version is None:
        return path
    versions = version_folders(path)
    if version is not None:
        chosen = [v for v in versions if v.name == version]
        if not chosen:
            raise CheckpointError(f"{path}: no version {version} (has {[v.name for v in versions]})")
        return chosen[0]
    if not versions:
        raise CheckpointError(f"{path}: neither a version folder (no {MANIFEST}) nor a model folder with versions")
    return versions[-1]


def read_entry(path: Path, version: str | None = None) -> ModelEntry:
    """The manifest view of a version folder, or of a model folder's pinned or latest version."""
    folder = resolve(Path(path), version)
    manifest = read_manifest(folder)
    return ModelEntry(manifest.get("name", folder.parent.name), folder.name, folder, manifest)
