import json

import pytest
import torch

from training.checkpoint import load_model, save_model
from training.manifest import CheckpointError, resolve
from training.networks import ArchitectureConfig, CalibrationNet, RefinementNet


def _save(folder, seed=0):
    torch.manual_seed(seed)
    arch = ArchitectureConfig.default(1, 2)
    f, g = CalibrationNet(arch.calibration), RefinementNet(arch.refinement)
    manifest = {
        "name": "m",
        "architecture": {"calibration": arch.to_dict()["calibration"], "refinement": arch.to_dict()["refinement"]},
        "classes": ["background", "nodule"],
        "in_channels": 1,
        "normalisation": {"low": -1.0, "high": 1.0},
    }
    save_model(folder, f, g, manifest)
    return f, g


def test_round_trip_restores_identical_weights(tmp_path):
    f, g = _save(tmp_path / "m" / "1")
    model = load_model(tmp_path / "m")
    assert model.version == "1" and model.classes == ["background", "nodule"]
    for a, b in zip(f.state_dict().values(), model.networks.calibration.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(g.state_dict().values(), model.networks.refinement.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not model.networks.refinement.training  # loaded for inference


def test_latest_version_and_pinned_version(tmp_path):
    _save(tmp_path / "m" / "2")
    _save(tmp_path / "m" / "10")
    (tmp_path / "m" / "train-state").mkdir()
    assert resolve(tmp_path / "m").name == "10"
    assert resolve(tmp_path / "m", "2").name == "2"
    with pytest.raises(CheckpointError, match="no version 3"):
        resolve(tmp_path / "m", "3")


def test_one_changed_byte_is_a_clear_error(tmp_path):
    folder = tmp_path / "m" / "1"
    _save(folder)
    path = folder / "refinement.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"refinement.safetensors: sha256 .* does not match"):
        load_model(folder)


def test_missing_manifest_keys_and_files(tmp_path):
    folder = tmp_path / "m" / "1"
    _save(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "calibration.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"calibration\.safetensors: missing"):
        load_model(folder)
    del manifest["classes"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="neither a version folder"):
        load_model(tmp_path / "nothing")


def test_a_new_model_rounds_and_one_saved_before_the_rule_keeps_the_argmax(tmp_path):
    _save(tmp_path / "m" / "1")
    assert load_model(tmp_path / "m").networks.decision == "rounding"  # the default architecture's rule
    manifest_path = tmp_path / "m" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["architecture"]["refinement"]["decision"]  # as written before the field existed
    manifest_path.write_text(json.dumps(manifest))
    assert load_model(tmp_path / "m").networks.decision == "argmax"
