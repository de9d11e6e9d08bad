"""The CAR training loop: F by cross-entropy against a random annotator, then G against D and
L_cal, on random crops, with periodic validation (GED_16), best-version selection and resume.

Reading order: ``train`` (the phases: set up or resume -> steps -> validate and keep the best ->
save the state) -> ``_step`` (one iteration). ``TrainConfig`` (``training.config``) has every knob.

Under torchrun the same code runs in every process (``training.distributed``): each rank draws its
own batches, so the global batch is ranks x ``batch_size``; F, G and D are wrapped in
DistributedDataParallel; rank 0 decides when to validate and stop, and alone validates and writes.

``init`` (``--init``) fine-tunes: F and G, and their moving averages, start from a trained model's
weights, with its architecture; D and the optimisers start fresh. An ``out`` that already has a
train-state resumes from it instead: the same ``init`` is then ignored with a notice, another one is
refused, since the state's weights did not come from it.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from training import distributed, losses, noise_field
from training.checkpoint import LoadedModel, build_discriminator, load_model, load_verified, save_model, save_tensors
from training.config import TrainConfig
from training.data import Dataset, draw_indices, open_dataset
from training.evaluate import evaluate
from training.manifest import CheckpointError, ModelEntry, Normalisation, read_entry, version_folders
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
    # the nets' architecture, which a resumed run rebuilds (a fine-tune's is its init model's)
    architecture: dict[str, Any] | None = None
    init: dict[str, Any] | None = None  # the model a fine-tune started from (``_init_record``)

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
    # what the step runs forward and backward: under torchrun, F, G and D in DistributedDataParallel
    # (``parallel``), else the nets themselves; states are saved from, and loaded into, the nets
    train_f: torch.nn.Module = field(init=False)
    train_g: torch.nn.Module = field(init=False)
    train_d: torch.nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.train_f, self.train_g, self.train_d = self.calibration, self.refinement, self.discriminator

    def parallel(self, device: torch.device) -> None:
        """Wrap F, G and D for data-parallel training, once their weights are final (DDP copies
        rank 0's to the others here); a no-op outside a process group."""
        self.train_f = distributed.wrap(self.calibration, device)
        self.train_g = distributed.wrap(self.refinement, device)
        self.train_d = distributed.wrap(self.discriminator, device)

    def in_sync(self) -> dict[str, torch.nn.Module]:
        """What must be equal on every rank."""
        return {"calibration": self.calibration, "refinement": self.refinement, "discriminator": self.discriminator, "ema_f": self.ema_f, "ema_g": self.ema_g}


def _build(config: TrainConfig, arch: ArchitectureConfig, device: torch.device, start: Networks | None = None) -> Nets:
    """Fresh nets and optimisers; F and G (and so their moving averages) from ``start``'s weights when given."""
    calibration = CalibrationNet(arch.calibration).to(device)
    refinement = RefinementNet(arch.refinement).to(device)
    if start is not None:
        calibration.load_state_dict(start.calibration.state_dict())
        refinement.load_state_dict(start.refinement.state_dict())
    discriminator = build_discriminator(arch).to(device)

    def adam(module: torch.nn.Module, lr: float, weight_decay: float = config.weight_decay) -> torch.optim.Optimizer:
        return torch.optim.Adam(module.parameters(), lr=lr, betas=config.betas, weight_decay=weight_decay)

    def ema(module: torch.nn.Module) -> AveragedModel:
        return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)

    return Nets(
        arch, calibration, refinement, discriminator,
        adam(calibration, config.lr_f), adam(refinement, config.lr_g), adam(discriminator, config.lr_d, weight_decay=0.0),
        ema(calibration), ema(refinement),
    )


