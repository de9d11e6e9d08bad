"""The paper's 1D toy regression (Kassapis et al., ICCV 2021, Sec. 4.1): does G's sample frequency follow
the data's when G is trained with the calibration loss, and does it without?

Data: x ~ U(0, 1); with probability pi the upper branch (b = 0), else the lower one (b = 1):
    y = (-1)^b * 0.5            + e   for x < 0.4
    y = (-1)^b * (1 - 1.25 x)   + e   for 0.4 <= x < 0.8
    y = e                             for x >= 0.8,        e ~ N(0, sigma^2), pi = 0.9, sigma = 0.03.

F is an MLP regressor fitted with MSE, so F(x) -> E[y|x] = (2 pi - 1) * upper(x). G(x, F(x), z) and
D(x, y) are MLPs with 4 hidden layers of 64 units (LeakyReLU 0.2). G's loss is
    L_G = lambda_adv * BCE(D(x, G), 1) + lambda_cal * 0.5 * mean_x (mean_k G(x, F(x), z_k) - F(x))^2
with F detached; D's loss is BCE on real/fake plus an optional R1 penalty on real inputs. The ablation
is the same config with lambda_cal = 0.

Choices of ours (the paper does not give its toy's training details):
- Data are streamed (a fresh batch every step) rather than a fixed training set: a finite set would put
  its own sampling error into F (the branch share of 4,000 points is off pi by ~0.005 overall and by
  several times that locally), and F's error is a floor for G's calibration.
- F is fitted first, alone, with a cosine-decayed lr, then frozen while G and D train: G's target
  then does not move, and F's accuracy is set by its own budget.
- Many samples per x, few x per step (k = 64, 16 x values). The L_cal estimator is biased: for samples
  on the branches, E[(mean_k G - F)^2] = (E[G] - F)^2 + Var[G] / k, so L_cal alone is minimised by a
  share p* = (k pi - 1/2) / (k - 1) on the upper branch (1.0 for k = 5, 0.927 for k = 16, 0.906 for
  k = 64): through the Var/k term each sample is pulled towards the others with a strength
  lambda_cal / k relative to D's gradient. Measured (QUICK budget, no lr decay, seed 0): 64 x values and
  k = 16 with lambda_cal = 20 put 0.956 of G's samples on the upper branch (0.990 with lrs of 1e-3);
  16 x values and k = 64, at the same cost, 0.912 with lambda_cal = 20 and 0.900 with lambda_cal = 5.
- G's and D's lrs decay (cosine) to 0: without it the L_cal-free run ended mid-oscillation with only 35%
  of its samples on a branch (FULL budget, seed 0), which says more about where training stopped than
  about the method.
- D: R1 weight 0.1 on the mean squared gradient (the segmentation runs use 10 on the norm); D trains
  every step. Neither was tuned.

Measured (1 thread on a shared 2-core machine; upper share / per-x error / share of samples on a branch):
    budget  seed  with L_cal              without L_cal           seconds (with + without)
    QUICK   0     0.908 / 0.014 / 0.83    0.909 / 0.035 / 0.86    20 + 16
    QUICK   1     0.909 / 0.014 / 0.84    0.921 / 0.029 / 0.87    19 + 16
    FULL    0     0.901 / 0.007 / 0.96    0.902 / 0.005 / 0.99    121 + 124
    FULL    1     0.902 / 0.005 / 0.97    0.896 / 0.005 / 0.99    121 + 105
So here, unlike in the paper, the adversarial loss alone also reaches pi once trained to the end (with
R1 and streamed data); L_cal buys faster local calibration (QUICK), at the cost of a few samples left
between the branches (its Var/k pull).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image, ImageDraw
from torch import Tensor, nn

PI_TRUE = 0.9
SIGMA = 0.03
# Where the branches are told apart by nearest-branch assignment: at x = 0.7 they are 0.25 = 8 sigma
# apart, so a data point is assigned to the wrong branch with probability Phi(-4.2) ~ 1e-5; towards
# x = 0.8 they meet and the assignment becomes a coin toss.
DISTINGUISHABLE_X = 0.7


# ---------------------------------------------------------------------------------------------- data


def upper_branch(x: np.ndarray) -> np.ndarray:
    """The noise-free upper branch at ``x``; the lower branch is its negative."""
    return np.where(x < 0.4, 0.5, np.where(x < 0.8, 1.0 - 1.25 * x, 0.0))


def sample_data(rng: np.random.Generator, n: int, pi: float = PI_TRUE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws (x, y) of the toy distribution, as float32 arrays of shape (n,)."""
    x = rng.uniform(0.0, 1.0, n)
    sign = np.where(rng.uniform(0.0, 1.0, n) < pi, 1.0, -1.0)  # +1: upper branch (b = 0)
    y = sign * upper_branch(x) + rng.normal(0.0, SIGMA, n)
    return x.astype(np.float32), y.astype(np.float32)


