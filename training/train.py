"""The CAR training loop: F by cross-entropy against a random annotator, then G against D and
L_cal, on random crops, with periodic validation (GED_16), best-version selection and resume.

Reading order: ``train`` (the phases: set up or resume -> steps -> validate and keep the best ->
save the state) -> ``_step`` (one iteration). ``TrainConfig`` (``training.config``) has every knob.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from training import losses
from training.checkpoint import build_discriminator, load_verified, save_model, save_tensors
from training.config import TrainConfig
from training.data import Dataset, open_dataset
from training.evaluate import evaluate
from training.manifest import CheckpointError, Normalisation, version_folders
from training.networks import ArchitectureConfig, CalibrationNet, RefinementNet, soft_one_hot
from training.sampling import Networks, use_device

STATE_DIR = "train-state"


@dataclass
class Progress:
    """Where a run stands; saved in ``train-state/state.json`` and read back on resume."""

    version: str  # the version folder this run writes its best model into
    step: int = 0
    elapsed: float = 0.0  # seconds of training so far, across resumes
    best_ged: float = math.inf
    d_accuracy: float = 0.5  # running mean of D's accuracy, which gates D's updates
    config: dict[str, Any] = field(default_factory=dict)  # the config of the run that wrote it

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class Nets:
    arch: ArchitectureConfig
    calibration: CalibrationNet
    refinement: RefinementNet
    discriminator: torch.nn.Module
    opt_f: torch.optim.Optimizer
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema_f: AveragedModel
    ema_g: AveragedModel


def _build(config: TrainConfig, arch: ArchitectureConfig, device: torch.device) -> Nets:
    calibration = CalibrationNet(arch.calibration).to(device)
    refinement = RefinementNet(arch.refinement).to(device)
    discriminator = build_discriminator(arch).to(device)

    def adam(module: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(module.parameters(), lr=lr, betas=config.betas, weight_decay=config.weight_decay)

    def ema(module: torch.nn.Module) -> AveragedModel:
        return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)

    return Nets(
        arch, calibration, refinement, discriminator,
        adam(calibration, config.lr_f), adam(refinement, config.lr_g), adam(discriminator, config.lr_d),
        ema(calibration), ema(refinement),
    )


class Batches:
    """Random crops of random cases, each with one annotator drawn uniformly, normalised."""

    def __init__(self, dataset: Dataset, size: int | None, batch_size: int, seed: int, normalisation: Normalisation) -> None:
        self.dataset, self.size, self.batch_size = dataset, size, batch_size
        self.rng = np.random.default_rng(seed)
        self.normalisation = normalisation

    def _crop(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.size is None:
            return image, label
        h, w = label.shape
        s = self.size
        if h < s or w < s:
            raise ValueError(f"crop size {s} exceeds image size {h}x{w}")
        # uniform over the whole image: crops that favour the centre never show the nets the
        # borders (a chest wall there was segmented as nodule in such a run)
        y = int(self.rng.integers(0, h - s + 1))
        x = int(self.rng.integers(0, w - s + 1))
        return image[y : y + s, x : x + s], label[y : y + s, x : x + s]

    def next(self) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for index in self.rng.integers(0, len(self.dataset), self.batch_size):
            case = self.dataset[int(index)]
            label = case.labels[self.rng.integers(case.labels.shape[0])]
            image, label = self._crop(case.image, label)
            if self.rng.random() < 0.5:
                image, label = image[:, ::-1], label[:, ::-1]
            images.append(self.normalisation.apply(np.ascontiguousarray(image)))
            labels.append(label.astype(np.int64))
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


def lr_scale(progress: float) -> float:
    """Step decay x0.5 at 60% and again at 85% of the budget: F's calibration settles late."""
    return 1.0 if progress < 0.6 else 0.5 if progress < 0.85 else 0.25


