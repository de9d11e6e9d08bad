import json

import numpy as np
import pytest

from training.checkpoint import load_model
from training.config import TrainConfig
from training.data import open_dataset
from training.evaluate import evaluate
from training.train import STATE_DIR, train

TINY = {
    "calibration": {"in_channels": 3, "num_classes": 9, "widths": [8, 16]},
    "refinement": {"in_channels": 3, "num_classes": 9, "widths": [8, 16], "noise_dim": 4},
    "discriminator": {"in_channels": 3, "num_classes": 9, "widths": [8, 8]},
}


def _config(out, steps):
    return TrainConfig(
        data="synthetic:flips", out=out, steps=steps, size=32, batch_size=2, samples=2,
        f_warmup=0.25, val_every_s=1e9, val_cases=2, val_samples=3, architecture=TINY,
    )


def test_a_few_steps_write_a_checkpoint_that_loads_and_samples(tmp_path):
    out = tmp_path / "tiny"
    version = train(_config(out, 4))
    assert version == out / "1"
    model = load_model(out)
    manifest = model.manifest
    assert manifest["classes"][0] == "background" and manifest["in_channels"] == 3
    assert set(manifest["sha256"]) == {"calibration.safetensors", "refinement.safetensors"}
    assert "ged_3" in manifest["metrics"]["validation"]
    history = [json.loads(line) for line in (out / STATE_DIR / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 4
    result = evaluate(model.networks, open_dataset("synthetic:flips", "test", length=2), n_samples=3)
    for key in ("ged_3", "hm_iou_3", "diversity_3", "ece", "oracle_ged_3", "calibration_error", "event_calibration_error", "coherence"):
        assert np.isfinite(result.summary[key]), key


def test_resume_continues_from_the_saved_step(tmp_path):
    out = tmp_path / "tiny"
    train(_config(out, 3))
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    assert state["step"] == 3
    train(_config(out, 5))
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    assert state["step"] == 5 and state["version"] == "1"
    history = [json.loads(line)["step"] for line in (out / STATE_DIR / "history.jsonl").read_text().splitlines()]
    assert history == [3, 5]


def test_resume_refuses_other_data(tmp_path):
    out = tmp_path / "tiny"
    train(_config(out, 2))
    from dataclasses import replace

    from training.manifest import CheckpointError

    with pytest.raises(CheckpointError, match="was trained on"):
        train(replace(_config(out, 3), data="synthetic:halo"))
