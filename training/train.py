"""The CAR training loop: F by cross-entropy against a random annotator, then G against D and
L_cal, on random crops, with periodic validation (GED_16), best-version selection and resume.

Reading order: ``TrainConfig`` -> ``train`` (the loop) -> ``_step`` (one iteration).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from training import losses
from training.checkpoint import (
    CheckpointError,
    LoadedModel,
    build_discriminator,
    load_verified,
    save_model,
    save_tensors,
    version_folders,
)
from training.data import Dataset, open_dataset
from training.evaluate import evaluate
from training.networks import ArchitectureConfig, CalibrationNet, RefinementNet, soft_one_hot
from training.sampling import Normalisation

STATE_DIR = "train-state"


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: Path
    steps: int | None = None
    minutes: float | None = None
    size: int | None = None  # square crop side; None trains on whole images
    batch_size: int = 8
    samples: int = 8  # n samples of G per input for L_cal and L_adv (paper: 5)
    lambda_adv: float = 10.0
    lambda_cal: float = 5.0
    cal_forward_weight: float = 1.0  # weight of KL(p_F || mean G) inside L_cal (ours; 0 = paper)
    lr_f: float = 2e-4
    lr_g: float = 2e-4
    lr_d: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.99)
    weight_decay: float = 5e-4
    r1_gamma: float = 10.0
    d_accuracy_gate: float = 0.85  # D learns only while its accuracy is below this
    # share of the budget F trains alone before G starts: F's calibration is the floor of G's, and
    # an F step costs about an eighth of a G step, so F's head start is cheap
    f_warmup: float = 0.3
    # validation and the saved model use an exponential moving average of F's and G's weights: the
    # raw weights' sample frequencies swung by +-0.05 between validations two minutes apart. A
    # window of ~100 steps: with 0.998, G's average lagged its weights (calibration error 0.18 vs
    # 0.06 live, 30 CPU minutes in), as G takes only ~2000 steps on a 2-core CPU
    ema_decay: float = 0.99
    val_every_s: float = 120.0
    val_cases: int = 96  # 32 left the frequency estimates too noisy to select a version by
    val_samples: int = 16
    seed: int = 0
    device: str = "cpu"
    architecture: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.minutes is None):
            raise ValueError("give exactly one of steps or minutes")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 for L_cal to see a distribution, got {self.samples}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


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


def _lr_scale(progress: float) -> float:
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


def _save_state(folder: Path, nets: Nets, progress: dict[str, Any]) -> None:
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
    (folder / "state.json").write_text(json.dumps({**progress, "param_groups": groups, "sha256": hashes}, indent=2) + "\n")


def _load_state(folder: Path, nets: Nets) -> dict[str, Any]:
    state = json.loads((folder / "state.json").read_text())
    manifest = {"sha256": state["sha256"]}
    for name in ("calibration", "refinement", "discriminator", "ema_f", "ema_g"):
        getattr(nets, name).load_state_dict(load_verified(folder, f"{name}.safetensors", manifest))
    for name in ("opt_f", "opt_g", "opt_d"):
        _restore_optimizer(getattr(nets, name), load_verified(folder, f"{name}.safetensors", manifest), state["param_groups"][name])
    return state


def _manifest(config: TrainConfig, dataset: Dataset, nets: Nets, metrics: dict[str, Any], step: int, elapsed: float) -> dict[str, Any]:
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
            "step": step,
            "seconds": round(elapsed, 1),
            "device": config.device,
            "torch": torch.__version__,
        },
    }


def train(config: TrainConfig) -> Path:
    """Train into ``config.out`` (a model folder); resumes from its train-state if present.
    Returns the folder of the best version (by validation GED_16)."""
    torch.manual_seed(config.seed)
    # weight decay drives G's unused weights towards zero; as denormals they made a CPU step 5x
    # slower within 20 minutes (3.4 s vs 0.7 s measured on the same state)
    torch.set_flush_denormal(True)
    device = torch.device(config.device)
    train_set = open_dataset(config.data, "train")
    val_set = open_dataset(config.data, "val", length=config.val_cases)
    if config.architecture:
        arch = ArchitectureConfig.from_dict(config.architecture)
    else:
        arch = ArchitectureConfig.default(train_set.in_channels, len(train_set.classes))
    nets = _build(config, arch, device)
    state_dir = config.out / STATE_DIR
    progress: dict[str, Any] = {"step": 0, "elapsed": 0.0, "best_ged": math.inf, "d_accuracy": 0.5}
    if (state_dir / "state.json").exists():
        progress = _load_state(state_dir, nets)
        if progress.get("config", {}).get("data") != config.data:
            raise CheckpointError(f"{state_dir}: was trained on {progress.get('config', {}).get('data')!r}, not {config.data!r}")
    else:
        existing = version_folders(config.out)
        progress["version"] = str(int(existing[-1].name) + 1 if existing else 1)
    progress["config"] = config.to_json()
    version_dir = config.out / progress["version"]
    batches = Batches(train_set, config.size, config.batch_size, config.seed + progress["step"], Normalisation())
    history = state_dir / "history.jsonl"
    state_dir.mkdir(parents=True, exist_ok=True)

    start = time.monotonic() - progress["elapsed"]
    last_val = time.monotonic()
    step = progress["step"]
    bar = tqdm(total=config.steps, initial=step, unit="step", dynamic_ncols=True)

    def budget_used() -> float:
        if config.steps is not None:
            return step / config.steps
        return (time.monotonic() - start) / (60 * config.minutes)  # type: ignore[operator]

    while budget_used() < 1.0:
        scale = _lr_scale(budget_used())
        for opt, lr in ((nets.opt_f, config.lr_f), (nets.opt_g, config.lr_g), (nets.opt_d, config.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * scale
        nets.calibration.train()
        nets.refinement.train()
        image, label = (t.to(device) for t in batches.next())
        log = _step(config, nets, image, label, budget_used() >= config.f_warmup, progress["d_accuracy"])
        if "d_acc" in log:
            progress["d_accuracy"] = 0.9 * progress["d_accuracy"] + 0.1 * log["d_acc"]
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in log.items()}, refresh=False)
        done = budget_used() >= 1.0
        if done or time.monotonic() - last_val >= config.val_every_s:
            last_val = time.monotonic()
            progress.update(step=step, elapsed=time.monotonic() - start)
            if budget_used() >= config.f_warmup or done:
                calibration, refinement = nets.ema_f.module.eval(), nets.ema_g.module.eval()
                model = LoadedModel(config.out.name, progress["version"], version_dir, {}, calibration, refinement)
                metrics = evaluate(model, val_set, n_samples=config.val_samples, device=device).summary
                record = {"step": step, "seconds": round(progress["elapsed"], 1), **metrics, **log}
                with history.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                tqdm.write(f"step {step} {progress['elapsed']:.0f}s val " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
                if metrics["ged"] < progress["best_ged"]:
                    progress["best_ged"] = metrics["ged"]
                    save_model(version_dir, calibration, refinement, _manifest(config, train_set, nets, metrics, step, progress["elapsed"]))
            _save_state(state_dir, nets, progress)
    bar.close()
    if not (version_dir / "manifest.json").exists():
        raise CheckpointError(f"training ended before G trained long enough to validate; no version in {config.out}")
    return version_dir
