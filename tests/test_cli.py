import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carseg.cli import main
from tests.service_fixtures import write_tiny_model
from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_data_synth_writes_the_folder_format(tmp_path):
    main(["data", "synth", "flips", str(tmp_path / "flips"), "--train", "3", "--val", "1", "--test", "2"])
    root = tmp_path / "flips"
    assert json.loads((root / "classes.json").read_text())[0] == "background"
    cases = sorted((root / "test").iterdir())
    assert len(cases) == 2
    image = np.asarray(Image.open(cases[0] / "image.png"))
    assert image.shape == (64, 64, 3)
    assert len(list(cases[0].glob("label_*.png"))) == 4


def test_evaluate_prints_writes_json_figure_and_records(tmp_path, capsys):
    write_tiny_model(tmp_path, "tiny", channels=1, classes=2)
    report, figure = tmp_path / "r.json", tmp_path / "f.png"
    main([
        "evaluate", "--checkpoint", str(tmp_path / "tiny"), "--data", "synthetic:halo", "--cases", "2", "--samples", "4",
        "--samples-large", "6", "--json", str(report), "--figure", str(figure), "--figure-cases", "2", "--record", "--device", "cpu",
    ])
    out = capsys.readouterr().out
    assert "ged_4" in out and "calibration_error" in out and "reliability" in out
    data = json.loads(report.read_text())
    for key in (
        "n_samples", "ged_4", "ged_6", "hm_iou_4", "diversity_4", "ece", "ece_pixels", "oracle_ged_4", "calibration_error",
        "event_calibration_error", "event_calibration_floor", "coherence", "reliability", "method",
    ):
        assert key in data, key
    assert data["n_samples"] == 4 and data["method"] == "car"
    assert sum(data["reliability"]["p_f"]["counts"]) == data["ece_pixels"] and "ece_samples" in data
    assert Image.open(figure).size[0] > 128
    manifest = json.loads((tmp_path / "tiny" / "1" / "manifest.json").read_text())
    assert manifest["metrics"]["synthetic:halo:test"]["ged_4"] == data["ged_4"]


def test_evaluate_on_lidc_sample_has_no_oracle_keys(tmp_path, lidc_root, capsys):
    write_tiny_model(tmp_path, "tiny", channels=1, classes=2)
    report = tmp_path / "r.json"
    main([
        "evaluate", "--checkpoint", str(tmp_path / "tiny"), "--data", "lidc-sample", "--samples", "2", "--samples-large", "0",
        "--json", str(report), "--device", "cpu",
    ])
    data = json.loads(report.read_text())
    assert data["cases"] == 9 and data["n_samples"] == 2
    assert {"ged_2", "hm_iou_2", "diversity_2", "ece"} <= set(data) and not {"oracle_ged_2", "calibration_error", "ged_100"} & set(data)


def test_evaluate_refuses_mismatched_classes(tmp_path):
    write_tiny_model(tmp_path, "tiny", channels=1, classes=2)
    with pytest.raises(SystemExit, match="classes"):
        main(["evaluate", "--checkpoint", str(tmp_path / "tiny"), "--data", "synthetic:flips", "--cases", "1", "--device", "cpu"])


def test_evaluate_one_case_without_ambiguity_reports_no_ratio_instead_of_dividing_by_zero(tmp_path):
    # halo's test case 0 is a solid nodule with no rim: every annotator agrees, the oracle GED is 0
    report = tmp_path / "r.json"
    main([
        "evaluate", "--checkpoint", str(REPO / "models" / "default"), "--data", "synthetic:halo", "--cases", "1", "--samples-large", "0",
        "--json", str(report), "--device", "cpu",
    ])
    data = json.loads(report.read_text())
    assert data["oracle_ged_16"] == 0.0 and "ged_ratio_16" not in data


def test_evaluate_a_baseline_built_on_the_checkpoint(tmp_path):
    write_tiny_model(tmp_path, "tiny", channels=1, classes=2)
    report = tmp_path / "r.json"
    main([
        "evaluate", "--checkpoint", str(tmp_path / "tiny"), "--data", "synthetic:halo", "--cases", "3", "--samples", "4",
        "--samples-large", "0", "--method", "deterministic", "--json", str(report), "--record", "--device", "cpu",
    ])
    data = json.loads(report.read_text())
    assert data["method"] == "deterministic" and data["diversity_4"] == 0.0
    manifest = json.loads((tmp_path / "tiny" / "1" / "manifest.json").read_text())
    assert "synthetic:halo:test:deterministic" in manifest["metrics"]


def test_train_passes_init_amp_lr_f_weight_decay_and_position_to_the_training_run(tmp_path, monkeypatch, capsys):
    import training.train

    configs = []
    monkeypatch.setattr(training.train, "train", lambda config: configs.append(config) or config.out / "1")
    common = ["train", "--data", "lidc-sample", "--out", str(tmp_path / "tuned"), "--steps", "2", "--device", "cpu"]
    main([*common, "--init", str(tmp_path / "tiny")])
    main([*common, "--no-amp", "--lr-f", "1e-3", "--weight-decay", "0", "--position"])
    assert [(c.init, c.amp) for c in configs] == [(tmp_path / "tiny", None), (None, False)]
    defaults = TrainConfig(data="x", out=tmp_path, steps=1)
    assert [(c.lr_f, c.weight_decay, c.position) for c in configs] == [
        (defaults.lr_f, defaults.weight_decay, defaults.position), (1e-3, 0.0, True),
    ]
    assert f"best version: {tmp_path / 'tuned' / '1'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--amp"], "--amp: bfloat16 autocast on cpu"), (["--method", "ssn", "--init", "x"], "for --method car"),
        (["--method", "ssn", "--position"], "for --method car"),
    ],
)
def test_train_refuses_amp_on_a_cpu_and_init_for_ssn(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(["train", "--data", "synthetic:flips", "--out", str(tmp_path / "m"), "--steps", "1", "--device", "cpu", *extra])
    assert not (tmp_path / "m").exists()
