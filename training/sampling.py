"""The sampler: the one function that runs F and G for inference, for the service and for
evaluation alike. F and G's encoder run once per image, G's decoder once per sample.

Each image asks for its own k and seed. Its noise comes from its own ``torch.Generator`` seeded by
that seed and drawn on the CPU, row by row, so (image, seed, k) gives the same samples alone, in
any batch and on any device, and the first k samples of a seed are the same whatever k is asked for.

Only the outputs asked for are computed, and no soft sample is kept: each decoded chunk is merged
into per-image statistics (the mean of the soft samples, their squared deviations, their entropies),
from which the uncertainty maps come once per image at the end. Memory is the labels (k x H x W
bytes per image) plus a few (C, H, W) maps, whatever k is.

A soft sample becomes a label map by one of ``DECISIONS``. ``argmax`` is the paper's. It serves
the majority reading wherever G's sample stayed soft: on cells' faint membranes G's soft samples
averaged p_F's 0.17 and 0.61, but 0.02-0.10 and 0.79-0.83 of the argmax masks marked them.
``rounding`` draws one uniform u per sample and region of doubt (``training.noise_field``; F's sure
pixels keep the argmax) and gives each pixel the class at which the sample's cumulative class
probabilities pass u. A pixel is then marked with exactly the sample's probability, so the masks'
shares are the soft samples' mean, which L_cal holds to p_F. A region's pixels share u, so a ring
that stayed soft is marked whole or not at all, and two regions' u are independent, as their noise
is. Where G's sample is saturated, rounding and argmax agree.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor

from training import noise_field, uncertainty_summary
from training.manifest import Normalisation
from training.networks import DECISIONS, CalibrationNet, RefinementNet, whole_images

_LOG_EPS = 1e-12

ARGMAX, ROUNDING = DECISIONS  # how a soft sample becomes a label map: see the module's docstring

LABELS = "labels"  # (k, H, W) uint8: one label map per sample
P_F = "p_f"  # (C, H, W): F's calibrated class probabilities
MEAN = "mean"  # (C, H, W): the mean of G's soft samples
ALEATORIC_ENTROPY = "aleatoric_entropy"  # (H, W): H(p_F)
SAMPLE_ENTROPY = "sample_entropy"  # (H, W): H(mean)
MUTUAL_INFORMATION = "mutual_information"  # (H, W): H(mean) - mean over samples of H(sample)
SAMPLE_VARIANCE = "sample_variance"  # (H, W): sum over classes of the across-sample variance of the soft samples
# (4,): the image's uncertainty summaries (training.uncertainty_summary.NAMES), what drift monitoring
# observes; it needs the labels (computed for it if not asked for) and the soft samples on the
# foreground pixels alone
SUMMARY = "uncertainty_summary"
OUTPUTS = (LABELS, P_F, MEAN, ALEATORIC_ENTROPY, SAMPLE_ENTROPY, MUTUAL_INFORMATION, SAMPLE_VARIANCE, SUMMARY)


def use_device(name: str, threads: int | None = None) -> torch.device:
    """The device ``name`` selects (``auto``: CUDA when present, else the CPU), with this process set
    up to compute on it: ``threads`` CPU threads if given, and CPU denormals flushed to zero, since
    near-zero weights and activations as denormals made CPU convolutions several-fold slower (5x
    measured on a training state) and flushing them changes no result that matters here."""
    if threads:
        torch.set_num_threads(threads)
    flush_denormals()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return device


def flush_denormals() -> None:
    """Flush CPU denormals to zero in the calling thread: the flag lives in each thread's floating
    point control register, so every thread that runs the networks must set it (``use_device`` does
    for its caller; the in-process runner threads call this, and ran without it before: one
    executor with two threads answered k = 16 at 128 x 128 in 150 ms without it, 134 ms with it)."""
    torch.set_flush_denormal(True)


@dataclass(frozen=True)
class Networks:
    """F and G in eval mode on one device, and how images are normalised for them."""

    calibration: CalibrationNet
    refinement: RefinementNet
    normalisation: Normalisation
    decision_override: str | None = None  # one of DECISIONS instead of G's own (an evaluation's A/B)

    @property
    def device(self) -> torch.device:
        return next(self.calibration.parameters()).device

    @property
    def decision(self) -> str:
        """How soft samples become label maps: the override, else G's config's (baselines and the
        SSN, whose configs have none, and every checkpoint made before the rule existed: argmax)."""
        decision = self.decision_override or getattr(self.refinement.config, "decision", ARGMAX)
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}; expected one of {DECISIONS}")
        return decision

    def prepare(self, images: Sequence[np.ndarray]) -> Tensor:
        """Images of one shape, (H, W, C) as stored (uint8, uint16 or float in [0, 1]) -> the
        normalised batch (B, C, H, W) on the networks' device."""
        return torch.from_numpy(np.stack([self.normalisation.apply(image) for image in images])).to(self.device)


