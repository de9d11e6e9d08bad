"""Uncertainty-drift monitoring, end to end: the summaries' definitions on maps with known answers;
the sampler's summaries, the same whatever the batch or the outputs asked for; the band every
bundled model records; the alert rule under ``promtool test rules``; and a real Prometheus with that
rule scraping the service on the bundled default model: the LIDC sample's crops keep the alert
quiet, the same crops with their intensities flipped set it pending (it fires after 15 minutes of
that, which promtool's test covers)."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

from service.config import Settings
from tests.conftest import require_binary
from tests.embedded import EmbeddedServer, free_port
from tests.service_fixtures import png, write_tiny_model
from training import uncertainty_summary
from training.checkpoint import load_model
from training.data import open_dataset
from training.sampling import LABELS, MUTUAL_INFORMATION, P_F, SUMMARY, foreground, sample, uncertainty_summaries

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = REPO / "docker" / "prometheus"
RULE = "CarsegUncertaintyDrift"


def summaries(p_f: torch.Tensor, labels: torch.Tensor, information: float) -> dict[str, float]:
    out = uncertainty_summaries(p_f, labels, torch.tensor(information))
    return dict(zip(uncertainty_summary.NAMES, out.tolist(), strict=True))


def test_summaries_of_maps_with_known_answers():
    # F unsure (0.5) on the left half, sure of the background on the right; the region is the left half
    p_f = torch.zeros(2, 8, 8)
    p_f[0], p_f[1, :, :4] = 1.0, 0.5
    p_f[0, :, :4] = 0.5
    labels = torch.zeros(4, 8, 8, dtype=torch.uint8)
    labels[:2, :, :4] = 1  # two of four samples mark the left half: 4 of the 6 pairs disagree there
    got = summaries(p_f, labels, information=0.3 * math.log(2))
    assert got == pytest.approx({"aleatoric_entropy": 1.0, "mutual_information": 0.3, "sample_diversity": 4 / 6,
                                 "foreground_fraction": 0.5}, abs=1e-5)
    # two samples: the chance they disagree is 1; too few for the mutual information
    two = summaries(p_f, labels[1:3], information=0.3)
    assert two["sample_diversity"] == pytest.approx(1.0) and math.isnan(two["mutual_information"])
    one = summaries(p_f, labels[:1], information=0.3)
    assert math.isnan(one["sample_diversity"]) and math.isnan(one["mutual_information"])
    # nothing in the image: no region, no doubt
    sure = torch.zeros(2, 8, 8)
    sure[0] = 1.0
    assert summaries(sure, labels, information=0.0) == {name: 0.0 for name in uncertainty_summary.NAMES}


def test_reference_leaves_undefined_values_out():
    values = np.array([[0.1, np.nan, 0.2, 0.01], [0.3, np.nan, 0.4, 0.02], [0.5, np.nan, 0.6, 0.03]])
    band = uncertainty_summary.reference(values, k=2)
    assert (band["k"], band["cases"]) == (2, 3)
    assert set(band["quantiles"]) == {"aleatoric_entropy", "sample_diversity", "foreground_fraction"}
    assert band["quantiles"]["aleatoric_entropy"]["0.5"] == pytest.approx(0.3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root, "tiny")
    return load_model(root / "tiny", torch.device("cpu")).networks


def test_the_samplers_summary_is_the_same_alone_in_a_batch_and_whatever_was_asked(tiny):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 24, 1), dtype=np.uint8) for _ in range(2)]
    alone = sample(tiny, tiny.prepare(images[:1]), [8], [5], (SUMMARY,))[0]
    assert set(alone) == {SUMMARY}  # the maps it needed are not returned
    batched = sample(tiny, tiny.prepare(images), [8, 3], [5, 6], (SUMMARY, LABELS, P_F, MUTUAL_INFORMATION))
    torch.testing.assert_close(alone[SUMMARY], batched[0][SUMMARY], atol=1e-5, rtol=0)
    # the summary's mutual information, from the foreground's soft samples alone, is the foreground's
    # mean of the full map (computed from all the soft samples)
    maps = batched[0]
    region = foreground(maps[P_F])
    torch.testing.assert_close(maps[SUMMARY], uncertainty_summaries(maps[P_F], maps[LABELS], maps[MUTUAL_INFORMATION][region].mean()),
                               atol=1e-5, rtol=1e-5)
    assert math.isnan(batched[1][SUMMARY][1])  # k = 3: no mutual information


def test_every_bundled_model_records_its_band():
    for model in sorted(p for p in (REPO / "models").iterdir() if p.is_dir()):
        latest = max((p for p in model.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        band = json.loads((latest / "manifest.json").read_text())["uncertainty_reference"]
        assert band["k"] == Settings().default_k, f"{latest}: its band was drawn at k={band['k']}, requests at {Settings().default_k}"
        assert set(band["quantiles"]) == set(uncertainty_summary.NAMES)
        for name, quantiles in band["quantiles"].items():
            values = [quantiles[str(q)] for q in uncertainty_summary.QUANTILES]
            assert values == sorted(values) and 0.0 <= values[0] and values[-1] <= 1.0, (latest, name)


def test_the_alert_rule_passes_promtool():
    promtool = require_binary("promtool", "prometheus")
    checked = subprocess.run([promtool, "check", "rules", "rules/uncertainty_drift.yml"], cwd=PROMETHEUS, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "tests/uncertainty_drift_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _lidc_crops() -> list[np.ndarray]:
    crops = []
    for split in ("train", "test"):
        dataset = open_dataset("lidc-sample", split)
        crops += [dataset[i].image[..., 0] for i in range(len(dataset))]
    return crops


def _query(port: int, query: str) -> list[dict]:
    reply = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5).json()
    return reply["data"]["result"]


def _try_query(port: int, query: str) -> list[dict]:
    """``_query``, or nothing while Prometheus is not answering yet."""
    try:
        return _query(port, query)
    except (httpx.HTTPError, KeyError, ValueError):
        return []


def _serve_and_watch(tmp_path: Path, images: list[np.ndarray]) -> tuple[dict[str, float], set[str]]:
    """The bundled models served in-process, a real Prometheus with the repository's rules scraping
    it every second; ``images`` posted at the default k. Returns the live medians of the default
    model's summaries and the summaries whose alert is pending or firing."""
    binary = require_binary("prometheus", "prometheus")
    tmp_path.mkdir(parents=True, exist_ok=True)
    with EmbeddedServer(Settings(model_dir=REPO / "models")) as api:
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS / "rules" / "uncertainty_drift.yml")],
            "scrape_configs": [{"job_name": "carseg", "static_configs": [{"targets": [api.url.removeprefix("http://")]}]}],
        }))
        port = free_port()
        prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # the series exist at zero from start-up: wait until Prometheus has scraped them so, or
            # the images observed before its first scrape would never count towards a rate
            deadline = time.monotonic() + 60
            while not _try_query(port, 'carseg_request_uncertainty_count{model="default",summary="aleatoric_entropy"} == 0'):
                assert time.monotonic() < deadline, "Prometheus never scraped the service"
                time.sleep(0.2)  # polling the first scrape (1 s interval)
            with httpx.Client(timeout=60) as client:
                for seed, image in enumerate(images):
                    reply = client.post(f"{api.url}/v1/models/default/samples", files={"image": ("x.png", png(image))}, params={"seed": seed})
                    assert reply.status_code == 200, reply.text
            medians: dict[str, float] = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                # every image in the rate window (the increase from 0 to all of them), and the rule's median of it
                counted = _try_query(port, f'increase(carseg_request_uncertainty_count{{model="default",summary="aleatoric_entropy"}}[5m]) > {len(images) - 1}')
                rows = _try_query(port, 'carseg:uncertainty_median:rate5m{model="default"}')
                if counted and len(rows) == len(uncertainty_summary.NAMES) and not any(math.isnan(float(r["value"][1])) for r in rows):
                    time.sleep(3)  # a few more rule evaluations over the complete data
                    rows = _try_query(port, 'carseg:uncertainty_median:rate5m{model="default"}')
                    medians = {r["metric"]["summary"]: float(r["value"][1]) for r in rows}
                    break
                time.sleep(0.5)  # the scrape and rule intervals are 1 s; poll, bounded by the deadline
            alerts = {r["metric"]["summary"] for r in _query(port, f'ALERTS{{alertname="{RULE}",model="default"}}')}
        finally:
            prom.terminate()
            prom.wait(10)
    assert medians, "Prometheus never recorded the medians of every summary"
    return medians, alerts


