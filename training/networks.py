"""The three networks of Calibrated Adversarial Refinement (Kassapis et al., ICCV 2021).

F (CalibrationNet) predicts a calibrated per-pixel class distribution p_F.
G (RefinementNet) maps (image, p_F, z) to one coherent segmentation sample per noise vector z;
its encoder runs once per image and its decoder once per sample.
D (Discriminator) scores (image, soft one-hot mask) pairs: one real/fake logit per image.

All three are fully convolutional over any H, W divisible by ``stride`` (the sampler pads).
Where we differ from the reference implementation, the docstring of the class says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from training.noise_field import RegionNoise


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


class _Encoder(nn.Module):
    """Stride-2 conv encoder; returns the feature map of every level, finest first."""

    def __init__(self, c_in: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_block(c_in, widths[0]), _conv_block(widths[0], widths[0]))
        self.downs = nn.ModuleList(
            nn.Sequential(_conv_block(widths[i], widths[i + 1], stride=2), _conv_block(widths[i + 1], widths[i + 1]))
            for i in range(len(widths) - 1)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = [self.stem(x)]
        for down in self.downs:
            feats.append(down(feats[-1]))
        return feats


class _UpBlock(nn.Module):
    """Transposed-conv upsampling, skip concatenation, one conv block."""

    def __init__(self, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.fuse = _conv_block(c_out + c_skip, c_out)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))

    # Sampling (eval mode): conv(cat(up(x), skip)) = conv_up(up(x)) + conv_skip(skip), and the
    # BatchNorm after it is affine, so it folds into both halves. The skip half is the same for every
    # sample of an image: ``skip_part`` once per image, ``forward_with`` per sample.
    def _folded(self) -> tuple[Tensor, Tensor, Tensor]:
        conv, norm = self.fuse[0], self.fuse[1]
        gain = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        weight = conv.weight * gain[:, None, None, None]
        return weight[:, : self.up.out_channels], weight[:, self.up.out_channels :], norm.bias - norm.running_mean * gain

    def skip_part(self, skip: Tensor) -> Tensor:
        _, weight, bias = self._folded()
        return nnf.conv2d(skip, weight, bias, padding=1)

    def forward_with(self, x: Tensor, skip_part: Tensor) -> Tensor:
        weight, _, _ = self._folded()
        return nnf.leaky_relu(nnf.conv2d(self.up(x), weight, padding=1) + skip_part, self.fuse[2].negative_slope)


def u_net(c_in: int, widths: tuple[int, ...]) -> tuple[_Encoder, nn.ModuleList]:
    """The encoder and the up blocks of a U-Net; kept as two attributes of the net that holds them
    (``encoder``, ``ups``), the names its checkpoints' keys carry."""
    ups = nn.ModuleList(_UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
    return _Encoder(c_in, widths), ups


def u_net_features(encoder: _Encoder, ups: nn.ModuleList, image: Tensor) -> Tensor:
    """The U-Net's last features (B, widths[0], H, W)."""
    feats = encoder(image)
    x = feats[-1]
    for up, skip in zip(ups, reversed(feats[:-1]), strict=True):
        x = up(x, skip)
    return x


@dataclass(frozen=True)
class CalibrationConfig:
    in_channels: int
    num_classes: int
    widths: tuple[int, ...] = (16, 32, 64, 128)
    # F also sees where each pixel lies in the whole image (``position_channels``): in crops centred
    # on their lesion, as LIDC's and halo's are, position is what tells a small nodule from a vessel
    # seen end on, which look alike; every checkpoint made before the field existed: off
    position: bool = False

    @property
    def stride(self) -> int:
        return 2 ** (len(self.widths) - 1)


def position_channels(window: Tensor, height: int, width: int) -> Tensor:
    """Where each pixel of a (height, width) view lies in its whole image: ``window`` (B, 4) holds
    each view's top, left and its whole image's height and width, in pixels. -> (B, 2, height, width):
    y and x, -1 at the whole image's first row or column and 1 at its last (pixel centres), so a crop
    sees the values the whole image has there, and an image of any size spans the same range."""
    window = window.to(torch.float32)
    rows = torch.arange(height, dtype=torch.float32, device=window.device)
    cols = torch.arange(width, dtype=torch.float32, device=window.device)
    y = (2 * (window[:, 0, None] + rows + 0.5) / window[:, 2, None] - 1)[:, :, None].expand(-1, height, width)
    x = (2 * (window[:, 1, None] + cols + 0.5) / window[:, 3, None] - 1)[:, None, :].expand(-1, height, width)
    return torch.stack([y, x], dim=1)


def whole_images(batch: int, height: int, width: int) -> Tensor:
    """``position_channels``' window for views that are whole images of (height, width)."""
    return torch.tensor([[0.0, 0.0, height, width]]).expand(batch, 4)


class CalibrationNet(nn.Module):
    """F: a U-Net whose logits give p_F. Trained from scratch (no pretrained VGG offline). With
    ``position`` its input also holds each pixel's place in the whole image (CoordConv, Liu et al.
    2018): zero padding lets a CNN learn position only slowly, and on 64 x 64 crops not at all."""

    def __init__(self, config: CalibrationConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder, self.ups = u_net(config.in_channels + (2 if config.position else 0), config.widths)
        self.head = nn.Conv2d(config.widths[0], config.num_classes, 1)

    def forward(self, image: Tensor, window: Tensor | None = None) -> Tensor:
        """image (B, C_in, H, W) -> logits (B, C, H, W). ``window`` (B, 4): where each image lies in
        its whole image (``position_channels``); None: each is whole. Used only with ``position``."""
        if self.config.position:
            b, _, h, w = image.shape
            window = whole_images(b, h, w) if window is None else window
            where = position_channels(window.to(image.device), h, w).to(image.dtype)
            image = torch.cat([image, where], dim=1)
        return self.head(u_net_features(self.encoder, self.ups, image))


# how a soft sample becomes a label map (training.sampling's docstring): the paper's argmax, or rounding
DECISIONS = ("argmax", "rounding")


@dataclass(frozen=True)
class RefinementConfig:
    in_channels: int
    num_classes: int
    widths: tuple[int, ...] = (16, 32, 64, 128)
    noise_dim: int = 8
    dropout: float = 0.1
    prior_skip: bool = True  # add log p_F to the output logits (ours; see RefinementNet)
    # "global": one z per sample broadcast over the image (the paper's G, and every checkpoint made
    # before regions existed); "regions": one z per region of doubt (training.noise_field)
    noise: str = "global"
    doubt_threshold: float = 0.05  # "regions": a pixel is in doubt where F's top class is below 1 - this
    region_grow: int = 2  # "regions": pixels a region of doubt is grown by, so one lesion's pieces join
    # how a soft sample becomes the label map a user gets (training.sampling.DECISIONS): "argmax"
    # (the paper's, and every checkpoint made before the rule existed) or "rounding", one uniform
    # per sample and region of doubt cut through the sample's class probabilities there
    decision: str = "argmax"

    def __post_init__(self) -> None:
        if self.noise not in ("global", "regions"):
            raise ValueError(f"noise must be 'global' or 'regions', got {self.noise!r}")
        if self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {self.decision!r}")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.widths) - 1)


class _NoiseInjection(nn.Module):
    """f' = (f + A(z)) * (1 + B(z)), then a 1x1 conv; z is a vector broadcast over H x W, a noise
    map (B, D, H', W') at full resolution, area-averaged to this stage's H x W, or the sampler's
    ``RegionNoise``, which gives A and B of that map without building it.

    The reference multiplies by (B(z) + 1e-5); starting from identity (1 + B(z)) keeps the
    decoder's signal alive at initialisation, so G does not first have to learn to undo a
    near-zero gain.
    """

    def __init__(self, noise_dim: int, channels: int) -> None:
        super().__init__()
        self.shift = nn.Linear(noise_dim, channels)
        self.scale = nn.Linear(noise_dim, channels)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, f: Tensor, z: Tensor | RegionNoise) -> Tensor:
        if isinstance(z, RegionNoise):
            shift, scale = z.project(self.shift, f.shape[-2:]), z.project(self.scale, f.shape[-2:])
        elif z.ndim == 2:
            shift = self.shift(z)[:, :, None, None]  # (B, C, 1, 1)
            scale = self.scale(z)[:, :, None, None]
        else:
            z = nnf.adaptive_avg_pool2d(z, f.shape[-2:])  # (B, D, H, W)
            shift = nnf.conv2d(z, self.shift.weight[:, :, None, None], self.shift.bias)
            scale = nnf.conv2d(z, self.scale.weight[:, :, None, None], self.scale.bias)
        return self.mix((f + shift) * (1.0 + scale))


class RefinementNet(nn.Module):
    """G: U-Net generator over concat(image, p_F) with noise injected at every decoder stage (>= 3
    for the default widths): one global vector per sample (the paper's), or with ``noise="regions"``
    one per region of doubt (``training.noise_field``). ``encode`` once, ``decode`` once per sample.

    With ``prior_skip`` (ours, not the reference's) the output logits are log p_F + the decoder's
    output, and the head starts at zero: G starts out calibrated (its samples' mean is p_F) and
    only has to learn to make coherent, confident samples, which on a CPU budget it learns in a
    fraction of the steps that learning to reproduce p_F first takes.
    """

    def __init__(self, config: RefinementConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        self.encoder = _Encoder(config.in_channels + config.num_classes, w)
        levels = list(reversed(range(len(w) - 1)))
        self.inject = nn.ModuleList(_NoiseInjection(config.noise_dim, w[i + 1]) for i in levels)
        self.ups = nn.ModuleList(_UpBlock(w[i + 1], w[i], w[i]) for i in levels)
        self.inject_out = _NoiseInjection(config.noise_dim, w[0])
        self.dropout = nn.Dropout2d(config.dropout)
        self.head = nn.Conv2d(w[0], config.num_classes, 1)
        if config.prior_skip:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def encode(self, image: Tensor, p_f: Tensor) -> list[Tensor]:
        """(B, C_in, H, W), (B, C, H, W) -> [log p_F, features of every level, finest first].
        Every entry has the batch first, so callers can index or repeat them alike."""
        return [p_f.clamp_min(1e-6).log(), *self.encoder(torch.cat([image, p_f], dim=1))]

    def decode(self, feats: list[Tensor], z: Tensor) -> Tensor:
        """``encode``'s output for B' = B * k rows (already repeated per sample) and z (B', noise_dim),
        or noise maps (B', noise_dim, H, W) (``training.noise_field``) -> logits (B', C, H, W)."""
        log_prior, levels = feats[0], feats[1:]
        x = levels[-1]
        for inject, up, skip in zip(self.inject, self.ups, reversed(levels[:-1]), strict=True):
            x = up(inject(x, z), skip)
        logits = self.head(self.dropout(self.inject_out(x, z)))
        return logits + log_prior if self.config.prior_skip else logits

    def share(self, feats: list[Tensor]) -> list[Tensor]:
        """Eval mode, for the sampler: ``encode``'s output -> what all samples of an image share,
        computed once per image: [log p_F, the coarsest features, each up block's skip part]."""
        log_prior, levels = feats[0], feats[1:]
        return [log_prior, levels[-1], *(up.skip_part(skip) for up, skip in zip(self.ups, reversed(levels[:-1]), strict=True))]

    def decode_shared(self, shared: list[Tensor], take: Callable[[Tensor], Tensor], z: Tensor | RegionNoise) -> Tensor:
        """``decode`` from ``share``'s output: ``take`` picks each sample's image's rows (a view of one
        row when a chunk's samples are all of one image, which broadcasts instead of copying); z as
        ``decode`` takes it, or region noise as ``RegionNoise``; the same logits as ``decode`` up to
        float rounding (BatchNorm folded, the skip convolved apart, region noise projected per region)."""
        log_prior, x, parts = shared[0], take(shared[1]), shared[2:]
        for inject, up, part in zip(self.inject, self.ups, parts, strict=True):
            x = up.forward_with(inject(x, z), take(part))
        logits = self.head(self.inject_out(x, z))  # no dropout: eval mode
        return logits + take(log_prior) if self.config.prior_skip else logits

    def forward(self, image: Tensor, p_f: Tensor, z: Tensor) -> Tensor:
        """k samples per image: z (B, k, noise_dim) or maps (B, k, noise_dim, H, W) -> logits
        (B, k, C, H, W)."""
        b, k = z.shape[:2]
        feats = [f.repeat_interleave(k, dim=0) for f in self.encode(image, p_f)]
        logits = self.decode(feats, z.flatten(0, 1))  # (B*k, C, H, W)
        return logits.reshape(b, k, *logits.shape[1:])


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int
    num_classes: int
    widths: tuple[int, ...] = (32, 64, 128, 128)


class Discriminator(nn.Module):
    """D: strided 4x4 convs over concat(image, mask), LeakyReLU 0.2, no normalisation, and a 1x1
    head: one logit per patch (the sigmoid lives in the loss).

    Patches, not one logit per image: the pooled head gave logits of ~0.0007 +- 0.001 whatever the
    input, and D sat at chance in every run. Each patch (receptive field ~45 px with the default
    widths, a whole lesion with its rim) is now a verdict of its own. No full-resolution stem: it
    doubled the cost of G's step on a CPU (D scores every sample of G)."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c = config.in_channels + config.num_classes
        for width in config.widths:
            layers += [nn.Conv2d(c, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        """(B, C_in, H, W), (B, C, H, W) soft one-hot -> patch logits (B, H / 2^L, W / 2^L)."""
        return self.head(self.features(torch.cat([image, mask], dim=1))).squeeze(1)


@dataclass(frozen=True)
class ArchitectureConfig:
    """Everything needed to rebuild F, G and D; saved with the weights as JSON."""

    calibration: CalibrationConfig
    refinement: RefinementConfig
    discriminator: DiscriminatorConfig = field(default=None)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchitectureConfig:
        unknown = set(data) - {"calibration", "refinement", "discriminator"}
        if unknown:
            raise ValueError(f"unknown architecture keys: {sorted(unknown)}")
        disc = data.get("discriminator")
        return cls(
            calibration=_build(CalibrationConfig, data["calibration"]),
            refinement=_build(RefinementConfig, data["refinement"]),
            discriminator=_build(DiscriminatorConfig, disc) if disc else None,  # type: ignore[arg-type]
        )

    @classmethod
    def default(cls, in_channels: int, num_classes: int) -> ArchitectureConfig:
        return cls(
            calibration=CalibrationConfig(in_channels, num_classes),
            refinement=RefinementConfig(in_channels, num_classes, noise="regions", decision="rounding"),
            discriminator=DiscriminatorConfig(in_channels, num_classes),
        )


def _build(config_cls: type, data: dict[str, Any]) -> Any:
    known = set(config_cls.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} keys: {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return config_cls(**values)


def soft_one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """(B, H, W) int -> (B, C, H, W) float one-hot."""
    return nnf.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
