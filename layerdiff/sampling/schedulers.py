"""Samplers and schedulers (diffusers), and the noise levels of their steps in VP terms.

A sampler (the solver) and a scheduler (the spacing of its noise levels) are separate choices, as in
ComfyUI: :data:`layerdiff.settings.SAMPLERS` x :data:`layerdiff.settings.SCHEDULERS`.
"""

from __future__ import annotations

import math

import torch

from layerdiff.errors import LayerDiffError
from layerdiff.settings import SAMPLERS, SCHEDULERS, split_sampler

# sampler -> (diffusers class name, extra config); DDIM is the paper's sampler and the default
SAMPLER_CLASSES: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "uni_pc": ("UniPCMultistepScheduler", {}),
}
SCHEDULER_CONFIG: dict[str, dict] = {"normal": {}, "karras": {"use_karras_sigmas": True}}
_VE_SCHEDULERS = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"}  # x = x0 + sigma * eps


def make_scheduler(sampler: str, scheduler: str | None, config: dict):
    """A fresh diffusers scheduler for ``sampler`` with ``scheduler``'s noise levels, from the
    model's scheduler config. It steps with noise predictions whatever the model predicts (the
    sampling loop turns a v-prediction into the noise it predicts)."""
    import diffusers

    sampler, scheduler = split_sampler(sampler, scheduler)
    if sampler not in SAMPLER_CLASSES:
        raise LayerDiffError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if (scheduler or "normal") not in SCHEDULER_CONFIG:
        raise LayerDiffError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SAMPLER_CLASSES[sampler]
    cls = getattr(diffusers, cls_name)
    return cls.from_config({**config, **extra, **SCHEDULER_CONFIG[scheduler or "normal"], "prediction_type": "epsilon"})


def start_scheduler(sampler: str, scheduler: str | None, config: dict, steps: int, start: int, device):
    """make_scheduler with its timesteps set and its first step at index ``start``."""
    sched = make_scheduler(sampler, scheduler, config)
    sched.set_timesteps(steps, device=device)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    return sched


def max_steps(sched) -> int:
    return int(sched.config.num_train_timesteps) - int(sched.config.get("steps_offset", 0) or 0)


class NoiseLevels:
    """Noise levels of a scheduler's steps in VP terms: a_bar at step i (i == n: clean)."""

    def __init__(self, scheduler, n: int):
        self.scheduler = scheduler
        self.n = n
        self.ve = type(scheduler).__name__ in _VE_SCHEDULERS
        sigmas = getattr(scheduler, "sigmas", None)
        ts = scheduler.timesteps
        a = []
        for i in range(n):
            if sigmas is not None and len(sigmas) > i:
                s = float(sigmas[i])
                a.append(1.0 / (1.0 + s * s))
            else:
                # steps_offset can push the first timestep to num_train_timesteps: clamp
                t = min(int(ts[i]), len(scheduler.alphas_cumprod) - 1)
                a.append(float(scheduler.alphas_cumprod[t]))
        self.a = a + [1.0]

    def noise_to(self, clean: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """clean latents noised to the level of step i, in the scheduler's own space."""
        a = self.a[i]
        if i >= self.n:
            return clean
        if self.ve:
            return clean + math.sqrt((1 - a) / a) * noise
        return math.sqrt(a) * clean + math.sqrt(1 - a) * noise


def draw_noise(shape, generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """Per-sample noise drawn on the CPU (same numbers on every device), stacked on dim 0."""
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(
        device=device, dtype=dtype
    )
