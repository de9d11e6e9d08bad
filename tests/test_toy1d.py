"""The 1D toy (training/toy1d.py): the data generator, the upper-share measure, short training runs and
the figure. The full-budget accuracy is measured by ``carseg reproduce``, not here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm
from torch import Tensor, nn

from training.toy1d import (
    DISTINGUISHABLE_X,
    PANEL,
    PI_TRUE,
    QUICK,
    SIGMA,
    ToyConfig,
    ToyModel,
    local_share_error,
    on_branch_share,
    run_toy,
    sample_data,
    save_toy_figure,
    toy_config,
    train_toy,
    upper_branch,
    upper_fraction,
    upper_share,
)

TINY = ToyConfig(f_steps=20, steps=20, f_batch=16, batch=8, samples=4, seed=3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sample_data_puts_a_share_pi_on_the_upper_branch():
    for pi in (PI_TRUE, 0.3):
        x, y = sample_data(np.random.default_rng(0), 40_000, pi)
        keep = x < DISTINGUISHABLE_X
        # 28,000 points: the share's standard error is below 0.003
        assert np.mean(y[keep] > 0) == pytest.approx(pi, abs=0.012)


def test_sample_data_lies_on_the_branches_at_known_x():
    x, y = sample_data(np.random.default_rng(1), 20_000)
    assert x.dtype == y.dtype == np.float32 and x.min() >= 0 and x.max() < 1
    # (window, branch value, how far the sloped branch moves within the window)
    for lo, hi, branch, slope in ((0.0, 0.4, 0.5, 0.0), (0.59, 0.61, 0.25, 0.0125), (0.8, 1.0, 0.0, 0.0)):
        near = (x >= lo) & (x < hi)
        assert np.all(np.abs(np.abs(y[near]) - branch) < 5 * SIGMA + slope)
    assert np.std(y[x >= 0.8]) == pytest.approx(SIGMA, rel=0.1)


def test_sample_data_is_reproducible_for_a_seed():
    a, b = sample_data(np.random.default_rng(7), 100), sample_data(np.random.default_rng(7), 100)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_upper_fraction_counts_only_where_the_branches_are_apart():
    x = np.array([0.1, 0.5, 0.65, 0.75, 0.9])
    y = np.array([0.48, -0.35, 0.2, -0.01, 0.02])
    # x = 0.75 and 0.9 are left out: 2 of the remaining 3 are on the upper branch
    assert upper_fraction(x, y) == pytest.approx(2 / 3)
    assert np.isnan(upper_fraction(np.array([0.9]), np.array([0.1])))


def test_upper_fraction_of_the_data_itself_is_pi():
    x, y = sample_data(np.random.default_rng(2), 40_000)
    assert upper_fraction(x, y) == pytest.approx(PI_TRUE, abs=0.012)


class _BranchG(nn.Module):
    """A generator on the branches: upper when z_0 > Phi^-1(1 - p(x)), else lower, plus noise.
    ``low_x_pi`` replaces p(x) = pi by ``low_x_pi`` for x < 0.35, ``2 pi - low_x_pi`` elsewhere: the
    same share overall, wrong locally."""

    def __init__(self, pi: float, low_x_pi: float | None = None) -> None:
        super().__init__()
        self.pi, self.low_x_pi = pi, pi if low_x_pi is None else low_x_pi

    def forward(self, inputs: Tensor) -> Tensor:  # (N, 2 + noise_dim) = [x, F(x), z]
        x, z = inputs[:, :1].numpy(), inputs[:, 2:].numpy()
        p = np.where(x < 0.35, self.low_x_pi, 2 * self.pi - self.low_x_pi)
        sign = np.where(z[:, :1] > norm.ppf(1 - p), 1.0, -1.0)
        return torch.as_tensor(sign * upper_branch(x) + SIGMA * z[:, 1:2], dtype=torch.float32)


def _branch_model(pi: float, low_x_pi: float | None = None) -> ToyModel:
    return ToyModel(ToyConfig(noise_dim=2), f=nn.Linear(1, 1), g=_BranchG(pi, low_x_pi))


@pytest.mark.parametrize("pi", [PI_TRUE, 0.6])
def test_upper_share_of_a_generator_on_the_branches_is_its_share(pi):
    model = _branch_model(pi)
    assert upper_share(model, n_x=1000, k=50, seed=0) == pytest.approx(pi, abs=0.01)
    assert on_branch_share(model, n_x=1000, k=50, seed=0) > 0.99


def test_local_share_error_sees_wrong_shares_that_average_out():
    calibrated, compensating = _branch_model(PI_TRUE), _branch_model(PI_TRUE, low_x_pi=1.0)
    assert upper_share(compensating) == pytest.approx(PI_TRUE, abs=0.01)  # right overall...
    assert local_share_error(compensating) == pytest.approx(0.1, abs=0.01)  # ...wrong at every x
    assert local_share_error(calibrated) < 0.01
    assert local_share_error(_branch_model(0.6)) == pytest.approx(0.3, abs=0.01)  # pi of the config is 0.9


def test_toy_config_applies_changes_to_the_chosen_budget():
    ablation = toy_config(quick=True, lambda_cal=0.0, seed=5)
    assert ablation.lambda_cal == 0.0 and ablation.seed == 5 and ablation.steps == QUICK.steps
    assert toy_config(quick=False).steps > QUICK.steps


def test_training_is_deterministic_for_a_seed_and_reports_progress():
    done: list[int] = []
    first = train_toy(TINY, done.append)
    second = train_toy(TINY)
    x = np.linspace(0, 1, 11, dtype=np.float32)
    assert done == list(range(1, TINY.total_steps + 1))
    assert np.array_equal(first.sample(x, 3, seed=0), second.sample(x, 3, seed=0))
    other = train_toy(ToyConfig(**{**TINY.__dict__, "seed": 4}))
    assert not np.array_equal(first.sample(x, 3, seed=0), other.sample(x, 3, seed=0))


def test_training_leaves_the_global_torch_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    train_toy(TINY)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == 1  # the fixture's, restored


def test_run_toy_returns_finite_measurements():
    model, result = run_toy(TINY)
    assert result.pi_true == PI_TRUE and 0.0 <= result.pi <= 1.0 and 0.0 <= result.on_branch <= 1.0
    assert np.isfinite(result.f_error) and result.seconds > 0 and result.config["seed"] == TINY.seed
    assert np.all(np.isfinite(model.sample(np.array([0.2, 0.6], dtype=np.float32), 4)))


def test_the_figure_is_a_png_with_one_panel_per_model(tmp_path):
    path = tmp_path / "out" / "toy.png"
    save_toy_figure({"with L_cal": _branch_model(PI_TRUE), "without L_cal": _branch_model(0.6)}, path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (2 * PANEL[0], PANEL[1])
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    red = (pixels[:, 0] > 180) & (pixels[:, 1] < 80) & (pixels[:, 2] < 80)
    assert red.sum() > 500  # G's samples are drawn
