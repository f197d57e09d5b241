"""Empty-layer retry: a foreground the prompt asked for must not vanish."""

from __future__ import annotations

import logging

import torch

from layerdiff import limits
from layerdiff.sampling.hooks import Hook, Step
from layerdiff.sampling.masks import read_masks

logger = logging.getLogger("layerdiff.sampling")

RETRY_SEED_OFFSET = 0x5EED  # the stream of new noise: each sample's seed + this


class EmptyLayerRetry(Hook):
    """At step ``check_at``, every foreground with no latent pixel of its predicted mask above 0.5
    (padding and locked layers excepted) gets new starting noise and sampling starts again, at most
    ``retries`` times. The new noise comes from a stream of each sample's own seed, so results stay
    deterministic; other layers keep their noise."""

    def __init__(self, retries: int, check_at: int, total: int, mask_axis, valid, locked, seeds, shape):
        self.retries, self.check_at, self.total = retries, check_at, total
        self.mask_axis, self.valid, self.locked = mask_axis, valid, locked
        self.seeds, self.shape = seeds, shape
        self.tries = 0
        self.generators = None
        self.replaced: dict[tuple[int, int], torch.Tensor] = {}

    def restart(self, step: Step) -> dict[tuple[int, int], torch.Tensor] | None:
        if step.index != self.check_at or self.tries >= self.retries:
            return None
        present = read_masks(step.x0, *self.mask_axis).flatten(2).amax(-1) > 0.5  # (B, K)
        gone = ~present & self.valid[:, 1:].to(present.device)
        if self.locked is not None:
            gone &= ~self.locked[:, 1:].flatten(2).any(-1)
        if not bool(gone.any()):
            return None
        self.tries += 1
        if self.generators is None:
            self.generators = [torch.Generator("cpu").manual_seed((int(s) + RETRY_SEED_OFFSET) % (limits.SEED_MAX + 1))
                               for s in self.seeds]
        for b, k in gone.nonzero().tolist():
            self.replaced[(b, k + 1)] = torch.randn(self.shape[2:], generator=self.generators[b], dtype=torch.float32)
        logger.info("%d empty foreground(s) after step %d of %d: new noise for them, try %d of %d",
                    int(gone.sum()), step.index + 1, self.total, self.tries, self.retries)
        return self.replaced