@pytest.mark.slow
def test_a_real_prometheus_stays_quiet_on_ct_and_alerts_on_flipped_intensities(tmp_path):
    band = json.loads(max((REPO / "models" / "default").glob("[0-9]*/manifest.json"), key=lambda p: int(p.parent.name)).read_text())
    quantiles = band["uncertainty_reference"]["quantiles"]
    crops = _lidc_crops()
    ct, ct_alerts = _serve_and_watch(tmp_path / "ct", crops)
    flipped, flipped_alerts = _serve_and_watch(tmp_path / "flipped", [255 - c for c in crops])
    print("\nsummary: validation band (5th..95th) | LIDC median | flipped median")
    for name in uncertainty_summary.NAMES:
        print(f"  {name:<20} {quantiles[name]['0.05']:.3f}..{quantiles[name]['0.95']:.3f} | {ct[name]:.3f} | {flipped[name]:.3f}")
    print(f"alerts: LIDC {sorted(ct_alerts)}, flipped {sorted(flipped_alerts)}")
    for name in uncertainty_summary.NAMES:
        assert quantiles[name]["0.05"] <= ct[name] <= quantiles[name]["0.95"], name
    assert ct_alerts == set()
    assert flipped_alerts, "flipped intensities left every summary inside its band"
    for name in flipped_alerts:  # each alert names a summary whose median really left its band
        assert not quantiles[name]["0.05"] <= flipped[name] <= quantiles[name]["0.95"], name
