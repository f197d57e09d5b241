"""Masks read from predicted clean latents without decoding, and the blur self-mask guidance uses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from layerdiff.config import IMAGE_CHANNELS


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Depthwise Gaussian blur of (N, C, h, w), reflect padding."""
    radius = max(1, math.ceil(3 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    C = x.shape[1]
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if pad < radius:  # tiny latents: fall back to zero padding beyond what reflect allows
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        x = F.pad(x, (radius - pad,) * 4)
    else:
        x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)


def read_masks(x0: torch.Tensor, white: torch.Tensor, black: torch.Tensor) -> torch.Tensor:
    """Soft foreground masks at latent resolution from predicted clean latents, without decoding.

    x0 (B, L, 8, h, w) -> (B, L-1, h, w) in ~[0, 1]: each mask latent projected on the axis from the
    latent of an all-black image (0) to that of an all-white image (1).
    """
    axis = (white - black).to(x0)
    m = x0[:, 1:, IMAGE_CHANNELS:] - black.to(x0)[None, None, :, None, None]  # (B, K, 4, h, w)
    return torch.einsum("bkchw,c->bkhw", m, axis) / axis.dot(axis)


# read_masks gives the covered fraction of a latent pixel: above this, some of the image pixels it
# decodes to may be mask
PRESENCE = 0.1
