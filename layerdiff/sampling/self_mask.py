"""Self-mask guidance (METHOD.md section 4): each foreground's image is degraded inside its own
predicted mask, and the prediction is pushed away from the degraded one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from layerdiff.config import IMAGE_CHANNELS
from layerdiff.sampling.hooks import Hook, Step
from layerdiff.sampling.masks import gaussian_blur, read_masks


def blur_layers(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """gaussian_blur of (B, K, C, h, w) latents."""
    B = x.shape[0]
    return rearrange(gaussian_blur(rearrange(x, "b k c h w -> (b k) c h w"), sigma), "(b k) c h w -> b k c h w", b=B)


class SelfMaskGuidance(Hook):
    """From step ``start`` on: an extra unconditional pass on the input with each foreground's
    detail (what blur(x0) lacks) removed inside its mask, both read from the previous step's
    prediction (so the pass is batched with the others); ``guided += scale * (uncond - degraded)``.
    The mask is eroded by ``erode`` latent pixels (0: the whole mask)."""

    def __init__(self, scale: float, start: int, blur: float, erode: int, mask_axis):
        self.scale, self.start_at, self.blur, self.erode = scale, start, blur, int(erode)
        self.mask_axis = mask_axis
        self.reset()

    def reset(self) -> None:
        self.x0_prev = self.mask_prev = None

    def extra_pass(self, step: Step) -> torch.Tensor | None:
        if step.index < self.start_at or self.x0_prev is None:
            return None
        image = self.x0_prev[:, 1:, :IMAGE_CHANNELS]  # (B, K, 4, h, w)
        detail = image - blur_layers(image, self.blur)
        x_deg = step.x_in.clone()
        x_deg[:, 1:, :IMAGE_CHANNELS] -= math.sqrt(step.a) * self.mask_prev[:, :, None] * detail
        return x_deg

    def post_cfg(self, step: Step, eps: torch.Tensor) -> None:
        step.guided = step.guided + self.scale * (step.eps[1] - eps)

    def after_prediction(self, step: Step) -> None:
        self.x0_prev = step.x0_from(step.eps[1]) if len(step.eps) > 1 else step.x0
        mask = (read_masks(step.x0, *self.mask_axis) > 0.5).to(step.x0.dtype)  # (B, K, h, w)
        if self.erode:  # the masks' interiors: guidance sharpens content, not outlines
            r = self.erode
            mask = -F.max_pool2d(-mask, 2 * r + 1, stride=1, padding=r)
        self.mask_prev = mask