class Batches:
    """Random crops of random cases (a mixture's by its parts' shares), each with one annotator drawn uniformly, normalised, with each
    crop's window in its whole (flipped) image, as ``networks.position_channels`` takes it."""

    def __init__(self, dataset: Dataset, size: int | None, batch_size: int, seed: int, normalisation: Normalisation) -> None:
        self.dataset, self.size, self.batch_size = dataset, size, batch_size
        self.rng = np.random.default_rng(seed)
        self.normalisation = normalisation

    def _crop(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        h, w = label.shape
        if self.size is None:
            return image, label, (0, 0)
        s = self.size
        if h < s or w < s:
            raise ValueError(f"crop size {s} exceeds image size {h}x{w}")
        # uniform over the whole image: crops that favour the centre never show the nets the
        # borders (a chest wall there was segmented as nodule in such a run)
        y = int(self.rng.integers(0, h - s + 1))
        x = int(self.rng.integers(0, w - s + 1))
        return image[y : y + s, x : x + s], label[y : y + s, x : x + s], (y, x)

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        """(images (B, C, S, S), labels (B, S, S), windows (B, 4): top, left, whole height, width)."""
        images, labels, windows = [], [], []
        for index in draw_indices(self.dataset, self.rng, self.batch_size):
            case = self.dataset[index]
            label = case.labels[self.rng.integers(case.labels.shape[0])]
            h, w = label.shape
            image, label, (top, left) = self._crop(case.image, label)
            if self.rng.random() < 0.5:
                # the crop of the mirrored whole image, whose left edge is the crop's right one
                image, label, left = image[:, ::-1], label[:, ::-1], w - left - label.shape[1]
            images.append(self.normalisation.apply(np.ascontiguousarray(image)))
            labels.append(label.astype(np.int64))
            windows.append((top, left, h, w))
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)), torch.tensor(windows, dtype=torch.float32)


def validation_gap(every_s: float, last_cost_s: float, share: float) -> float:
    """Seconds of training before the next validation: at least ``every_s``, and enough that
    validations, each taking about as long as the last (``last_cost_s``), take at most ``share`` of
    the run's time."""
    return max(every_s, last_cost_s * (1.0 - share) / share)


def lr_scale(progress: float) -> float:
    """Step decay x0.5 at 60% and again at 85% of the budget: F's calibration settles late."""
    return 1.0 if progress < 0.6 else 0.5 if progress < 0.85 else 0.25


def use_amp(amp: bool | None, device: torch.device) -> bool:
    """Whether the nets' forward passes run under bfloat16 autocast: ``amp``, by default on CUDA
    only. Refused on a CPU, where bf16 autocast made these U-Nets ~70x slower. bfloat16 has
    float32's exponent range, so no gradient scaling is needed."""
    enabled = device.type == "cuda" if amp is None else amp
    if enabled and device.type != "cuda":
        raise ValueError(f"bfloat16 autocast on {device.type} made these U-Nets ~70x slower; AMP is for CUDA")
    return enabled


def _autocast(device: torch.device, amp: bool) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def _discriminator_loss(config: TrainConfig, nets: Nets, image: Tensor, real_mask: Tensor, fake_mask: Tensor, update: bool) -> tuple[Tensor, Tensor]:
    """D's loss and accuracy, in float32 even under autocast: R1 is the squared gradient of D's
    score with respect to its input, which bfloat16's 8 significant bits would blur, and D's step
    runs 2B images against G's nB samples, so float32 costs little.

    Through D's DDP wrapper only when D updates, as DDP expects a backward after each forward. DDP
    averages R1's double-backward gradients correctly (on gloo they equal the mean of the ranks'
    own: tests/test_distributed.py), so D needs no explicit all_reduce as in StyleGAN2-ADA."""
    disc = nets.train_d if update else nets.discriminator
    with torch.autocast(image.device.type, enabled=False):
        return losses.discriminator_loss(disc, image, real_mask, fake_mask, config.r1_gamma)


