"""The sampling loop's extension points: the :class:`Step` it fills in, and :class:`Hook`, whose
methods it calls at fixed points of every step (the way ComfyUI's post-CFG functions work).

Order within a step: ``extra_pass`` (hooks may ask for one more UNet pass, run with the
unconditional tokens, batched with the others) -> UNet -> classifier-free guidance -> ``post_cfg``
-> the clean prediction x0 -> ``on_prediction`` (may rewrite x0) -> ``restart`` (may ask the loop to
start again with new noise) -> ``after_prediction`` -> the scheduler's step -> ``after_step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Step:
    """One denoising step as the hooks see it; latents are (B, L, 8, h, w) in VP space."""

    index: int  # the step's index in the scheduler's timesteps
    t: torch.Tensor  # its timestep
    a: float  # alpha_bar at this step
    x_in: torch.Tensor  # the UNet's input
    eps: tuple[torch.Tensor, ...] = ()  # predictions: conditional, unconditional, then the hooks' passes
    guided: torch.Tensor | None = None  # the noise prediction the scheduler steps with
    x0: torch.Tensor | None = None  # the clean latents ``guided`` predicts

    def x0_from(self, eps: torch.Tensor) -> torch.Tensor:
        return (self.x_in - math.sqrt(1 - self.a) * eps) / math.sqrt(self.a)

    def eps_from(self, x0: torch.Tensor) -> torch.Tensor:
        return (self.x_in - math.sqrt(self.a) * x0) / math.sqrt(1 - self.a)


class Hook:
    """A sampling concept plugged into the loop; every method is optional (the default does nothing)."""

    def start(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The starting latents (and their noise), at the start and at every restart."""
        return x

    def extra_pass(self, step: Step) -> torch.Tensor | None:
        """An extra UNet input for this step, predicted with the unconditional tokens (or None)."""
        return None

    def post_cfg(self, step: Step, eps: torch.Tensor) -> None:
        """After CFG, with the prediction of this hook's extra pass: may change ``step.guided``."""

    def on_prediction(self, step: Step) -> None:
        """May change ``step.x0`` (and then ``step.guided`` with it)."""

    def restart(self, step: Step) -> dict[tuple[int, int], torch.Tensor] | None:
        """New starting noise for some (sample, layer) entries, to start sampling again; None: go on."""
        return None

    def after_prediction(self, step: Step) -> None:
        """Sees the step's final prediction, before the scheduler steps."""

    def after_step(self, x: torch.Tensor, index: int, noise) -> torch.Tensor:
        """The latents after the scheduler's step to level ``index``; ``noise()`` draws fresh noise."""
        return x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's result."""
        return x

    def reset(self) -> None:
        """Forget what earlier steps left (sampling starts again)."""