def _step(config: TrainConfig, nets: Nets, image: Tensor, label: Tensor, train_g: bool, d_accuracy: float) -> dict[str, float]:
    num_classes = nets.arch.calibration.num_classes
    logits_f = nets.calibration(image)
    loss_f = losses.calibration_net_loss(logits_f, label)
    nets.opt_f.zero_grad(set_to_none=True)
    loss_f.backward()
    nets.opt_f.step()
    nets.ema_f.update_parameters(nets.calibration)
    log = {"loss_f": loss_f.item()}
    if not train_g:
        return log

    b, n = image.shape[0], config.samples
    p_f = logits_f.detach().softmax(dim=1)  # (B, C, H, W)
    z = torch.randn(b, n, nets.arch.refinement.noise_dim, device=image.device)
    probs = nets.refinement(image, p_f, z).softmax(dim=2)  # (B, n, C, H, W)
    loss_cal = losses.calibration_loss(probs, p_f, config.cal_forward_weight)
    nets.discriminator.requires_grad_(False)
    fake_logits = nets.discriminator(image.repeat_interleave(n, dim=0), probs.flatten(0, 1))
    nets.discriminator.requires_grad_(True)
    loss_adv = losses.generator_adversarial_loss(fake_logits)
    loss_g = config.lambda_adv * loss_adv + config.lambda_cal * loss_cal
    nets.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    nets.opt_g.step()
    nets.ema_g.update_parameters(nets.refinement)

    # D sees one random sample per input, so real and fake are balanced
    pick = probs.detach()[torch.arange(b), torch.randint(n, (b,))]  # (B, C, H, W)
    loss_d, accuracy = losses.discriminator_loss(
        nets.discriminator, image, soft_one_hot(label, num_classes), pick, config.r1_gamma
    )
    if d_accuracy < config.d_accuracy_gate:
        nets.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        nets.opt_d.step()
    log.update(loss_cal=loss_cal.item(), loss_adv=loss_adv.item(), loss_d=loss_d.item(), d_acc=accuracy.item())
    return log


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    state = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in state["state"].items() for k, v in s.items()}
    return tensors, state["param_groups"]


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for group in groups:
        group["betas"] = tuple(group["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def _save_state(folder: Path, nets: Nets, progress: Progress) -> None:
    tensors = {
        "calibration": nets.calibration.state_dict(),
        "refinement": nets.refinement.state_dict(),
        "discriminator": nets.discriminator.state_dict(),
        "ema_f": nets.ema_f.state_dict(),
        "ema_g": nets.ema_g.state_dict(),
    }
    groups = {}
    for name in ("opt_f", "opt_g", "opt_d"):
        tensors[name], groups[name] = _flatten_optimizer(getattr(nets, name))
    tensors = {k: {n: t.detach().cpu().contiguous() for n, t in v.items()} for k, v in tensors.items()}
    hashes = save_tensors(folder, tensors)
    (folder / "state.json").write_text(json.dumps({**asdict(progress), "param_groups": groups, "sha256": hashes}, indent=2) + "\n")


def _load_state(folder: Path, nets: Nets) -> Progress:
    state = json.loads((folder / "state.json").read_text())
    manifest = {"sha256": state["sha256"]}
    for name in ("calibration", "refinement", "discriminator", "ema_f", "ema_g"):
        getattr(nets, name).load_state_dict(load_verified(folder, f"{name}.safetensors", manifest))
    for name in ("opt_f", "opt_g", "opt_d"):
        _restore_optimizer(getattr(nets, name), load_verified(folder, f"{name}.safetensors", manifest), state["param_groups"][name])
    return Progress.from_json(state)


def _manifest(config: TrainConfig, dataset: Dataset, nets: Nets, metrics: dict[str, Any], progress: Progress) -> dict[str, Any]:
    return {
        "name": config.out.name,
        "architecture": {
            "calibration": asdict(nets.arch.calibration),
            "refinement": asdict(nets.arch.refinement),
        },
        "classes": list(dataset.classes),
        "in_channels": dataset.in_channels,
        "input_size": config.size,
        "stride": max(nets.arch.calibration.stride, nets.arch.refinement.stride),
        "normalisation": asdict(Normalisation()),
        "data": dataset.description,
        "metrics": {"validation": metrics},
        "training": {
            "config": config.to_json(),
            "step": progress.step,
            "seconds": round(progress.elapsed, 1),
            "device": config.device,
            "torch": torch.__version__,
        },
    }


@dataclass
class _Run:
    """What the phases of one run share."""

    config: TrainConfig
    device: torch.device
    train_set: Dataset
    val_set: Dataset
    nets: Nets
    progress: Progress
    state_dir: Path

    @property
    def version_dir(self) -> Path:
        return self.config.out / self.progress.version


def _set_up(config: TrainConfig) -> _Run:
    """Data, networks and optimisers; the saved state when ``config.out`` has one (resume), else a
    new version number after the existing ones."""
    torch.manual_seed(config.seed)
    device = use_device(config.device)
    train_set = open_dataset(config.data, "train")
    val_set = open_dataset(config.data, "val", length=config.val_cases)
    if config.architecture:
        arch = ArchitectureConfig.from_dict(config.architecture)
    else:
        arch = ArchitectureConfig.default(train_set.in_channels, len(train_set.classes))
    nets = _build(config, arch, device)
    state_dir = config.out / STATE_DIR
    if (state_dir / "state.json").exists():
        progress = _load_state(state_dir, nets)
        if progress.config.get("data") != config.data:
            raise CheckpointError(f"{state_dir}: was trained on {progress.config.get('data')!r}, not {config.data!r}")
    else:
        existing = version_folders(config.out)
        progress = Progress(version=str(int(existing[-1].name) + 1 if existing else 1))
    progress.config = config.to_json()
    state_dir.mkdir(parents=True, exist_ok=True)
    return _Run(config, device, train_set, val_set, nets, progress, state_dir)


def _validate(run: _Run, log: dict[str, float]) -> None:
    """Score the EMA networks on the validation set, append to the history and keep them as the
    version if they beat the best so far."""
    nets, progress = run.nets, run.progress
    networks = Networks(nets.ema_f.module.eval(), nets.ema_g.module.eval(), Normalisation())
    n = run.config.val_samples
    metrics = evaluate(networks, run.val_set, n_samples=n).summary
    record = {"step": progress.step, "seconds": round(progress.elapsed, 1), **metrics, **log}
    with (run.state_dir / "history.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    tqdm.write(f"step {progress.step} {progress.elapsed:.0f}s val " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    if metrics[f"ged_{n}"] < progress.best_ged:
        progress.best_ged = metrics[f"ged_{n}"]
        save_model(run.version_dir, networks.calibration, networks.refinement, _manifest(run.config, run.train_set, nets, metrics, progress))


def train(config: TrainConfig) -> Path:
    """Train into ``config.out`` (a model folder); resumes from its train-state if present.
    Returns the folder of the best version (by validation GED_16)."""
    run = _set_up(config)
    nets, progress = run.nets, run.progress
    batches = Batches(run.train_set, config.size, config.batch_size, config.seed + progress.step, Normalisation())
    start = time.monotonic() - progress.elapsed
    last_val = time.monotonic()
    bar = tqdm(total=config.steps, initial=progress.step, unit="step", dynamic_ncols=True)

    def budget_used() -> float:
        if config.steps is not None:
            return progress.step / config.steps
        return (time.monotonic() - start) / (60 * config.minutes)  # type: ignore[operator]

    while budget_used() < 1.0:
        scale = lr_scale(budget_used())
        for opt, lr in ((nets.opt_f, config.lr_f), (nets.opt_g, config.lr_g), (nets.opt_d, config.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * scale
        nets.calibration.train()
        nets.refinement.train()
        image, label = (t.to(run.device) for t in batches.next())
        log = _step(config, nets, image, label, budget_used() >= config.f_warmup, progress.d_accuracy)
        if "d_acc" in log:
            progress.d_accuracy = 0.9 * progress.d_accuracy + 0.1 * log["d_acc"]
        progress.step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in log.items()}, refresh=False)
        done = budget_used() >= 1.0
        if done or time.monotonic() - last_val >= config.val_every_s:
            last_val = time.monotonic()
            progress.elapsed = time.monotonic() - start
            if budget_used() >= config.f_warmup or done:
                _validate(run, log)
            _save_state(run.state_dir, nets, progress)
    bar.close()
    if not (run.version_dir / "manifest.json").exists():
        raise CheckpointError(f"training ended before G trained long enough to validate; no version in {config.out}")
    return run.version_dir
