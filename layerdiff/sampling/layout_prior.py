"""Layout prior: where each foreground's prompt puts its object, written into the starting noise.

A model with a layout prior (``LayerDiffConfig.layout_prior``, in its prompt enhancer) maps each
layer prompt's words to a coverage map: the chance that its object covers each latent pixel ("on
the left": the left third; no position word: the data's spread). A small UNet at a small latent reads its layout off the starting
noise (whatever blob the noise happens to hold becomes the object), so the hook adds that map,
centred, to each foreground's mask channels of the starting latents, along the axis from a black to
a white mask latent: ``strength * sqrt(a_first) * (p - mean p) * (white - black)``, i.e. the layout
as it would show in the noisy latent were its signal ``strength`` times stronger. Image channels,
the background, padding slots and partial starts (restyling) are left alone.
"""

from __future__ import annotations

import math

import torch

from layerdiff.sampling.hooks import Hook


def coverage(unet, layer_words: torch.Tensor | None, latent_size: tuple[int, int]) -> torch.Tensor | None:
    """(B, L, T', D) the layer prompts' input word embeddings -> (B, L-1, h, w) foreground coverage in
    0..1, or None for a model without a layout prior (or conditioning without the words)."""
    if layer_words is None or not hasattr(unet, "layout_logits"):
        return None
    logits = unet.layout_logits(layer_words, latent_size)
    return None if logits is None else torch.sigmoid(logits[:, 1:].float())


class LayoutPriorStart(Hook):
    """Adds each foreground's centred coverage map to its mask channels of the starting latents."""

    def __init__(self, strength: float, cover: torch.Tensor, mask_axis, valid: torch.Tensor, a_first: float,
                 init_sigma: float):
        white, black = mask_axis
        axis = (white - black).float()  # (4,)
        centred = cover - cover.mean((2, 3), keepdim=True)  # (B, K, h, w)
        keep = valid[:, 1:, None, None].to(centred)
        self.bias = (strength * math.sqrt(a_first) * init_sigma) * (centred * keep)[:, :, None] * axis[:, None, None]

    def start(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, 1:, 4:] += self.bias.to(device=x.device, dtype=x.dtype)
        return x
