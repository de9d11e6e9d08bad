"""``carseg reproduce`` end to end on a budget of seconds: every method trained or built, judged by
the same evaluation, and written out in the documented schema. (What the numbers reach is the
report's business, at its real budget, not a unit test's.)"""

import json

from training.reproduce import METHODS, DataBudget, Plan, reproduce
from training.toy1d import ToyConfig

TINY = Plan(
    name="tiny",
    datasets=(DataBudget("flips", minutes=0.02, size=32, cases=2),),
    toy=ToyConfig(f_steps=20, steps=20, samples=4, batch=8, f_batch=32),
    n_large=20,
    val_every_s=1e9,
)


def test_reproduce_writes_the_report_and_the_results_schema(tmp_path):
    results = reproduce(tmp_path, TINY)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["toy1d"]) == {"pi_true", "pi_car", "pi_no_cal"} and data["toy1d"]["pi_true"] == 0.9
    assert set(data["synthetic"]) == {"flips"} and set(data["synthetic"]["flips"]) == set(METHODS)
    for method, row in data["synthetic"]["flips"].items():
        for key in ("ged_16", "ged_20", "hm_iou_16", "calibration_error", "event_calibration_error", "coherence", "ece_samples"):
            assert key in row, (method, key)
    assert data["synthetic"]["flips"]["deterministic"]["diversity_16"] == 0.0
    assert results["synthetic"]["flips"]["car"]["ged_16"] == data["synthetic"]["flips"]["car"]["ged_16"]
    report = (tmp_path / "report.md").read_text()
    assert "## 1D toy regression" in report and "## synthetic:flips" in report
    for method in METHODS:
        assert f"| {method} |" in report
    for name in ["toy1d.png", *(f"flips-{m}.png" for m in METHODS)]:
        assert (tmp_path / name).stat().st_size > 1000, name
        assert f"({name})" in report
