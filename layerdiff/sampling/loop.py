"""The sampling loop: denoise a batch of layer stacks, calling the hooks of each concept.

Latents are (B, L, 8, h, w): per layer 4 image and 4 mask channels. The loop reasons in the
variance-preserving space the UNet sees (``x_vp = sqrt(a) x0 + sqrt(1 - a) eps``), so the hooks
work with every sampler.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch

from layerdiff.config import LAYER_CHANNELS
from layerdiff.errors import Interrupted, LayerDiffError
from layerdiff.sampling.checks import check_sample_args
from layerdiff.sampling.guidance import ClassifierFreeGuidance
from layerdiff.sampling.hooks import Hook, Step
from layerdiff.sampling.layout import LayoutCleanup
from layerdiff.sampling.layout_prior import LayoutPriorStart, coverage
from layerdiff.sampling.locks import LockHook
from layerdiff.sampling.retry import EmptyLayerRetry
from layerdiff.sampling.schedulers import NoiseLevels, draw_noise, make_scheduler, max_steps, start_scheduler
from layerdiff.sampling.self_mask import SelfMaskGuidance

Callback = Callable[[int, int, torch.Tensor], object]


def _from(fraction: float, start: int, n: int) -> int:
    """The first step index after ``fraction`` of the steps from ``start`` to ``n``."""
    return start + int(math.ceil(fraction * (n - start)))


def make_hooks(s, cond, levels, start: int, n: int, seeds, shape, device, mask_axis, empty_latent, lock,
               unet=None, init_sigma: float = 1.0) -> list[Hook]:
    """The hooks ``s`` (resolved settings) switches on, in the order the loop calls them."""
    K = cond.num_layers - 1
    hooks: list[Hook] = []
    if s.layout_prior > 0 and K > 0 and start == 0 and lock is None and unet is not None:
        cover = coverage(unet, cond.layer_words, tuple(shape[-2:]))
        if cover is not None:  # a model without a layout prior samples as without the setting
            hooks.append(LayoutPriorStart(s.layout_prior, cover, mask_axis, cond.valid, float(levels.a[start]),
                                          init_sigma))
    lock_hook = LockHook(lock, levels, start, device) if lock is not None else None
    if lock_hook is not None:
        hooks.append(lock_hook)
    if s.mask_guidance > 0 and K > 0:
        hooks.append(SelfMaskGuidance(s.mask_guidance, _from(s.mask_guidance_start, start, n), s.mask_guidance_blur,
                                      s.mask_guidance_erode, mask_axis))
    if s.layout_cleanup and K > 0:
        priority = lock.mask_locked().to(device) if lock is not None else None
        hooks.append(LayoutCleanup(s.layout_cleanup, _from(s.layout_cleanup_start, start, n), mask_axis,
                                   empty_latent, priority, cond.valid))
    check_at = _from(s.empty_layer_check, start, n)
    if s.empty_layer_retries > 0 and K > 0 and start == 0 and check_at < n:
        hooks.append(EmptyLayerRetry(s.empty_layer_retries, check_at, n, mask_axis, cond.valid,
                                     lock_hook.locked if lock_hook else None, seeds, shape))
    return hooks


@torch.no_grad()
def sample(unet, cond, height: int, width: int, seeds: list[int], settings=None, *, scheduler_config: dict | None = None,
           mask_axis: tuple[torch.Tensor, torch.Tensor] | None = None, empty_latent: torch.Tensor | None = None,
           lock=None, init_latents: torch.Tensor | None = None, strength: float = 1.0,
           callback: Callback | None = None, max_batch: int | None = None) -> torch.Tensor:
    """Denoise a batch of layer stacks; returns clean latents (B, L, 8, h, w).

    height/width are latent sizes; ``seeds`` one per sample (same seed -> same result). ``settings``
    (:class:`layerdiff.settings.SamplerSettings`; None fields: ``settings.PLAIN``) choose sampler,
    guidance and the hooks; self-mask guidance, layout cleanup and empty-layer retries need
    ``mask_axis`` and layout cleanup ``empty_latent`` (the model bundle's ``mask_axis()`` and
    ``empty_layer_latent()``). ``lock`` keeps latents fixed (editing); ``init_latents`` with
    ``strength`` < 1 starts from those latents noised part-way (restyling), strength 0 returns them.
    ``callback(step, total, x0)`` runs after every step; returning False (or raising) stops sampling
    with :class:`Interrupted`. ``max_batch`` splits the UNet batch.
    """
    seeds, s = check_sample_args(unet, cond, height, width, seeds, settings, scheduler_config, mask_axis,
                                 empty_latent, lock, init_latents, strength, callback, max_batch)
    B, L = cond.batch_size, cond.num_layers
    device, dtype, shape = unet.device, unet.dtype, (B, L, LAYER_CHANNELS, height, width)
    if init_latents is not None and strength == 0.0:
        return init_latents.clone()
    partial = init_latents is not None and strength < 1.0
    sched = make_scheduler(s.sampler, s.scheduler, scheduler_config or {})
    # a v-prediction model's output is turned into the noise it predicts: guidance, the hooks and
    # the scheduler (made for the noise by make_scheduler) all work on noise predictions
    v_prediction = (scheduler_config or {}).get("prediction_type") == "v_prediction"
    if s.steps > max_steps(sched):
        raise LayerDiffError(f"steps {s.steps} is more than this model's schedule allows: use at most {max_steps(sched)}")
    sched.set_timesteps(s.steps, device=device)
    n = len(sched.timesteps)
    levels = NoiseLevels(sched, n)
    start = min(n - 1, int(round(n * (1.0 - strength)))) if partial else 0
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    hooks = make_hooks(s, cond, levels, start, n, seeds, shape, device, mask_axis, empty_latent, lock, unet,
                       float(sched.init_noise_sigma))
    cfg = ClassifierFreeGuidance(s.cfg, s.background_cfg, L, device)
    accepted = inspect.signature(sched.step).parameters
    step_kwargs = {"eta": s.eta} if "eta" in accepted else {}

    def begin(replaced: dict):
        """Per-sample generators and starting latents, with the noise of ``replaced`` swapped in."""
        gens = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        noise = draw_noise(shape, gens, device, torch.float32)
        for (b, layer), z in replaced.items():
            noise[b, layer] = z.to(device)
        x = levels.noise_to(init_latents.float(), noise, start) if partial else noise * float(sched.init_noise_sigma)
        for hook in hooks:
            x = hook.start(x, noise)
        if "generator" in accepted:  # ancestral samplers: per-sample noise from each sample's seed
            step_kwargs["generator"] = gens[0] if B == 1 else gens
        return gens, x

    gens, x = begin({})
    reported, i = 0, start
    while i < n:
        t = sched.timesteps[i]
        step = Step(i, t, levels.a[i], sched.scale_model_input(x, t))
        extra = [(hook, hook.extra_pass(step)) for hook in hooks]
        extra = [(hook, x_extra) for hook, x_extra in extra if x_extra is not None]
        inputs = [step.x_in] + ([step.x_in] if cfg.active or extra else []) + [x_extra for _, x_extra in extra]
        step.eps = _predict(unet, inputs, t, cond, dtype, max_batch)
        if v_prediction:  # every pass as the noise it predicts, from its own input
            step.eps = tuple(math.sqrt(step.a) * v + math.sqrt(1 - step.a) * x_pass.float()
                             for v, x_pass in zip(step.eps, inputs))
        step.guided = cfg(step.eps)
        for (hook, _), eps in zip(extra, step.eps[2:]):
            hook.post_cfg(step, eps)
        step.x0 = step.x0_from(step.guided)
        for hook in hooks:
            hook.on_prediction(step)
        replaced = next((r for r in (hook.restart(step) for hook in hooks) if r is not None), None)
        if replaced is not None:  # start again; multistep solvers keep state: a fresh scheduler
            sched = start_scheduler(s.sampler, s.scheduler, scheduler_config or {}, s.steps, start, device)
            gens, x = begin(replaced)
            for hook in hooks:
                hook.reset()
            i = start
            continue
        for hook in hooks:
            hook.after_prediction(step)
        x = sched.step(step.guided, t, x, **step_kwargs).prev_sample
        noise = functools.partial(draw_noise, shape, gens, device, torch.float32)  # drawn only if a hook asks
        for hook in hooks:
            x = hook.after_step(x, i + 1, noise)
        if callback is not None and i - start + 1 > reported:  # a restart replays steps: reported once
            reported = i - start + 1
            if callback(reported, n - start, step.x0) is False:
                raise Interrupted(f"sampling stopped at step {reported} of {n - start}")
        i += 1
    return hooks[0].finish(x) if lock is not None else x.to(dtype)


def _predict(unet, inputs: list[torch.Tensor], t, cond, dtype, max_batch) -> tuple[torch.Tensor, ...]:
    """The UNet on every pass at once: the first with the conditional tokens, the rest unconditional."""
    k = len(inputs) - 1
    glob = torch.cat([cond.global_tokens] + [cond.uncond_global_tokens] * k)
    lay = torch.cat([cond.layer_tokens] + [cond.uncond_layer_tokens] * k)
    valid = torch.cat([cond.valid] * (k + 1))
    x = torch.cat(inputs).to(dtype)
    if not max_batch or x.shape[0] <= max_batch:
        eps = unet(x, t, glob, lay, valid=valid)
    else:
        eps = torch.cat([unet(x[j : j + max_batch], t, glob[j : j + max_batch], lay[j : j + max_batch],
                              valid=valid[j : j + max_batch]) for j in range(0, x.shape[0], max_batch)])
    return eps.float().chunk(len(inputs))
