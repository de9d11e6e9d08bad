"""``TrainConfig``: every knob of a training run, torch-free so that ``carseg``'s parser can take its
defaults from these fields without loading torch. The resolved config is saved with the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: Path
    steps: int | None = None
    minutes: float | None = None
    size: int | None = None  # square crop side; None trains on whole images
    batch_size: int = 8
    # n samples of G per input for L_cal and L_adv (paper: 5). Once samples saturate, L_cal serves a
    # reading rarer than about 1/n below its rate: cells_rare's p_F 0.035 at 0.014 (README)
    samples: int = 8
    lambda_adv: float = 10.0
    lambda_cal: float = 5.0
    # weight of KL(p_F || mean G) inside L_cal (ours; 0 = the paper's L_cal). Off: the log of an
    # n-sample mean makes it pull saturated samples' shares towards 1/2 (expected minimum at n = 8:
    # 0.33 for p_F 0.25; tests/test_losses.py), and on cells it served mixed cells of p_F 0.24-0.25 /
    # 0.75-0.76 at 0.31-0.33 / 0.69-0.70; at 0, 0.23-0.26 / 0.75-0.76. On halo the same pull served
    # F's under-read faint nodules nearer the truth (pooled 0.033 against 0.075; README, cells)
    cal_forward_weight: float = 0.0
    lr_f: float = 2e-4
    # G at 1e-3: with the prior skip G starts at p_F, where only D's gradient moves it, and Adam
    # moves each weight by ~lr per step; on flips, 8 CPU minutes (~250 G steps) took diversity to
    # 0.27 and the event calibration error to 0.27 at 1e-3, against 0.04 and 0.35 (no event ever
    # flipped) at 2e-4; 4 minutes in, 0.13 against 0.06 with L_adv weighted 4x less
    # (docs/results/curves/probe_flips_*)
    lr_g: float = 1e-3
    # D at 5x G's lr, with no weight decay and R1 at 0.625 on the logit (the reference's gamma 10 on
    # the sigmoid, whose slope at chance is 1/4): with lr 1e-4, decay 5e-4 (the order of its BCE
    # gradients) and gamma 10 on the logit, D stayed at BCE 1.386 / accuracy 0.5 in every run
    lr_d: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.99)
    weight_decay: float = 5e-4  # F's and G's; D has none
    r1_gamma: float = 0.625
    d_accuracy_gate: float = 0.85  # D learns only while its accuracy is below this
    # share of the budget F trains alone before G starts: F's calibration is the floor of G's, and
    # an F step costs about an eighth of a G step, so F's head start is cheap
    f_warmup: float = 0.3
    # validation and the saved model use an exponential moving average of F's and G's weights: the
    # raw weights' sample frequencies swung by +-0.05 between validations two minutes apart. A
    # window of ~100 steps: with 0.998, G's average lagged its weights (calibration error 0.18 vs
    # 0.06 live, 30 CPU minutes in), as G takes only ~2000 steps on a 2-core CPU
    ema_decay: float = 0.99
    val_every_s: float = 120.0  # the least training time between validations
    # validation's largest share of the run's time: the next one waits until training has taken
    # (1 - share) / share times as long as the last validation did. On one core of this 2-core CPU,
    # 96 halo cases x 16 samples took ~60 s: validating every 120 s spent ~55% of G's phase on it
    val_share: float = 0.2
    val_cases: int = 96  # 32 left the frequency estimates too noisy to select a version by
    val_samples: int = 16
    seed: int = 0
    device: str = "cpu"
    # bfloat16 autocast of the nets' forward passes; None: on when the device is CUDA, off on a CPU
    # (where it made these U-Nets ~70x slower; training.train.use_amp refuses it there)
    amp: bool | None = None
    architecture: dict[str, Any] | None = field(default=None)
    # F also sees each pixel's place in the whole image (networks.CalibrationConfig.position): for
    # data whose images are centred on what is to be segmented (crops around a lesion)
    position: bool = False
    # fine-tune: F and G start from this model (a model folder's latest version, or a version
    # folder), with its architecture; ignored with a notice when ``out`` resumes from a state that
    # began from it (training.train)
    init: Path | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.minutes is None):
            raise ValueError("give exactly one of steps or minutes")
        if not 0.0 < self.val_share <= 1.0:
            raise ValueError(f"val_share must be in (0, 1], got {self.val_share}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 for L_cal to see a distribution, got {self.samples}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["init"] = None if self.init is None else str(self.init)
        return data
