"""Classifier-free guidance over the layer stack, with its own scale for the background layer."""

from __future__ import annotations

import torch


class ClassifierFreeGuidance:
    """``uncond + scale * (cond - uncond)``; the foregrounds use ``cfg``, the background layer
    ``background_cfg`` (None: ``cfg``). A scale of 1 everywhere needs no unconditional pass."""

    def __init__(self, cfg: float, background_cfg: float | None, num_layers: int, device):
        self.active = cfg != 1.0 or (background_cfg is not None and background_cfg != 1.0)
        self.scale: float | torch.Tensor = cfg
        if background_cfg is not None and background_cfg != cfg:  # per layer: (1, L, 1, 1, 1)
            self.scale = torch.full((1, num_layers, 1, 1, 1), float(cfg), device=device)
            self.scale[:, 0] = float(background_cfg)

    def __call__(self, eps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return eps[1] + self.scale * (eps[0] - eps[1]) if self.active else eps[0]