def upper_fraction(x: np.ndarray, y: np.ndarray, x_max: float = DISTINGUISHABLE_X) -> float:
    """The share of the points with x < ``x_max`` that lie closer to the upper branch than to the lower.

    The branches are +-u(x) with u > 0 there, so "closer to the upper" is y > 0. Points with x >= x_max
    are left out (the branches meet at x = 0.8); NaN if no point is left.
    """
    keep = x < x_max
    if not keep.any():
        return float("nan")
    return float(np.mean(y[keep] > 0.0))


# -------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ToyConfig:
    """Everything a toy run depends on; two runs with equal configs give equal models."""

    f_steps: int = 4000  # F alone, before G and D
    steps: int = 15000  # G and D together, F frozen
    f_batch: int = 256  # F's batch: larger than G's, since F's error is a floor for G's calibration
    batch: int = 16  # x values per G/D step
    samples: int = 64  # k samples of G per x
    noise_dim: int = 4
    width: int = 64
    depth: int = 4
    lambda_adv: float = 1.0
    lambda_cal: float = 5.0
    r1: float = 0.1  # weight of the R1 penalty on D's real inputs; 0 turns it off
    lr_f: float = 3e-3
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    anneal: bool = True  # cosine-decay G's and D's lr to 0 over ``steps``
    pi: float = PI_TRUE
    seed: int = 0

    @property
    def total_steps(self) -> int:
        """What ``progress`` counts up to."""
        return self.f_steps + self.steps


QUICK = ToyConfig(f_steps=1000, steps=2000)
FULL = ToyConfig()


def toy_config(quick: bool, **changes: Any) -> ToyConfig:
    """The QUICK or FULL budget, with ``changes`` (e.g. ``seed=1``, ``lambda_cal=0.0``) applied."""
    return replace(QUICK if quick else FULL, **changes)


# ------------------------------------------------------------------------------------------- networks


def _mlp(c_in: int, width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(c_in if i == 0 else width, width), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Linear(width, 1))


@dataclass
class ToyModel:
    """A trained F (x -> E[y|x]) and G ((x, F(x), z) -> y); D is dropped after training."""

    config: ToyConfig
    f: nn.Module
    g: nn.Module

    @torch.no_grad()
    def sample(self, x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
        """(n,) x values -> (n, k) samples of G, reproducible for ``seed``."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))[:, None]  # (n, 1)
        z = torch.randn(len(xt), k, self.config.noise_dim, generator=torch.Generator().manual_seed(seed))
        return _generate(self.g, xt, self.f(xt), z).numpy()

    @torch.no_grad()
    def mean(self, x: np.ndarray) -> np.ndarray:
        """(n,) x values -> (n,) F(x)."""
        return self.f(torch.as_tensor(np.asarray(x, dtype=np.float32))[:, None])[:, 0].numpy()


def _generate(g: nn.Module, x: Tensor, fx: Tensor, z: Tensor) -> Tensor:
    """x, F(x): (B, 1); z: (B, k, noise_dim) -> samples (B, k)."""
    b, k, _ = z.shape
    cond = torch.cat([x, fx], dim=1)[:, None, :].expand(b, k, 2)  # (B, k, 2)
    return g(torch.cat([cond, z], dim=2).reshape(b * k, -1)).reshape(b, k)


def _discriminate(d: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """x: (B, 1); y: (B, k) -> logits (B, k), every sample scored with its own x."""
    b, k = y.shape
    return d(torch.stack([x.expand(b, k), y], dim=2).reshape(b * k, 2)).reshape(b, k)


# ------------------------------------------------------------------------------------------- training


@contextmanager
def _one_thread() -> Iterator[None]:
    """Width-64 MLPs gain nothing from intra-op threads and lose to contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stream:
    """Fresh data batches as tensors: (B, 1) x and (B, 1) y."""

    def __init__(self, rng: np.random.Generator, batch: int, pi: float) -> None:
        self.rng, self.batch, self.pi = rng, batch, pi

    def next(self) -> tuple[Tensor, Tensor]:
        x, y = sample_data(self.rng, self.batch, self.pi)
        return torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None]


