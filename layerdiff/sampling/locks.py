"""RePaint locks (METHOD.md section 5): latents kept fixed during sampling, for editing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerdiff.config import IMAGE_CHANNELS
from layerdiff.sampling.hooks import Hook


@dataclass
class Lock:
    """Latents kept fixed during sampling (RePaint): where ``mask`` is True, the result is ``latents``.

    latents (B, L, 8, h, w) clean; mask bool, broadcastable to it: (B, L, 1, 1, 1) locks whole
    layers, (B, L, 8, 1, 1) single channels (e.g. a layer's mask), (B, L, 1, h, w) regions.
    """

    latents: torch.Tensor
    mask: torch.Tensor

    @staticmethod
    def layers(latents: torch.Tensor, keep: list[int]) -> Lock:
        """Lock whole layers by index (every other layer is generated)."""
        B, L = latents.shape[:2]
        mask = torch.zeros(B, L, 1, 1, 1, dtype=torch.bool, device=latents.device)
        mask[:, keep] = True
        return Lock(latents, mask)

    def expanded(self) -> torch.Tensor:
        return self.mask.to(torch.bool).expand_as(self.latents)

    def mask_locked(self) -> torch.Tensor:
        """(B, L-1) bool: foregrounds whose mask channels are locked everywhere (their place is fixed:
        layout cleanup gives them priority and never changes them)."""
        return self.expanded()[:, 1:, IMAGE_CHANNELS:].flatten(2).all(dim=2)


class LockHook(Hook):
    """Applies a :class:`Lock`: locked entries start at, and after every step return to, the lock's
    clean latents noised to that step's level (fresh noise from each sample's generator); the result
    holds them bit-identical."""

    def __init__(self, lock: Lock, levels, start: int, device):
        self.lock, self.levels, self.start_at = lock, levels, start
        self.locked = lock.expanded().to(device)
        self.clean = lock.latents.to(device=device, dtype=torch.float32)

    def start(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return torch.where(self.locked, self.levels.noise_to(self.clean, noise, self.start_at), x)

    def after_step(self, x: torch.Tensor, index: int, noise) -> torch.Tensor:
        return torch.where(self.locked, self.levels.noise_to(self.clean, noise(), index), x)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.locked, self.lock.latents.to(x.device), x.to(self.lock.latents.dtype))
