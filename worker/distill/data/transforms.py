"""Batched, device-agnostic tensor transforms: training augmentation and the model's input conversion."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DatasetError
from ..spec import InputSpec

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def augment_batch(images: torch.Tensor, generator: torch.Generator, *, hflip: bool = True) -> torch.Tensor:
    """Random crop with zero padding of max(1, size // 8) pixels, then a random horizontal flip (p = 0.5).

    uint8 [B, C, H, W] in, same shape and dtype out; all randomness comes from `generator`.
    """
    b, c, h, w = images.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    # Drawn on the generator's device (CPU), then moved: the same seed gives the same batch anywhere.
    oy = torch.randint(0, 2 * ph + 1, (b,), generator=generator, device=generator.device)
    ox = torch.randint(0, 2 * pw + 1, (b,), generator=generator, device=generator.device)
    flip = (torch.rand(b, generator=generator, device=generator.device) < 0.5) if hflip else None
    dev = images.device
    oy, ox = oy.to(dev), ox.to(dev)
    rows = oy[:, None] + torch.arange(h, device=dev)  # [B, H] rows of the padded image
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip is not None:
        cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    cols = ox[:, None] + cols  # [B, W]
    padded = F.pad(images, (pw, pw, ph, ph))
    # two gathers, rows then columns, do crop and flip at once and keep the NCHW layout
    out = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * pw))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


@dataclass
class MixedBatch:
    """`images` = lam * original + (1 - lam) * original[perm] (mixup), or original[perm] pasted into a box
    covering 1 - lam of each image (cutmix); labels mix with the same lam."""

    images: torch.Tensor
    perm: torch.Tensor
    lam: float
    kind: str  # "mixup" or "cutmix"


def mix_batch(images: torch.Tensor, generator: torch.Generator) -> MixedBatch:
    """Mixup (Zhang et al. 2018) or cutmix (Yun et al. 2019), half the batches each, lam ~ Beta(1, 1).

    The mixing function matching uses (Beyer et al. 2022, arXiv:2106.05237): one draw per batch, uint8 in and
    out, all randomness from `generator` so a resumed epoch replays it.
    """
    b, _, h, w = images.shape
    g = generator.device
    perm = torch.randperm(b, generator=generator, device=g).to(images.device)
    lam = float(torch.rand((), generator=generator, device=g))  # Beta(1, 1) is uniform
    if float(torch.rand((), generator=generator, device=g)) < 0.5:
        mixed = images.float() * lam + images[perm].float() * (1.0 - lam)
        return MixedBatch(mixed.round_().clamp_(0, 255).to(torch.uint8), perm, lam, "mixup")
    # a box of area (1 - lam) * h * w, centred anywhere, clipped at the borders; lam then follows the box
    cut_h, cut_w = int(h * (1.0 - lam) ** 0.5), int(w * (1.0 - lam) ** 0.5)
    cy = int(torch.randint(0, h, (), generator=generator, device=g))
    cx = int(torch.randint(0, w, (), generator=generator, device=g))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
    return MixedBatch(mixed, perm, 1.0 - (y1 - y0) * (x1 - x0) / (h * w), "cutmix")


def to_model_input(images: torch.Tensor, spec: InputSpec, *,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, C, H, W] → float in `spec`'s channels and size, scaled to [0, 1] and normalised."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 [B, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
    x = images.to(torch.float32).div_(255.0)  # float32 throughout: antialiased resizing lacks half kernels
    if x.shape[1] > spec.channels:  # shrink channels before resizing, grow them after: fewer pixels to resize
        x = adapt_channels(x, spec.channels)
    if tuple(x.shape[2:]) != tuple(spec.size):
        x = F.interpolate(x, size=tuple(spec.size), mode="bilinear", antialias=True, align_corners=False)
    x = adapt_channels(x, spec.channels)
    mean = torch.tensor(spec.resolved_mean(), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.resolved_std(), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).to(dtype)  # out of place: x may be an expanded view of a grey channel


def adapt_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Float [B, C, H, W] → `channels`: grey repeated, RGB to BT.601 luma, alpha dropped or added opaque."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 4:
        x, c = x[:, :3], 3
    if c == 1 and channels >= 3:
        x, c = x.expand(-1, 3, -1, -1), 3
    if c == 3 and channels == 1:
        luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * luma).sum(dim=1, keepdim=True)
    if c == 3 and channels == 4:
        return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    if c == channels:
        return x
    raise DatasetError(f"images with {x.shape[1]} channel(s) cannot be fed to a model expecting {channels}",
                       code="channel_mismatch")