def _fit_f(f: nn.Module, data: _Stream, config: ToyConfig, tick: Callable[[], None]) -> None:
    """MSE regression with a cosine-decayed lr: the decay averages out the batch noise at the end,
    which is what makes F(x) close to E[y|x] rather than to the last few batches."""
    opt = torch.optim.Adam(f.parameters(), lr=config.lr_f)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(config.f_steps, 1))
    for _ in range(config.f_steps):
        x, y = data.next()
        loss = nnf.mse_loss(f(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tick()
    f.requires_grad_(False)


def _r1(d: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean squared gradient of D's logit with respect to the real y."""
    y = y.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_discriminate(d, x, y).sum(), y, create_graph=True)
    return grad.pow(2).mean()


def _adversarial_step(parts: dict[str, Any], data: _Stream, config: ToyConfig, noise: torch.Generator) -> None:
    """One D step on a real batch and G's samples, then one G step on fresh samples of the same x."""
    f, g, d, opt_g, opt_d = parts["f"], parts["g"], parts["d"], parts["opt_g"], parts["opt_d"]
    x, y = data.next()
    fx = f(x)
    z = torch.randn(config.batch, config.samples, config.noise_dim, generator=noise)

    fake = _generate(g, x, fx, z).detach()
    real_logits, fake_logits = _discriminate(d, x, y), _discriminate(d, x, fake)
    loss_d = nnf.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    loss_d = loss_d + nnf.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    if config.r1 > 0:
        loss_d = loss_d + config.r1 * _r1(d, x, y)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    z = torch.randn(config.batch, config.samples, config.noise_dim, generator=noise)
    samples = _generate(g, x, fx, z)  # (B, k)
    gen_logits = _discriminate(d, x, samples)
    loss_adv = nnf.binary_cross_entropy_with_logits(gen_logits, torch.ones_like(gen_logits))
    loss_cal = 0.5 * (samples.mean(dim=1, keepdim=True) - fx).pow(2).mean()
    loss_g = config.lambda_adv * loss_adv + config.lambda_cal * loss_cal
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()


def train_toy(config: ToyConfig, progress: Callable[[int], None] | None = None) -> ToyModel:
    """Fit F, then train G and D against it; ``progress(done)`` is called after every step, with
    ``done`` counting up to ``config.total_steps``. Deterministic for ``config.seed``."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done)

    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # weight init; data and noise have their own generators
        f = _mlp(1, config.width, config.depth)
        g = _mlp(2 + config.noise_dim, config.width, config.depth)
        d = _mlp(2, config.width, config.depth)
        rng = np.random.default_rng(config.seed)
        noise = torch.Generator().manual_seed(config.seed + 1)
        _fit_f(f, _Stream(rng, config.f_batch, config.pi), config, tick)
        data = _Stream(rng, config.batch, config.pi)
        betas = (0.5, 0.99)
        parts = {
            "f": f, "g": g, "d": d,
            "opt_g": torch.optim.Adam(g.parameters(), lr=config.lr_g, betas=betas),
            "opt_d": torch.optim.Adam(d.parameters(), lr=config.lr_d, betas=betas),
        }
        scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(parts[o], max(config.steps, 1)) for o in ("opt_g", "opt_d")]
        for _ in range(config.steps):
            _adversarial_step(parts, data, config, noise)
            if config.anneal:
                for sched in scheds:
                    sched.step()
            tick()
    return ToyModel(config, f.eval(), g.eval())


# ------------------------------------------------------------------------------------------ measuring


def _measured_samples(model: ToyModel, n_x: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_x,) x values evenly spread on [0, DISTINGUISHABLE_X) and G's (n_x, k) samples there."""
    x = ((np.arange(n_x) + 0.5) / n_x * DISTINGUISHABLE_X).astype(np.float32)
    return x, model.sample(x, k, seed)


def upper_share(model: ToyModel, n_x: int = 2000, k: int = 50, seed: int = 0) -> float:
    """The share of G's samples on the upper branch, over ``n_x`` x values evenly spread on
    [0, DISTINGUISHABLE_X) with ``k`` samples each; a calibrated G gives pi."""
    x, y = _measured_samples(model, n_x, k, seed)
    return upper_fraction(np.repeat(x, k), y.reshape(-1))


def local_share_error(model: ToyModel, bins: int = 14, n_x: int = 2000, k: int = 50, seed: int = 0) -> float:
    """Mean over ``bins`` equal x-bins of [0, DISTINGUISHABLE_X) of |upper share in the bin - pi|.

    The overall share can be right while the local ones are not (too few lower samples at some x, too
    many at others); a calibrated G has each bin at pi. With the defaults a bin holds ~7,000 samples,
    so a perfect G still scores ~0.003 (binomial noise).
    """
    x, y = _measured_samples(model, n_x, k, seed)
    which = np.minimum((x / DISTINGUISHABLE_X * bins).astype(int), bins - 1)
    shares = [np.mean(y[which == b] > 0.0) for b in range(bins)]
    return float(np.mean(np.abs(np.array(shares) - model.config.pi)))


def on_branch_share(model: ToyModel, n_x: int = 2000, k: int = 50, seed: int = 0) -> float:
    """The share of G's samples within 3 sigma of either branch on [0, DISTINGUISHABLE_X): a right
    upper share says little if the samples lie between the branches."""
    x, y = _measured_samples(model, n_x, k, seed)
    distance = np.abs(np.abs(y) - upper_branch(x)[:, None])
    return float(np.mean(distance < 3 * SIGMA))


def f_error(model: ToyModel, n_x: int = 2000) -> float:
    """Max |F(x) - E[y|x]| over [0, 1): F's error is a floor for G's calibration."""
    x = ((np.arange(n_x) + 0.5) / n_x).astype(np.float32)
    return float(np.max(np.abs(model.mean(x) - (2 * model.config.pi - 1) * upper_branch(x))))


@dataclass
class ToyResult:
    """What a run measured: G's upper-branch share ``pi`` against the data's ``pi_true``."""

    pi_true: float
    pi: float
    local_error: float  # local_share_error
    on_branch: float  # on_branch_share
    f_error: float
    seconds: float
    config: dict[str, Any]

    @property
    def error(self) -> float:
        return abs(self.pi - self.pi_true)


def run_toy(config: ToyConfig, progress: Callable[[int], None] | None = None) -> tuple[ToyModel, ToyResult]:
    """Train and measure one config."""
    start = time.perf_counter()
    model = train_toy(config, progress)
    seconds = time.perf_counter() - start
    seed = config.seed
    result = ToyResult(
        config.pi, upper_share(model, seed=seed), local_share_error(model, seed=seed), on_branch_share(model, seed=seed),
        f_error(model), seconds, asdict(config),
    )
    return model, result


# -------------------------------------------------------------------------------------------- figure

PANEL = (400, 300)  # one panel's size in pixels, margins included
_MARGIN = (36, 30, 12, 24)  # left, top, right, bottom
_Y_RANGE = (-0.7, 0.7)


def _to_pixels(x: np.ndarray, y: np.ndarray, left: int) -> tuple[np.ndarray, np.ndarray]:
    ml, mt, mr, mb = _MARGIN
    w, h = PANEL[0] - ml - mr, PANEL[1] - mt - mb
    px = left + ml + np.clip(x, 0, 1) * w
    py = mt + (1 - (np.clip(y, *_Y_RANGE) - _Y_RANGE[0]) / (_Y_RANGE[1] - _Y_RANGE[0])) * h
    return px, py


def _draw_panel(draw: ImageDraw.ImageDraw, left: int, title: str, data: tuple[np.ndarray, np.ndarray],
                samples: tuple[np.ndarray, np.ndarray]) -> None:
    ml, mt, mr, mb = _MARGIN
    draw.rectangle((left + ml, mt, left + PANEL[0] - mr, PANEL[1] - mb), outline=(0, 0, 0))
    for value in (_Y_RANGE[0] + 0.2, 0.0, _Y_RANGE[1] - 0.2):
        _, py = _to_pixels(np.zeros(1), np.array([value]), left)
        draw.text((left + 2, float(py[0]) - 5), f"{value:+.1f}", fill=(0, 0, 0))
    for value in (0.0, 0.4, 0.8):
        px, _ = _to_pixels(np.array([value]), np.zeros(1), left)
        draw.text((float(px[0]) - 6, PANEL[1] - mb + 6), f"{value:.1f}", fill=(0, 0, 0))
    for (xs, ys), colour in ((data, (170, 170, 170)), (samples, (214, 39, 40))):
        px, py = _to_pixels(xs, ys, left)
        for a, b in zip(px.tolist(), py.tolist(), strict=True):
            draw.point((a, b), fill=colour)
    draw.text((left + ml, 8), title, fill=(0, 0, 0))


def save_toy_figure(models: dict[str, ToyModel], path: Path, seed: int = 0) -> None:
    """One panel per model: the data in grey, G's samples in red, and in the title the measured upper
    share vs pi and the per-x error (``local_share_error``). The panels are ``PANEL`` pixels each, side
    by side."""
    canvas = Image.new("RGB", (PANEL[0] * max(len(models), 1), PANEL[1]), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    data = sample_data(np.random.default_rng(seed), 1500)
    x = np.linspace(0.0, 1.0, 300, endpoint=False, dtype=np.float32)
    for i, (name, model) in enumerate(models.items()):
        k = 5
        samples = (np.repeat(x, k), model.sample(x, k, seed).reshape(-1))
        share, local = upper_share(model, seed=seed), local_share_error(model, seed=seed)
        title = f"{name}: upper share {share:.3f} (pi {model.config.pi:.2f}), per-x error {local:.3f}"
        _draw_panel(draw, i * PANEL[0], title, data, samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