def _step(
    config: TrainConfig, nets: Nets, image: Tensor, label: Tensor, train_g: bool, d_accuracy: float, amp: bool = False,
    window: Tensor | None = None,
) -> dict[str, float]:
    """One iteration: F; then, after F's head start (``train_g``), G and D. With ``amp`` the nets'
    forward passes run under bfloat16 autocast, the losses in float32. Under torchrun, the
    gradients are averaged over the ranks, and so are BatchNorm's statistics before the moving
    averages take them, so every rank keeps the same weights."""
    num_classes = nets.arch.calibration.num_classes
    with _autocast(image.device, amp):
        logits_f = nets.train_f(image, window)
    loss_f = losses.calibration_net_loss(logits_f.float(), label)
    nets.opt_f.zero_grad(set_to_none=True)
    loss_f.backward()
    nets.opt_f.step()
    distributed.average_buffers(nets.calibration)
    nets.ema_f.update_parameters(nets.calibration)
    log = {"loss_f": loss_f.item()}
    if not train_g:
        return log

    b, n = image.shape[0], config.samples
    p_f = logits_f.detach().float().softmax(dim=1)  # (B, C, H, W)
    g_config = nets.arch.refinement
    if g_config.noise == "regions":
        labels, counts = noise_field.doubt_regions(p_f, g_config.doubt_threshold, g_config.region_grow)
        z = noise_field.training_noise(labels, counts, n, g_config.noise_dim)  # (B, n, D, H, W)
    else:
        z = torch.randn(b, n, g_config.noise_dim, device=image.device)
    with _autocast(image.device, amp):
        logits_g = nets.train_g(image, p_f, z)  # (B, n, C, H, W)
    probs = logits_g.float().softmax(dim=2)
    loss_cal = losses.calibration_loss(logits_g, p_f, config.cal_forward_weight)
    log = {**log, "loss_cal": loss_cal.item()}
    loss_g = config.lambda_cal * loss_cal
    adversarial = config.lambda_adv > 0  # lambda_adv 0 is the ablation without D: D is not run at all
    if adversarial:
        # the bare D, frozen: this pass carries G's gradient only, and through D's DDP wrapper it
        # would leave DDP waiting for a backward into D's weights
        nets.discriminator.requires_grad_(False)
        with _autocast(image.device, amp):
            fake_logits = nets.discriminator(image.repeat_interleave(n, dim=0), probs.flatten(0, 1))
        nets.discriminator.requires_grad_(True)
        loss_adv = losses.generator_adversarial_loss(fake_logits.float())
        loss_g = loss_g + config.lambda_adv * loss_adv
        log["loss_adv"] = loss_adv.item()
    nets.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    nets.opt_g.step()
    distributed.average_buffers(nets.refinement)
    nets.ema_g.update_parameters(nets.refinement)
    if not adversarial:
        return log

    # D sees one random sample per input, so real and fake are balanced
    pick = probs.detach()[torch.arange(b), torch.randint(n, (b,))]  # (B, C, H, W)
    update_d = d_accuracy < config.d_accuracy_gate  # the same on every rank: d_accuracy is their mean
    loss_d, accuracy = _discriminator_loss(config, nets, image, soft_one_hot(label, num_classes), pick, update_d)
    if update_d:
        nets.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        nets.opt_d.step()
    log.update(loss_d=loss_d.item(), d_acc=distributed.mean(accuracy).item())
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


def _read_state(folder: Path) -> dict[str, Any] | None:
    """``state.json`` of a train-state folder; None where there is none (a fresh run)."""
    path = folder / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def _load_state(folder: Path, nets: Nets, state: dict[str, Any]) -> None:
    """Load the weights and optimisers of ``state`` (``_read_state``) into ``nets``."""
    manifest = {"sha256": state["sha256"]}
    for name in ("calibration", "refinement", "discriminator", "ema_f", "ema_g"):
        getattr(nets, name).load_state_dict(load_verified(folder, f"{name}.safetensors", manifest))
    for name in ("opt_f", "opt_g", "opt_d"):
        _restore_optimizer(getattr(nets, name), load_verified(folder, f"{name}.safetensors", manifest), state["param_groups"][name])


def _manifest(run: _Run, metrics: dict[str, Any], uncertainty: dict[str, Any]) -> dict[str, Any]:
    config, dataset, nets, progress = run.config, run.train_set, run.nets, run.progress
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
        # the validation set's uncertainty summaries: the band drift monitoring holds the live median to
        "uncertainty_reference": uncertainty,
        "training": {
            "config": config.to_json(),
            "step": progress.step,
            "seconds": round(progress.elapsed, 1),
            "device": config.device,
            "amp": run.amp,
            "world_size": distributed.world_size(),  # processes; the global batch is this x batch_size
            "init": progress.init,
            "torch": torch.__version__,
        },
    }


@dataclass
class _Run:
    """What the phases of one run share."""

    config: TrainConfig
    device: torch.device
    amp: bool
    train_set: Dataset
    val_set: Dataset
    nets: Nets
    progress: Progress
    state_dir: Path

    @property
    def version_dir(self) -> Path:
        return self.config.out / self.progress.version


def _init_record(entry: ModelEntry) -> dict[str, Any]:
    """What names a fine-tune's init model in the train-state and the manifests."""
    return {"name": entry.name, "version": entry.version, "path": str(entry.path.resolve()), "sha256": entry.manifest["sha256"]}


