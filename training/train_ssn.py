"""The training loop of the peer method SSN (``training.ssn``), on CAR's terms: the same crops,
budget, learning-rate decay, weight average and validation as ``training.train``, so that the two
compare at equal compute."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from training.checkpoint import save_model
from training.config import TrainConfig
from training.data import Dataset, open_dataset
from training.evaluate import evaluate
from training.manifest import Normalisation, version_folders
from training.sampling import Networks, use_device
from training.ssn import SSNConfig, SSNMean, StochasticSegmentationNet, ssn_loss
from training.train import Batches, lr_scale, validation_gap


def _manifest(config: TrainConfig, dataset: Dataset, ssn_config: SSNConfig, metrics: dict[str, Any], step: int, seconds: float) -> dict[str, Any]:
    return {
        "name": config.out.name,
        "method": "ssn",
        "architecture": {"ssn": asdict(ssn_config)},
        "classes": list(dataset.classes),
        "in_channels": dataset.in_channels,
        "input_size": config.size,
        "stride": ssn_config.stride,
        "normalisation": asdict(Normalisation()),
        "data": dataset.description,
        "metrics": {"validation": metrics},
        "training": {
            "config": config.to_json(),
            "step": step,
            "seconds": round(seconds, 1),
            "device": config.device,
            "torch": torch.__version__,
        },
    }


def _next_version(out: Path) -> Path:
    existing = version_folders(out)
    return out / str(int(existing[-1].name) + 1 if existing else 1)


def _validate(net: StochasticSegmentationNet, val_set: Dataset, n_samples: int, step: int, seconds: float) -> dict[str, Any]:
    """The validation summary of ``net`` (switched to eval mode) through the sampler, as CAR's."""
    net.eval()
    metrics = evaluate(Networks(SSNMean(net), net, Normalisation()), val_set, n_samples=n_samples).summary
    tqdm.write(f"step {step} {seconds:.0f}s val " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


def train_ssn(config: TrainConfig, ssn_config: SSNConfig | None = None) -> Path:
    """Train an SSN on ``config.data`` into a new version of ``config.out``, with CAR's crops, budget,
    learning-rate decay, weight average and validation, so that the two compare on equal terms:
    ``config.lr_f`` and F's Adam settings, as the SSN is one network trained by likelihood like F.
    ``ssn_config`` defaults to the dataset's channels and classes with the default widths. Returns the
    version folder of the best validation GED."""
    torch.manual_seed(config.seed)
    device = use_device(config.device)
    train_set = open_dataset(config.data, "train")
    val_set = open_dataset(config.data, "val", length=config.val_cases)
    ssn_config = ssn_config or SSNConfig(train_set.in_channels, len(train_set.classes))
    if (ssn_config.in_channels, ssn_config.num_classes) != (train_set.in_channels, len(train_set.classes)):
        raise ValueError(f"{ssn_config} does not fit {config.data}: {train_set.in_channels} channels, {len(train_set.classes)} classes")
    net = StochasticSegmentationNet(ssn_config).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr_f, betas=config.betas, weight_decay=config.weight_decay)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    batches = Batches(train_set, config.size, config.batch_size, config.seed, Normalisation())
    version_dir = _next_version(config.out)
    start = last_val = time.monotonic()
    gap = config.val_every_s
    step, best_ged = 0, math.inf

    def budget_used() -> float:
        if config.steps is not None:
            return step / config.steps
        return (time.monotonic() - start) / (60 * config.minutes)  # type: ignore[operator]

    bar = tqdm(total=config.steps, unit="step", dynamic_ncols=True)
    while budget_used() < 1.0:
        for group in opt.param_groups:
            group["lr"] = config.lr_f * lr_scale(budget_used())
        net.train()
        image, label, _ = (t.to(device) for t in batches.next())  # the SSN takes no position
        loss = ssn_loss(*net.distribution(image), label, ssn_config.mc_samples)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(net)
        step += 1
        bar.update(1)
        bar.set_postfix({"loss": f"{loss.item():.4f}"}, refresh=False)
        if budget_used() >= 1.0 or time.monotonic() - last_val >= gap:
            began = time.monotonic()
            metrics = _validate(ema.module, val_set, config.val_samples, step, began - start)
            if metrics[f"ged_{config.val_samples}"] < best_ged:
                best_ged = metrics[f"ged_{config.val_samples}"]
                save_model(version_dir, SSNMean(ema.module), ema.module, _manifest(config, train_set, ssn_config, metrics, step, began - start))
            last_val = time.monotonic()
            gap = validation_gap(config.val_every_s, last_val - began, config.val_share)
    bar.close()
    return version_dir
