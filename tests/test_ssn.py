import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from service.config import Settings
from tests.embedded import EmbeddedServer
from tests.service_fixtures import decode_png, grey, png
from training.checkpoint import load_model, save_model
from training.config import TrainConfig
from training.manifest import CheckpointError, Normalisation
from training.sampling import LABELS, MEAN, OUTPUTS, P_F, SAMPLE_VARIANCE, SUMMARY, Networks, sample
from training.ssn import SSNConfig, SSNMean, StochasticSegmentationNet, ssn_loss
from training.train_ssn import train_ssn

TINY = SSNConfig(1, 3, widths=(8, 16, 16), rank=4, mc_samples=4)


def tiny_ssn(config: SSNConfig = TINY, seed: int = 0) -> StochasticSegmentationNet:
    torch.manual_seed(seed)
    net = StochasticSegmentationNet(config)
    torch.nn.init.normal_(net.factor_head.weight)  # a covariance that visibly moves the labels
    return net.eval()


def write_ssn_model(model_dir: Path, name: str, config: SSNConfig) -> Path:
    net = tiny_ssn(config)
    manifest = {
        "name": name,
        "method": "ssn",
        "architecture": {"ssn": {"in_channels": config.in_channels, "num_classes": config.num_classes, "widths": list(config.widths), "rank": config.rank}},
        "classes": ["background", *[f"class{i}" for i in range(1, config.num_classes)]],
        "in_channels": config.in_channels,
        "normalisation": {"low": -1.0, "high": 1.0},
        "metrics": {"validation": {"ged": 0.5}},
    }
    return save_model(model_dir / name / "1", SSNMean(net), net, manifest)


@pytest.fixture(scope="module")
def nets():
    net = tiny_ssn()
    return Networks(SSNMean(net), net, Normalisation())


def gaussian(b=2, c=2, rank=3, h=8, w=8, seed=0):
    torch.manual_seed(seed)
    mu = (3 * torch.randn(b, c, h, w)).requires_grad_()
    factor = (0.3 * torch.randn(b, rank, c, h, w)).requires_grad_()
    diag = torch.full((b, c, h, w), 0.2, requires_grad=True)
    return mu, factor, diag


def test_loss_is_finite_reaches_every_parameter_and_prefers_the_mean_labels():
    mu, factor, diag = gaussian()
    likely = mu.detach().argmax(dim=1)
    loss = ssn_loss(mu, factor, diag, likely, mc_samples=10)
    loss.backward()
    assert torch.isfinite(loss)
    for param in (mu, factor, diag):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    with torch.no_grad():
        assert loss < ssn_loss(mu, factor, diag, 1 - likely, mc_samples=10)


def test_without_covariance_the_loss_is_the_cross_entropy_of_the_mean():
    mu, factor, diag = gaussian()
    labels = torch.randint(2, mu.shape[:1] + mu.shape[2:])
    with torch.no_grad():
        loss = ssn_loss(mu, torch.zeros_like(factor), torch.zeros_like(diag), labels, mc_samples=4)
        assert torch.allclose(loss, nnf.cross_entropy(mu, labels), atol=1e-3)
    with pytest.raises(ValueError, match="even"):
        ssn_loss(mu, factor, diag, labels, mc_samples=3)


def test_the_mean_slot_holds_no_weights_and_gives_the_mean(nets):
    assert dict(nets.calibration.state_dict()) == {}
    assert nets.calibration.config.stride == 4 and nets.refinement.config.noise_dim == 4
    image = torch.randn(1, 1, 16, 16)
    with torch.inference_mode():
        assert torch.equal(nets.calibration(image), nets.refinement.distribution(image)[0])
    assert nets.device == torch.device("cpu")


def test_all_outputs_of_odd_sizes(nets):
    out = sample(nets, torch.randn(2, 1, 21, 30), ks=[5, 2], seeds=[1, 2], decode_batch=3)
    assert [o[LABELS].shape for o in out] == [(5, 21, 30), (2, 21, 30)]
    for o in out:
        assert set(o) == set(OUTPUTS)
        assert o[P_F].shape == o[MEAN].shape == (3, 21, 30)
        for name in set(OUTPUTS) - {LABELS, P_F, MEAN, SUMMARY}:
            assert o[name].shape == (21, 30)
        assert o[SUMMARY].shape == (4,)


def test_same_seed_same_samples_alone_in_a_batch_and_in_any_chunk(nets):
    torch.manual_seed(1)
    x = torch.randn(3, 1, 16, 16)
    alone = sample(nets, x[1:2], ks=[6], seeds=[42])[0]
    batched = sample(nets, x, ks=[7, 6, 1], seeds=[7, 42, 9], decode_batch=5)[1]
    one_by_one = sample(nets, x[1:2], ks=[6], seeds=[42], decode_batch=1)[0]
    for other in (batched, one_by_one):
        assert torch.equal(alone[LABELS], other[LABELS])
        assert torch.allclose(alone[SAMPLE_VARIANCE], other[SAMPLE_VARIANCE], atol=1e-5)
    labels = alone[LABELS]
    assert (labels[0] != labels[1]).any()  # different z, different samples
    assert not torch.equal(labels, sample(nets, x[1:2], ks=[6], seeds=[43])[0][LABELS])
    assert alone[SAMPLE_VARIANCE].sum() > 0


def test_unknown_method_is_a_checkpoint_error(tmp_path):
    folder = write_ssn_model(tmp_path, "m", TINY)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "method": "phiseg"}))
    with pytest.raises(CheckpointError, match="unknown method 'phiseg'"):
        load_model(folder)


def test_a_few_training_steps_write_a_version_that_loads_and_samples(tmp_path):
    out = tmp_path / "ssn"
    config = TrainConfig(data="synthetic:flips", out=out, steps=3, size=32, batch_size=2, val_every_s=1e9, val_cases=2, val_samples=3)
    version = train_ssn(config, SSNConfig(3, 9, widths=(8, 16), rank=4, mc_samples=4))
    assert version == out / "1"
    model = load_model(out)
    assert model.manifest["method"] == "ssn" and "ged_3" in model.manifest["metrics"]["validation"]
    assert model.manifest["architecture"]["ssn"]["widths"] == [8, 16]
    assert not model.networks.refinement.training
    image = torch.randn(1, 3, 20, 24)
    labels = sample(model.networks, image, ks=[3], seeds=[5], outputs=[LABELS])[0][LABELS]
    assert labels.shape == (3, 20, 24) and int(labels.max()) < 9


def test_the_service_serves_an_ssn(tmp_path):
    write_ssn_model(tmp_path, "ssn", SSNConfig(1, 2, widths=(8, 16, 16), rank=4))
    data = png(grey(24, 40))
    with EmbeddedServer(Settings(model_dir=tmp_path)) as server:
        replies = [
            httpx.post(f"{server.url}/v1/models/ssn/samples", files={"image": ("x", data)}, params={"k": 4, "seed": 1}, timeout=30)
            for _ in range(2)
        ]
    assert all(r.status_code == 200 for r in replies), replies[0].text
    masks = [decode_png(m) for m in replies[0].json()["masks"]]
    assert len(masks) == 4 and all(m.shape == (24, 40) and m.max() <= 1 for m in masks)
    assert replies[0].json()["masks"] == replies[1].json()["masks"]  # the seed reproduces the samples
    assert len({m.tobytes() for m in masks}) > 1 and np.isin(np.stack(masks), [0, 1]).all()