def _architecture(config: TrainConfig, dataset: Dataset, init: LoadedModel | None) -> ArchitectureConfig:
    """The nets' architecture: the init model's F and G when fine-tuning (with ``config``'s D, else
    the default D), else ``config.architecture``, else the default for the data."""
    given = ArchitectureConfig.from_dict(config.architecture) if config.architecture else None
    classes, channels = list(dataset.classes), dataset.in_channels
    if init is None:
        arch = given or ArchitectureConfig.default(channels, len(classes))
        return replace(arch, calibration=replace(arch.calibration, position=True)) if config.position else arch
    method = init.manifest.get("method", "car")
    if method != "car":
        raise CheckpointError(f"--init {init.path}: a {method} model; fine-tuning starts from a CAR model's F and G")
    if (init.classes, init.in_channels) != (classes, channels):
        raise CheckpointError(
            f"--init {init.path}: classes {init.classes} on {init.in_channels} channels, but {config.data} has {classes} on {channels}"
        )
    if init.normalisation != Normalisation():
        raise CheckpointError(f"--init {init.path}: normalisation {init.normalisation}, but training normalises as {Normalisation()}")
    try:
        model = ArchitectureConfig.from_dict(init.manifest["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"--init {init.path}: bad architecture ({exc})") from exc
    if config.position and not model.calibration.position:
        raise CheckpointError(f"--init {init.path}: its F takes no position; train with position from scratch")
    if given is not None and (given.calibration, given.refinement) != (model.calibration, model.refinement):
        raise CheckpointError(f"--init {init.path}: its F and G differ from the configured architecture's")
    disc = given.discriminator if given is not None and given.discriminator else ArchitectureConfig.default(channels, len(classes)).discriminator
    return ArchitectureConfig(model.calibration, model.refinement, disc)


def _check_resume_init(config: TrainConfig, state_dir: Path, progress: Progress) -> None:
    """``--init`` on an ``out`` that resumes: the state's weights already came from an init, so the
    same init is ignored with a notice, and another (or one for a run that began from scratch) is
    refused rather than silently not applied."""
    if config.init is None:
        return
    asked = _init_record(read_entry(config.init))
    if asked != progress.init:
        began = f"from {progress.init['path']}" if progress.init else "from scratch"
        raise CheckpointError(f"{state_dir}: resumes a run that began {began}, not from --init {config.init}; fine-tune into another --out")
    if distributed.is_main():
        tqdm.write(f"{config.out} resumes from its train-state, which began from {config.init}: the init weights are not loaded again")


def _set_up(config: TrainConfig, device: torch.device) -> _Run:
    """Data, networks and optimisers: the saved state when ``config.out`` has one (resume), else
    from scratch or ``config.init``'s F and G, as a new version after the existing ones. Every rank
    builds the same weights; each then draws its own noise."""
    amp = use_amp(config.amp, device)
    torch.manual_seed(config.seed)
    train_set = open_dataset(config.data, "train")
    val_set = open_dataset(config.data, "val", length=config.val_cases)
    state_dir = config.out / STATE_DIR
    state = _read_state(state_dir)
    if state is not None:
        progress = Progress.from_json(state)
        if progress.config.get("data") != config.data:
            raise CheckpointError(f"{state_dir}: was trained on {progress.config.get('data')!r}, not {config.data!r}")
        _check_resume_init(config, state_dir, progress)
        if not progress.architecture and not config.architecture:
            # such a state was built from the defaults of its day, and those changed (D's head, G's noise)
            raise CheckpointError(
                f"{state_dir}: written before train-states recorded their architecture, by a version whose default "
                "D and G differ from today's; it cannot resume: train into a new --out"
            )
        # states written before the architecture was recorded were built from the config's
        arch = ArchitectureConfig.from_dict(progress.architecture) if progress.architecture else _architecture(config, train_set, None)
        given = ArchitectureConfig.from_dict(config.architecture) if config.architecture else None
        if given is not None and replace(given, discriminator=given.discriminator or arch.discriminator) != arch:
            raise CheckpointError(f"{state_dir}: was trained with another architecture than the configured one")
        nets = _build(config, arch, device)
        _load_state(state_dir, nets, state)
    else:
        init = load_model(config.init, device) if config.init is not None else None
        arch = _architecture(config, train_set, init)
        nets = _build(config, arch, device, init.networks if init else None)
        existing = version_folders(config.out)
        progress = Progress(version=str(int(existing[-1].name) + 1 if existing else 1), init=_init_record(init) if init else None)
    progress.config = config.to_json()
    progress.architecture = arch.to_dict()
    nets.parallel(device)
    # each rank its own noise, dropout and D's picks; the weights above were built alike
    torch.manual_seed(config.seed + distributed.rank())
    state_dir.mkdir(parents=True, exist_ok=True)
    return _Run(config, device, amp, train_set, val_set, nets, progress, state_dir)


def _validate(run: _Run, log: dict[str, float]) -> None:
    """Score the EMA networks on the validation set, append to the history and keep them as the
    version if they beat the best so far."""
    nets, progress = run.nets, run.progress
    networks = Networks(nets.ema_f.module.eval(), nets.ema_g.module.eval(), Normalisation())
    n = run.config.val_samples
    evaluation = evaluate(networks, run.val_set, n_samples=n)
    metrics = evaluation.summary
    record = {"step": progress.step, "seconds": round(progress.elapsed, 1), **metrics, **log}
    with (run.state_dir / "history.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    tqdm.write(f"step {progress.step} {progress.elapsed:.0f}s val " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    if metrics[f"ged_{n}"] < progress.best_ged:
        progress.best_ged = metrics[f"ged_{n}"]
        save_model(run.version_dir, networks.calibration, networks.refinement, _manifest(run, metrics, evaluation.uncertainty))


def _checkpoint(run: _Run, log: dict[str, float], validate: bool) -> None:
    """Validate (if ``validate``) and save the train-state, on rank 0 while the others wait, once
    the ranks are known to hold the same weights."""
    distributed.check_in_sync(run.nets.in_sync())
    if distributed.is_main():
        if validate:
            _validate(run, log)
        _save_state(run.state_dir, run.nets, run.progress)
    distributed.barrier()


def train(config: TrainConfig) -> Path:
    """Train into ``config.out`` (a model folder); resumes from its train-state if present.
    Returns the folder of the best version (by validation GED_16). Under torchrun, every rank
    runs this and returns the same folder; rank 0 writes it."""
    device = distributed.rank_device(use_device(config.device))
    with distributed.process_group(device):
        return _train(config, device)


def _train(config: TrainConfig, device: torch.device) -> Path:
    run = _set_up(config, device)
    nets, progress = run.nets, run.progress
    main = distributed.is_main()
    # each rank its own crops: the global batch is ranks x batch_size
    batches = Batches(run.train_set, config.size, config.batch_size, config.seed + progress.step + distributed.rank(), Normalisation())
    start = time.monotonic() - progress.elapsed
    last_val = time.monotonic()
    gap = config.val_every_s
    bar = tqdm(total=config.steps, initial=progress.step, unit="step", dynamic_ncols=True, disable=not main)

    def budget_used() -> float:
        if config.steps is not None:
            return progress.step / config.steps
        return (time.monotonic() - start) / (60 * config.minutes)  # type: ignore[operator]

    # rank 0's clock decides for every rank (the budget spent, whether to validate), so that all
    # take the same steps and meet in the same collectives
    (used,) = distributed.decide(budget_used())
    while used < 1.0:
        scale = lr_scale(used)
        for opt, lr in ((nets.opt_f, config.lr_f), (nets.opt_g, config.lr_g), (nets.opt_d, config.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * scale
        nets.calibration.train()
        nets.refinement.train()
        image, label, window = (t.to(run.device) for t in batches.next())
        log = _step(config, nets, image, label, used >= config.f_warmup, progress.d_accuracy, run.amp, window)
        if "d_acc" in log:
            progress.d_accuracy = 0.9 * progress.d_accuracy + 0.1 * log["d_acc"]
        progress.step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in log.items()}, refresh=False)
        used, due = distributed.decide(budget_used(), float(time.monotonic() - last_val >= gap))
        done = used >= 1.0
        if done or due:
            began = time.monotonic()
            progress.elapsed = began - start
            _checkpoint(run, log, validate=used >= config.f_warmup or done)
            last_val = time.monotonic()
            gap = validation_gap(config.val_every_s, last_val - began, config.val_share)
    bar.close()
    if main and not (run.version_dir / "manifest.json").exists():
        raise CheckpointError(f"training ended before G trained long enough to validate; no version in {config.out}")
    return run.version_dir
