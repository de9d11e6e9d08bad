import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.service_fixtures import write_tiny_model
from training.checkpoint import load_model
from training.config import TrainConfig
from training.data import Case, open_dataset
from training.data.synthetic import FLIP_CLASSES
from training.evaluate import evaluate
from training.manifest import CheckpointError, Normalisation
from training.networks import ArchitectureConfig
from training.train import STATE_DIR, Batches, _build, _discriminator_loss, _set_up, _step, train, use_amp, validation_gap

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
    # the validation set's uncertainty band, at the validation's k, for drift monitoring
    band = manifest["uncertainty_reference"]
    assert (band["k"], band["cases"]) == (3, 2) and set(band["quantiles"]) == {"aleatoric_entropy", "sample_diversity", "foreground_fraction"}
    history = [json.loads(line) for line in (out / STATE_DIR / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 4
    result = evaluate(model.networks, open_dataset("synthetic:flips", "test", length=2), n_samples=3)
    for key in ("ged_3", "hm_iou_3", "diversity_3", "ece", "oracle_ged_3", "calibration_error", "event_calibration_error", "coherence"):
        assert np.isfinite(result.summary[key]), key


def test_validations_take_at_most_their_share_of_the_run():
    # fast validations keep the configured interval
    assert validation_gap(120.0, 5.0, 0.2) == 120.0
    # a 60 s validation at a share of 0.2 waits 240 s of training: 60 of every 300 s
    assert validation_gap(120.0, 60.0, 0.2) == pytest.approx(240.0)
    assert 60.0 / (60.0 + validation_gap(120.0, 60.0, 0.2)) == pytest.approx(0.2)
    assert validation_gap(120.0, 60.0, 1.0) == 120.0
    with pytest.raises(ValueError, match="val_share"):
        replace(_config(Path("x"), 1), val_share=0.0)


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


def test_a_mixture_trains_one_model_on_its_parts_and_validates_on_all_of_them(tmp_path):
    from training.data.folder import write_case, write_classes

    folder = tmp_path / "mine"  # a user's own folder beside a synthetic set
    write_classes(folder, FLIP_CLASSES)
    for split in ("train", "val"):
        for index in range(2):
            write_case(folder / split, open_dataset("synthetic:flips", "test")[index])
    out = tmp_path / "mixed"
    train(replace(_config(out, 3), data=f"synthetic:flips@3+{folder}"))
    manifest = load_model(out).manifest
    assert [(p["source"], p["share"]) for p in manifest["data"]["parts"]] == [("synthetic:flips", 0.75), ("folder:mine", 0.25)]
    assert manifest["metrics"]["validation"]["cases"] == 2 + 2  # val_cases caps the synthetic part only
    assert manifest["uncertainty_reference"]["cases"] == 4
    # the oracle is known for the synthetic cases only, so a ratio of GED to it would mix case sets
    assert "oracle_ged_3" in manifest["metrics"]["validation"] and "ged_ratio_3" not in manifest["metrics"]["validation"]


def test_resume_refuses_other_data(tmp_path):
    out = tmp_path / "tiny"
    train(_config(out, 2))
    from dataclasses import replace

    from training.manifest import CheckpointError

    with pytest.raises(CheckpointError, match="was trained on"):
        train(replace(_config(out, 3), data="synthetic:halo"))


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_amp_is_on_by_default_on_cuda_only_and_refused_on_a_cpu():
    assert use_amp(None, torch.device("cuda")) and not use_amp(None, torch.device("cpu"))
    assert not use_amp(False, torch.device("cuda", 0))
    with pytest.raises(ValueError, match="70x slower"):
        use_amp(True, torch.device("cpu"))


def test_a_bf16_autocast_step_trains_every_net_with_float32_losses_and_r1(tmp_path):
    # CUDA's AMP path, run on the CPU, where bf16 autocast works, only slowly
    torch.manual_seed(0)
    config = _config(tmp_path / "unused", 1)
    nets = _build(config, ArchitectureConfig.from_dict(TINY), torch.device("cpu"))
    before = {name: _weights(getattr(nets, name)) for name in ("calibration", "refinement", "discriminator")}
    image, label = torch.randn(2, 3, 32, 32), torch.randint(9, (2, 32, 32))
    log = _step(config, nets, image, label, train_g=True, d_accuracy=0.5, amp=True)
    assert set(log) == {"loss_f", "loss_cal", "loss_adv", "loss_d", "d_acc"} and all(np.isfinite(v) for v in log.values())
    for name, weights in before.items():
        net = getattr(nets, name)
        assert not _same(weights, _weights(net)), f"{name} did not train"
        assert all(p.dtype == torch.float32 for p in net.parameters())
    # D's loss, R1 included, is the float32 one even when its caller runs under autocast
    real, fake = torch.nn.functional.one_hot(label, 9).permute(0, 3, 1, 2).float(), torch.rand(2, 9, 32, 32).softmax(1)
    plain, _ = _discriminator_loss(config, nets, image, real, fake, update=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = _discriminator_loss(config, nets, image, real, fake, update=False)
    assert under_autocast.dtype == torch.float32 and torch.equal(plain, under_autocast)


def test_a_state_that_did_not_record_its_architecture_resumes_only_with_one_given(tmp_path):
    out = tmp_path / "tiny"
    train(_config(out, 2))
    state_path = out / STATE_DIR / "state.json"
    state = json.loads(state_path.read_text())
    del state["architecture"]  # as train-states were written before they recorded it
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="cannot resume"):
        train(replace(_config(out, 3), architecture=None))
    train(_config(out, 3))  # built from the configured architecture, as that state was


def test_without_l_adv_d_is_neither_run_nor_trained_and_g_still_is():
    torch.manual_seed(0)
    config = replace(_config(Path("unused"), 1), lambda_adv=0.0)
    nets = _build(config, ArchitectureConfig.from_dict(TINY), torch.device("cpu"))
    torch.nn.init.normal_(nets.refinement.head.weight)  # off the prior-skip start, where L_cal has no gradient
    d_before, g_before = _weights(nets.discriminator), _weights(nets.refinement)
    image, label = torch.randn(2, 3, 32, 32), torch.randint(9, (2, 32, 32))
    log = _step(config, nets, image, label, train_g=True, d_accuracy=0.5)
    assert set(log) == {"loss_f", "loss_cal"}
    assert _same(d_before, _weights(nets.discriminator))
    assert not _same(g_before, _weights(nets.refinement))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny CAR model (folder ``base``) trained for two steps on synthetic:flips."""
    out = tmp_path_factory.mktemp("init") / "base"
    train(_config(out, 2))
    return out


def test_fine_tuning_starts_f_g_and_their_averages_from_the_init_model(tmp_path, base_model):
    init = load_model(base_model)
    run = _set_up(replace(_config(tmp_path / "ft", 2), init=base_model, architecture=None), torch.device("cpu"))
    model = ArchitectureConfig.from_dict(init.manifest["architecture"])
    assert (run.nets.arch.calibration, run.nets.arch.refinement) == (model.calibration, model.refinement)
    for net, average, start in (
        (run.nets.calibration, run.nets.ema_f.module, init.networks.calibration),
        (run.nets.refinement, run.nets.ema_g.module, init.networks.refinement),
    ):
        assert _same(_weights(net), _weights(start)) and _same(_weights(average), _weights(start))
    torch.manual_seed(0)  # what a fresh run would start from
    fresh = _build(run.config, run.nets.arch, torch.device("cpu"))
    assert not _same(_weights(fresh.calibration), _weights(init.networks.calibration))
    path = str((base_model / "1").resolve())
    assert run.progress.init == {"name": "base", "version": "1", "path": path, "sha256": init.manifest["sha256"]}


def test_a_fine_tune_records_its_init_and_resumes_only_from_the_same_one(tmp_path, base_model, capsys):
    config = replace(_config(tmp_path / "ft", 2), init=base_model)
    version = train(config)
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["architecture"] == json.loads((base_model / "1" / "manifest.json").read_text())["architecture"]
    init = manifest["training"]["init"]
    assert (init["name"], init["version"], init["path"]) == ("base", "1", str((base_model / "1").resolve()))

    capsys.readouterr()
    train(replace(config, steps=3))  # the same init: resumes, the init is not loaded again
    assert "resumes from its train-state" in capsys.readouterr().out
    state = json.loads((config.out / STATE_DIR / "state.json").read_text())
    assert state["step"] == 3 and state["init"] == init

    other = tmp_path / "other"
    shutil.copytree(base_model / "1", other / "1")
    with pytest.raises(CheckpointError, match=r"began from .*base/1, not from --init"):
        train(replace(config, steps=4, init=other))
    with pytest.raises(CheckpointError, match="began from scratch"):
        train(replace(_config(base_model, 4), init=other))


def test_fine_tuning_refuses_a_model_for_other_classes(tmp_path):
    write_tiny_model(tmp_path, "lidc", channels=1, classes=2)
    with pytest.raises(CheckpointError, match=r"classes \['background', 'nodule'\] on 1 channels, but synthetic:flips has"):
        train(replace(_config(tmp_path / "ft", 2), init=tmp_path / "lidc"))
    assert not (tmp_path / "ft" / "1").exists()


def test_lidc_sample_selects_versions_on_its_training_crops_never_its_test_crops(lidc_root):
    def ids(split):
        dataset = open_dataset("lidc-sample", split)
        return {dataset[i].case_id for i in range(len(dataset))}

    val, train_ids, test = ids("val"), ids("train"), ids("test")
    assert len(val) == 19 and val == train_ids and not val & test


class _Frames:
    """One case of (20, 30) pixels whose channels say where each pixel is: its row, and ten times its
    column's distance from the vertical centre line (which a mirror keeps); top half marked."""

    classes = ("background", "top")
    in_channels = 2

    def __len__(self):
        return 1

    def __getitem__(self, index):
        rows, cols = np.mgrid[0:20, 0:30]
        image = np.stack([rows, 10 * np.abs(cols - 14.5)], axis=-1).astype(np.uint8)
        return Case("frames", image, (rows < 10).astype(np.uint8)[None])


def test_each_crops_window_places_it_and_its_mirror_in_the_whole_image():
    from training.networks import position_channels

    batches = Batches(_Frames(), 8, 64, seed=0, normalisation=Normalisation())
    image, _, window = batches.next()
    assert window[:, 2:].tolist() == [[20.0, 30.0]] * 64
    where = position_channels(window, 8, 8)
    # the pixel each crop shows, read back from the window: row, and the distance from the centre line
    rows = (where[:, 0] + 1) * 20 / 2 - 0.5
    distance = where[:, 1].abs() * 30 / 2
    norm = Normalisation()
    shown = (image - norm.low) / (norm.high - norm.low) * 255
    assert torch.allclose(shown[:, 0], rows, atol=1e-3) and torch.allclose(shown[:, 1], 10 * distance, atol=1e-3)
    mirrored = window[:, 1] != torch.tensor([0.0])  # both happen: crops at many places, some mirrored
    assert 0 < int(mirrored.sum()) < 64 and len(set(window[:, 0].tolist())) > 5
    whole = Batches(_Frames(), None, 2, seed=0, normalisation=Normalisation()).next()[2]
    assert whole.tolist() == [[0.0, 0.0, 20.0, 30.0]] * 2


@pytest.mark.parametrize("position", [True, False])
def test_position_is_what_lets_f_learn_a_label_that_only_position_tells(position):
    """Crops of an image with nothing in it, marked on its top half: only an F that sees where its
    crop lies can learn it (horizontal mirrors keep rows); without position it cannot beat chance."""
    from training import losses
    from training.networks import CalibrationConfig, CalibrationNet

    class Blank(_Frames):
        def __getitem__(self, index):
            case = super().__getitem__(index)
            return Case("blank", np.zeros_like(case.image), case.labels)

    torch.manual_seed(0)
    f = CalibrationNet(CalibrationConfig(2, 2, widths=(8, 16), position=position))
    opt = torch.optim.Adam(f.parameters(), lr=1e-2)
    batches = Batches(Blank(), 8, 16, seed=0, normalisation=Normalisation())
    for _ in range(150):
        image, label, window = batches.next()
        loss = losses.calibration_net_loss(f(image, window), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    f.eval()
    case = Blank()[0]
    with torch.no_grad():
        marked = f(torch.from_numpy(Normalisation().apply(case.image))[None]).argmax(1)[0].numpy()
    accuracy = float((marked == case.labels[0]).mean())
    # without position, the whole image's zero-padded border is all it has to go on (0.70 measured)
    assert accuracy > 0.95 if position else accuracy < 0.8


def test_position_for_a_fine_tune_needs_an_init_that_takes_it(tmp_path, base_model):
    with pytest.raises(CheckpointError, match="its F takes no position"):
        train(replace(_config(tmp_path / "ft", 2), init=base_model, architecture=None, position=True))
    assert not (tmp_path / "ft" / "1").exists()
