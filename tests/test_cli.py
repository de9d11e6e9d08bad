import json

import numpy as np
import pytest
from PIL import Image

from carseg.cli import main
from tests.service_fixtures import write_tiny_model


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
        "--json", str(report), "--figure", str(figure), "--figure-cases", "2", "--record", "--device", "cpu",
    ])
    out = capsys.readouterr().out
    assert "ged" in out and "calibration_error" in out
    data = json.loads(report.read_text())
    for key in ("n_samples", "ged", "hm_iou", "diversity", "ece", "oracle_ged", "calibration_error", "coherence"):
        assert key in data, key
    assert data["n_samples"] == 4
    assert Image.open(figure).size[0] > 128
    manifest = json.loads((tmp_path / "tiny" / "1" / "manifest.json").read_text())
    assert manifest["metrics"]["synthetic:halo:test"]["ged"] == data["ged"]


def test_evaluate_on_lidc_sample_has_no_oracle_keys(tmp_path, lidc_root, capsys):
    write_tiny_model(tmp_path, "tiny", channels=1, classes=2)
    report = tmp_path / "r.json"
    main(["evaluate", "--checkpoint", str(tmp_path / "tiny"), "--data", "lidc-sample", "--samples", "2", "--json", str(report), "--device", "cpu"])
    data = json.loads(report.read_text())
    assert data["cases"] == 9 and data["n_samples"] == 2
    assert {"ged", "hm_iou", "diversity", "ece"} <= set(data) and not {"oracle_ged", "calibration_error"} & set(data)


def test_evaluate_refuses_mismatched_classes(tmp_path):
    write_tiny_model(tmp_path, "tiny", channels=1, classes=2)
    with pytest.raises(SystemExit, match="classes"):
        main(["evaluate", "--checkpoint", str(tmp_path / "tiny"), "--data", "synthetic:flips", "--cases", "1", "--device", "cpu"])
