"""Checkpoints: F and G as safetensors beside their manifest (``training.manifest`` has the layout
and reads it without torch). Nothing is ever unpickled: a tensor file is loaded only after its
sha256 matches the manifest's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training.manifest import FORMAT_VERSION, MANIFEST, TENSOR_FILES, CheckpointError, ModelEntry, Normalisation, read_entry, sha256_file
from training.networks import ArchitectureConfig, CalibrationNet, Discriminator, RefinementNet
from training.sampling import Networks
from training.ssn import SSNConfig, SSNMean, StochasticSegmentationNet


@dataclass(frozen=True)
class LoadedModel(ModelEntry):
    networks: Networks


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


def _car_networks(manifest: dict[str, Any], normalisation: Normalisation) -> Networks:
    arch = ArchitectureConfig.from_dict(manifest["architecture"])
    return Networks(CalibrationNet(arch.calibration), RefinementNet(arch.refinement), normalisation)


def _ssn_networks(manifest: dict[str, Any], normalisation: Normalisation) -> Networks:
    """The SSN serves as both F (its mean) and G (its samples); its weights are G's file, F's is empty."""
    net = StochasticSegmentationNet(SSNConfig.from_dict(manifest["architecture"]["ssn"]))
    return Networks(SSNMean(net), net, normalisation)  # type: ignore[arg-type]


# how each method's manifest is turned into untrained networks; a manifest without "method" is CAR's
_BUILDERS = {"car": _car_networks, "ssn": _ssn_networks}


def load_model(path: Path, device: torch.device | str = "cpu", version: str | None = None) -> LoadedModel:
    """Load F and G in eval mode from a version folder or a model folder's pinned or latest version."""
    entry = read_entry(Path(path), version)
    manifest_path = entry.path / MANIFEST
    method = entry.manifest.get("method", "car")
    if method not in _BUILDERS:
        raise CheckpointError(f"{manifest_path}: unknown method {method!r}; expected one of {sorted(_BUILDERS)}")
    try:
        networks = _BUILDERS[method](entry.manifest, entry.normalisation)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{manifest_path}: bad architecture or normalisation ({exc})") from exc
    for net, key in ((networks.calibration, "calibration"), (networks.refinement, "refinement")):
        try:
            net.load_state_dict(load_verified(entry.path, TENSOR_FILES[key], entry.manifest))
        except RuntimeError as exc:
            raise CheckpointError(f"{entry.path / TENSOR_FILES[key]}: does not fit the architecture ({exc})") from exc
        net.to(device).eval()
        if torch.device(device).type == "cpu":
            # oneDNN's convolutions run NHWC without reordering the weights each call: k=16 at 128 x 128
            # took 95 ms instead of 191 on 2 threads, the same masks (bench/sampler_cpu.py)
            net.to(memory_format=torch.channels_last)
    return LoadedModel(entry.name, entry.version, entry.path, entry.manifest, networks)


def build_discriminator(arch: ArchitectureConfig) -> Discriminator:
    if arch.discriminator is None:
        raise CheckpointError("architecture has no discriminator (a serving checkpoint cannot resume training)")
    return Discriminator(arch.discriminator)
