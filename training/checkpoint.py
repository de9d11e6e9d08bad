"""Checkpoints: safetensors weights + ``manifest.json``. Nothing is ever unpickled.

A model folder holds numbered versions, ``MODEL/<version>/`` with ``calibration.safetensors``,
``refinement.safetensors`` and ``manifest.json`` (architecture, classes, channels, input size,
normalisation, data, evaluation metrics, and the sha256 of every tensor file, checked on load).
Training also keeps ``MODEL/train-state/`` (the discriminator and the optimisers, for resuming);
it is not a version and is not served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training.networks import ArchitectureConfig, CalibrationNet, Discriminator, RefinementNet
from training.sampling import Normalisation

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TENSOR_FILES = {"calibration": "calibration.safetensors", "refinement": "refinement.safetensors"}


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match its manifest."""


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


@dataclass(frozen=True)
class LoadedModel(ModelEntry):
    calibration: CalibrationNet
    refinement: RefinementNet


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_tensors(folder: Path, tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, str]:
    """Write each named tensor dict as ``<name>.safetensors``; return their sha256 by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, state in tensors.items():
        path = folder / f"{name}.safetensors"
        save_file(state, str(path))
        hashes[path.name] = sha256_file(path)
    return hashes


def save_model(
    folder: Path, calibration: CalibrationNet, refinement: RefinementNet, manifest: dict[str, Any]
) -> Path:
    """Write a servable version folder; ``manifest`` gains the format version and the file hashes."""
    hashes = save_tensors(folder, {"calibration": _state(calibration), "refinement": _state(refinement)})
    full = {**manifest, "format_version": FORMAT_VERSION, "sha256": hashes}
    (folder / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return folder


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    missing = {"architecture", "classes", "in_channels", "normalisation", "sha256"} - set(manifest)
    if missing:
        raise CheckpointError(f"{path}: missing keys {sorted(missing)}")
    return manifest


def load_verified(folder: Path, file_name: str, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load one tensor file after checking its sha256 against the manifest."""
    path = folder / file_name
    expected = manifest["sha256"].get(file_name)
    if expected is None:
        raise CheckpointError(f"{folder / MANIFEST}: no sha256 for {file_name}")
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(f"{path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}... (file changed or corrupt)")
    return load_file(str(path))


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


def load_model(path: Path, device: torch.device | str = "cpu", version: str | None = None) -> LoadedModel:
    """Load F and G in eval mode from a version folder or a model folder's latest version."""
    folder = resolve(Path(path), version)
    manifest = read_manifest(folder)
    try:
        arch = ArchitectureConfig.from_dict(manifest["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / MANIFEST}: bad architecture ({exc})") from exc
    calibration = CalibrationNet(arch.calibration)
    refinement = RefinementNet(arch.refinement)
    for net, key in ((calibration, "calibration"), (refinement, "refinement")):
        try:
            net.load_state_dict(load_verified(folder, TENSOR_FILES[key], manifest))
        except RuntimeError as exc:
            raise CheckpointError(f"{folder / TENSOR_FILES[key]}: does not fit the architecture ({exc})") from exc
        net.to(device).eval()
    return LoadedModel(
        name=manifest.get("name", folder.parent.name),
        version=folder.name,
        path=folder,
        manifest=manifest,
        calibration=calibration,
        refinement=refinement,
    )


def build_discriminator(arch: ArchitectureConfig) -> Discriminator:
    if arch.discriminator is None:
        raise CheckpointError("architecture has no discriminator (a serving checkpoint cannot resume training)")
    return Discriminator(arch.discriminator)