class Stopped(Exception):
    """``sample`` was told to stop between two decoder chunks."""


@dataclass(frozen=True)
class MemoryModel:
    """Bytes per pixel a sampler call holds, estimated from G's widths and the class count, in
    float32: what an image keeps while its samples are decoded (G's encoder features, p_F, the
    running statistics) and what each sample decoded at once adds (the decoder's activations at full
    resolution, about eight maps of widths[0] channels, and the soft sample). Measured on the default
    model (widths 16, 2 classes) on a CPU, peak RSS over the call: 190 to 460 bytes per pixel per
    image and 511 to 540 per sample, against the estimates 432 and 672; a 256 x 256 k=64 call under
    a 400 MB budget peaked at 430 MB with 544 per sample, hence the margin."""

    per_image: int
    per_sample: int

    @classmethod
    def of(cls, networks: Networks) -> MemoryModel:
        config = networks.refinement.config
        width, classes = config.widths[0], config.num_classes
        per_image, per_sample = 4 * (6 * width + 6 * classes), 4 * (10 * width + 4 * classes)
        if _region_noise(networks.refinement):
            # per image, the region labels and the index that counts their shares (int64), the
            # counts' float32 increments, and the shares (noise_field.RegionShares: float32 at half
            # resolution and their pooled copies, under 1.4 bytes per pixel and region); per sample,
            # its noise map at full resolution and the coarser copies the decoder pools (under twice
            # the full one), and its labels' copy, which an image of more regions than the shares are
            # used for needs (the chunk is sized before the regions are known)
            per_image += 8 + 8 + 4 + int(1.4 * (noise_field.MAX_SHARED_REGIONS + 1))
            per_sample += 4 * 2 * config.noise_dim + 8
        if networks.decision == ROUNDING:
            # per image its region labels (int64); per sample its thresholds' map, the soft sample's
            # cumulative probabilities and the comparison's copies
            per_image += 8
            per_sample += 4 + 4 * 2 * classes + 8
        return cls(per_image=per_image, per_sample=per_sample)

    def fixed(self, pixels: int, k: int) -> int:
        """An image's share that does not shrink with the chunk: its maps and its k label maps."""
        return pixels * (self.per_image + k)

    def chunk(self, pixels: int, ks: Sequence[int], budget: int) -> int:
        """How many samples of images of ``pixels`` pixels fit the budget at once (at least one)."""
        room = budget - sum(self.fixed(pixels, k) for k in ks)
        return max(1, room // (self.per_sample * pixels))


def entropy(probs: Tensor, dim: int) -> Tensor:
    return -(probs * (probs + _LOG_EPS).log()).sum(dim=dim)


def noise(seed: int, k: int, noise_dim: int) -> Tensor:
    """k noise vectors (k, noise_dim) from a generator of their own, drawn on the CPU. Drawn row by
    row, because torch draws one large tensor differently from small ones: this way the first k
    samples of a seed are the same whatever k is asked for."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(noise_dim, generator=generator) for _ in range(k)])


def _region_noise(refinement: torch.nn.Module) -> bool:
    """Whether G takes one noise vector per region of doubt (``training.noise_field``); baselines and
    the SSN sit in G's slot with configs of their own, which have no such field: global noise."""
    return getattr(refinement.config, "noise", "global") == "regions"


def region_vectors(z: Tensor, counts: Sequence[int]) -> Tensor:
    """Per sample row j, the vectors of its image's ``counts[j]`` regions of doubt: (rows, R + 1, D),
    R the largest count, row 0 unused, region 1 the sample's own z_j and the others drawn from a
    generator keyed by z_j (``row_generator``), so they too depend on (image, seed, sample index)
    alone, in any batch or chunk and on any device."""
    table = torch.zeros(z.shape[0], max(counts, default=0) + 1, z.shape[1])
    for j, (row, count) in enumerate(zip(z.cpu(), counts, strict=True)):
        if count:
            table[j, 1] = row
        if count > 1:
            # one draw per row: its size is the image's region count, the same wherever it is sampled
            table[j, 2 : count + 1] = torch.randn(count - 1, z.shape[1], generator=row_generator(row))
    return table


def row_generator(z: Tensor, salt: bytes = b"") -> torch.Generator:
    """A CPU generator keyed by one sample's noise vector, for samplers that draw per-pixel noise
    as well (the SSN's diagonal, independent per-pixel sampling): drawn from it, that noise is the
    same for (image, seed, sample index) alone, in any batch, chunk or device, as z itself is.
    ``salt`` keys a second stream of the same row, independent of the first (two generators of one
    seed would draw the same uniforms)."""
    digest = hashlib.blake2b(z.detach().float().cpu().numpy().tobytes() + salt, digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def region_thresholds(z: Tensor, counts: Sequence[int], per_region: bool) -> Tensor:
    """The rounding's uniforms: per sample row j (its own noise vector z_j, ``counts[j]`` regions
    of doubt in its image), (rows, R + 1) float32 on the CPU, column 0 -1 (F's sure pixels: argmax),
    columns 1..counts[j] one uniform per region, or one shared by every region where G's noise is one
    global vector (its regions are decided together anyway), from a generator keyed by z_j, so they
    depend on (image, seed, sample index) alone."""
    table = torch.full((z.shape[0], max(counts, default=0) + 1), -1.0)
    for j, (row, count) in enumerate(zip(z.cpu(), counts, strict=True)):
        if count:
            u = torch.rand(count if per_region else 1, generator=row_generator(row, b"rounding"))
            table[j, 1 : count + 1] = u
    return table


def decide(logits: Tensor, thresholds: Tensor | None, probs: Tensor | None = None) -> Tensor:
    """Label maps (n, H, W) int64 or bool from logits (n, C, H, W). ``thresholds`` None: the argmax
    (for two classes a comparison, several times faster, with the same tie rule: class 0); else
    (n, H, W) uniforms, negative where the argmax is kept: the first class whose cumulative
    probability exceeds the pixel's uniform (``probs``, the logits' softmax, where the caller has it)."""
    two = logits.shape[1] == 2
    top = logits[:, 1] > logits[:, 0] if two else logits.argmax(dim=1)
    if thresholds is None:
        return top
    probs = logits.softmax(dim=1) if probs is None else probs
    if two:
        rounded = probs[:, 0] < thresholds
    else:
        rounded = (probs.cumsum(dim=1)[:, :-1] < thresholds[:, None]).sum(dim=1)
    return torch.where(thresholds < 0, top, rounded)


def _pad_to(x: Tensor, stride: int) -> tuple[Tensor, int, int]:
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % stride, (-w) % stride
    if pad_h or pad_w:
        # replicate, not zeros: a zero border is a bright or dark edge the nets never saw
        x = nnf.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x, h, w


def _calibrate(calibration: torch.nn.Module, padded: Tensor, h: int, w: int) -> Tensor:
    """F's logits on images padded from (h, w). An F that sees position (``CalibrationConfig.position``)
    is told the image is (h, w), so the padding does not move its centre; baselines and the SSN sit
    in F's slot with configs of their own, which have no such field."""
    if getattr(calibration.config, "position", False):
        return calibration(padded, whole_images(padded.shape[0], h, w))
    return calibration(padded)


class _Stats:
    """Per-image statistics of the soft samples, merged chunk by chunk, only those the requested
    outputs need: the labels, the mean and the sum of squared deviations from it (Chan et al.'s
    pairwise update, exact where E[p^2] - E[p]^2 would cancel in float32), and the sum of the
    samples' entropies. Each image's samples are merged in order with plain adds, no atomics, so
    the maps do not change from run to run on a GPU."""

    def __init__(self, outputs: set[str], ks: Sequence[int], num_classes: int, h: int, w: int, device: torch.device,
                 foregrounds: Sequence[Tensor] | None = None) -> None:
        b, total = len(ks), sum(ks)
        self.ks = list(ks)
        self.offsets = [sum(ks[:i]) for i in range(b)]  # where each image's samples start in the flat list
        self.count = [0] * b
        needs_mean = bool(outputs & {MEAN, SAMPLE_ENTROPY, MUTUAL_INFORMATION, SAMPLE_VARIANCE})
        label_dtype = torch.uint8 if num_classes <= 256 else torch.int64
        self.labels = torch.empty(total, h, w, dtype=label_dtype, device=device) if LABELS in outputs else None
        self.mean = torch.zeros(b, num_classes, h, w, device=device) if needs_mean else None
        self.m2 = torch.zeros(b, num_classes, h, w, device=device) if SAMPLE_VARIANCE in outputs else None
        self.entropies = torch.zeros(b, h, w, device=device) if MUTUAL_INFORMATION in outputs else None
        # the summary's mutual information needs the soft samples on each image's foreground pixels
        # only (``foregrounds``: (H, W) masks), a few percent of a CT crop: the sums of the samples'
        # probabilities there and of their entropies
        self.foregrounds = list(foregrounds) if foregrounds is not None else None
        if self.foregrounds is not None:
            sizes = [int(mask.sum()) for mask in self.foregrounds]  # one sync to the host, before the decoder runs
            self.fg_probs = [torch.zeros(num_classes, size, device=device) for size in sizes]
            self.fg_entropies = [torch.zeros(size, device=device) for size in sizes]

    def add(self, start: int, logits: Tensor, thresholds: Tensor | None = None) -> None:
        """``logits`` (n, C, H, W): the samples ``start .. start + n`` of the flat, image-major list.
        The labels come from the logits (``decide``, with the rounding's ``thresholds`` (n, H, W) if
        given); the soft samples only where a statistic needs them."""
        end = start + logits.shape[0]
        soft = self.mean is not None or self.entropies is not None  # statistics of the soft samples
        rounding = thresholds is not None and self.labels is not None
        probs = logits.softmax(dim=1) if soft or rounding else None  # once, for both
        if self.labels is not None:
            self.labels[start:end] = decide(logits, thresholds, probs)
        if not soft and self.foregrounds is None:
            return
        for image, (offset, k) in enumerate(zip(self.offsets, self.ks, strict=True)):
            lo, hi = max(start, offset), min(end, offset + k)
            if lo >= hi:
                continue
            if self.foregrounds is not None:
                inside = logits[lo - start : hi - start][:, :, self.foregrounds[image]].softmax(dim=1)  # (n, C, P)
                self.fg_probs[image] += inside.sum(dim=0)
                self.fg_entropies[image] += entropy(inside, dim=1).sum(dim=0)
            if not soft:
                continue
            block = probs[lo - start : hi - start]  # (n, C, H, W), this image's samples in this chunk
            n, seen = hi - lo, self.count[image]
            if self.mean is not None:
                block_mean = block.mean(dim=0)
                delta = block_mean - self.mean[image]
                if self.m2 is not None:
                    self.m2[image] += ((block - block_mean) ** 2).sum(dim=0) + delta * delta * (seen * n / (seen + n))
                self.mean[image] += delta * (n / (seen + n))
            if self.entropies is not None:
                self.entropies[image] += entropy(block, dim=1).sum(dim=0)
            self.count[image] = seen + n

    def foreground_information(self, image: int) -> Tensor:
        """The mean mutual information over the image's foreground pixels (0 where it has none)."""
        k, probs = self.ks[image], self.fg_probs[image]
        information = (entropy(probs / k, dim=0) - self.fg_entropies[image] / k).clamp_min(0.0)
        return information.sum() / max(1, information.numel())


def foreground(p_f: Tensor) -> Tensor:
    """(C, H, W) -> (H, W) bool: where F gives the non-background classes at least the threshold."""
    return (1.0 - p_f[0]) >= uncertainty_summary.FOREGROUND_THRESHOLD


def uncertainty_summaries(p_f: Tensor, labels: Tensor, information: Tensor) -> Tensor:
    """One image's summaries (``training.uncertainty_summary``, which defines them): ``p_f``
    (C, H, W), ``labels`` (k, H, W) and ``information``, the mean mutual information over the
    foreground in nats -> (4,) float32 in the order of ``NAMES``, NaN where k is too small."""
    classes, k = p_f.shape[0], labels.shape[0]
    region = foreground(p_f).float()
    pixels = region.sum()

    def region_mean(values: Tensor) -> Tensor:  # 0 where the region is empty: nothing there, no doubt
        return (values * region).sum() / pixels.clamp_min(1.0)

    scale = math.log(classes)
    nan = torch.full((), float("nan"), device=p_f.device)
    aleatoric = region_mean(entropy(p_f, dim=0)) / scale
    information = information / scale if k >= uncertainty_summary.MIN_K_MUTUAL_INFORMATION else nan
    if k >= 2:
        agree = sum((labels == c).float().mean(dim=0) ** 2 for c in range(classes))
        diversity = region_mean(k / (k - 1) * (1.0 - agree))
    else:
        diversity = nan
    return torch.stack([aleatoric, information, diversity, pixels / region.numel()]).float()


def _summarise(stats: _Stats, p_f: Tensor, outputs: set[str], wanted: set[str]) -> list[dict[str, Tensor]]:
    """Per image, the maps ``outputs`` holds (``wanted`` and what its summary needs), then only ``wanted``."""
    results = []
    for i, (offset, k) in enumerate(zip(stats.offsets, stats.ks, strict=True)):
        out: dict[str, Tensor] = {}
        if stats.labels is not None:
            out[LABELS] = stats.labels[offset : offset + k]
        if P_F in outputs:
            out[P_F] = p_f[i]
        if ALEATORIC_ENTROPY in outputs:
            out[ALEATORIC_ENTROPY] = entropy(p_f[i], dim=0)
        if stats.mean is not None:
            mean = stats.mean[i]
            sample_entropy = entropy(mean, dim=0)
            if MEAN in outputs:
                out[MEAN] = mean
            if SAMPLE_ENTROPY in outputs:
                out[SAMPLE_ENTROPY] = sample_entropy
            if stats.entropies is not None:
                # a difference of two entropies: rounding can leave it a hair below zero
                out[MUTUAL_INFORMATION] = (sample_entropy - stats.entropies[i] / k).clamp_min(0.0)
            if stats.m2 is not None:
                out[SAMPLE_VARIANCE] = (stats.m2[i] / k).sum(dim=0)  # the population variance, summed over classes
        if SUMMARY in wanted:
            out[SUMMARY] = uncertainty_summaries(p_f[i], out[LABELS], stats.foreground_information(i))
        results.append({name: value for name, value in out.items() if name in wanted})
    return results


@torch.inference_mode()
def sample(
    networks: Networks,
    images: Tensor,
    ks: Sequence[int],
    seeds: Sequence[int],
    outputs: Collection[str] = OUTPUTS,
    decode_batch: int = 64,
    amp: bool = False,
    memory_budget: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict[str, Tensor]]:
    """``images`` (B, C_in, H, W), normalised, any H, W (padded to the nets' stride and cropped
    back); ``ks`` and ``seeds`` one per image. Returns, per image, the ``outputs`` asked for (names in
    ``OUTPUTS``), on the images' device, probabilities and maps in float32. ``decode_batch`` caps
    how many samples G decodes at once, and ``memory_budget`` (bytes) caps it further by what fits;
    ``should_stop`` is asked before each chunk after the first and raises ``Stopped`` when true;
    ``amp`` runs the nets in float16 autocast (CUDA only: on a CPU, bf16 autocast made the U-Nets
    ~70x slower)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not len(ks) == len(seeds) == images.shape[0]:
        raise ValueError(f"{len(ks)} ks and {len(seeds)} seeds for {images.shape[0]} images")
    if min(ks, default=1) < 1:
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    wanted = set(outputs)
    unknown = wanted - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; expected some of {OUTPUTS}")
    calibration, refinement = networks.calibration, networks.refinement
    stride = max(calibration.config.stride, refinement.config.stride)
    padded, h, w = _pad_to(images, stride)
    device = padded.device
    if device.type == "cpu":
        padded = padded.contiguous(memory_format=torch.channels_last)  # NHWC, as load_model lays the nets out on a CPU
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" else nullcontext()
    with autocast:
        p_f = _calibrate(calibration, padded, h, w).float().softmax(dim=1)  # (B, C, Hp, Wp)
        feats = refinement.encode(padded, p_f)
    needed = wanted | ({LABELS} if SUMMARY in wanted else set())
    foregrounds = [foreground(p) for p in p_f[..., :h, :w]] if SUMMARY in wanted else None
    stats = _Stats(needed, ks, p_f.shape[1], h, w, device, foregrounds)
    z = torch.cat([noise(seed, k, refinement.config.noise_dim) for seed, k in zip(seeds, ks, strict=True)])
    rows = torch.repeat_interleave(torch.arange(len(ks), device=device), torch.tensor(list(ks), device=device))
    regions = _region_noise(refinement)
    rounding = networks.decision == ROUNDING and LABELS in needed
    thresholds = None
    if regions or rounding:
        # found on the image's own pixels, not the padding, which could join two regions; a pixel
        # within rounding of the threshold (p_F differs by ~1e-8 between batches, more between
        # devices) could still add or drop a region, which happens too rarely to have been seen
        config = refinement.config
        threshold = getattr(config, "doubt_threshold", noise_field.DEFAULT_THRESHOLD)
        grow = getattr(config, "region_grow", noise_field.DEFAULT_GROW)
        region_labels, counts = noise_field.doubt_regions(p_f[..., :h, :w], threshold, grow)
        row_counts = [counts[i] for i in rows.tolist()]
        if rounding:
            thresholds = region_thresholds(z, row_counts, per_region=regions).to(device)
        region_labels = nnf.pad(region_labels, (0, padded.shape[-1] - w, 0, padded.shape[-2] - h))
    if regions:
        z = region_vectors(z, row_counts)
    z = z.to(device)
    chunk = decode_batch
    if memory_budget is not None:
        chunk = min(chunk, MemoryModel.of(networks).chunk(padded.shape[-2] * padded.shape[-1], ks, memory_budget))
    # CAR's G in eval mode computes what an image's samples share once (training.networks.RefinementNet.share);
    # what else sits in G's slot (the baselines, the SSN) decodes each sample's copy of the features
    shared = refinement.share(feats) if isinstance(refinement, RefinementNet) and not refinement.training else None
    # the regions' shares of each cell instead of a noise map per sample, where the regions are few
    # enough for the memory model's bound on the shares: an image of many small regions of doubt
    # (noise) gets the maps
    shares = None
    if regions and shared is not None and z.shape[1] - 1 <= noise_field.MAX_SHARED_REGIONS:
        shares = noise_field.RegionShares(region_labels, z.shape[1] - 1)
    image_of = [i for i, k in enumerate(ks) for _ in range(k)]
    for start in range(0, len(rows), chunk):
        if start and should_stop is not None and should_stop():
            raise Stopped(f"stopped after {start} of {len(rows)} samples")
        idx = rows[start : start + chunk]
        first, last = image_of[start], image_of[min(start + chunk, len(rows)) - 1]
        # one image's samples broadcast its row instead of copying it per sample
        take = (lambda t, i=first: t[i : i + 1]) if first == last else (lambda t, idx=idx: t[idx])
        with autocast:
            if shares is not None:
                noise_in = noise_field.RegionNoise(shares, take, z[start : start + chunk])
            elif regions:
                noise_in = noise_field.field(region_labels[idx], z[start : start + chunk])
            else:
                noise_in = z[start : start + chunk]
            if shared is None:
                logits = refinement.decode([f[idx] for f in feats], noise_in)
            else:
                logits = refinement.decode_shared(shared, take, noise_in)
        cut = None
        if thresholds is not None:
            block = thresholds[start : start + chunk]
            cut = block[torch.arange(block.shape[0], device=device)[:, None, None], region_labels[idx][..., :h, :w]]
        stats.add(start, logits.float()[..., :h, :w], cut)
    return _summarise(stats, p_f[..., :h, :w], needed, wanted)
