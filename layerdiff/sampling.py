"""Layered sampler: classifier-free guidance over global + layer prompts, self-mask guidance
(METHOD.md section 4) and RePaint-style locks for editing (section 5).

All latents are (B, L, 8, h, w): per layer 4 image and 4 mask channels. The sampler works with any
of the diffusers schedulers in :data:`SCHEDULERS`; internally it reasons in the variance-preserving
space that the UNet sees (``x_vp = sqrt(a) x0 + sqrt(1 - a) eps``), so self-mask guidance and locks
are scheduler-independent.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from layerdiff import limits
from layerdiff.errors import Interrupted, LayerDiffError

logger = logging.getLogger("layerdiff.sampling")

# name -> (diffusers class name, extra config); DDIM is the paper's sampler and the default.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}
_VE_SCHEDULERS = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"}  # x = x0 + sigma * eps

Callback = Callable[[int, int, torch.Tensor], object]


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler by name, from the model's scheduler config."""
    import diffusers

    try:
        cls_name, extra = SCHEDULERS[name]
    except KeyError:
        raise LayerDiffError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}") from None
    cls = getattr(diffusers, cls_name)
    return cls.from_config({**config, **extra})


@dataclass
class LayerConditioning:
    """Encoded prompts for a batch (ComfyUI type ``LAYERDIFF_CONDITIONING``).

    global_tokens (B, T, D); layer_tokens (B, L, T, D) *enhanced*; the unconditional (or negative)
    versions of both; valid (B, L) bool.
    """

    global_tokens: torch.Tensor
    layer_tokens: torch.Tensor
    uncond_global_tokens: torch.Tensor
    uncond_layer_tokens: torch.Tensor
    valid: torch.Tensor
    global_prompts: tuple[str, ...] = ()
    layer_prompts: tuple[tuple[str, ...], ...] = ()
    negative_prompt: str = ""

    @property
    def batch_size(self) -> int:
        return self.global_tokens.shape[0]

    @property
    def num_layers(self) -> int:
        return self.layer_tokens.shape[1]

    def repeat(self, n: int) -> LayerConditioning:
        """Each sample repeated n times (sample-major), for batch generation from one prompt set."""
        if n == 1:
            return self
        r = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        return LayerConditioning(
            r(self.global_tokens), r(self.layer_tokens), r(self.uncond_global_tokens), r(self.uncond_layer_tokens),
            r(self.valid), tuple(p for p in self.global_prompts for _ in range(n)),
            tuple(p for p in self.layer_prompts for _ in range(n)), self.negative_prompt,
        )


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
        return self.expanded()[:, 1:, 4:].flatten(2).all(dim=2)


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
    m = x0[:, 1:, 4:] - black.to(x0)[None, None, :, None, None]  # (B, K, 4, h, w)
    return torch.einsum("bkchw,c->bkhw", m, axis) / axis.dot(axis)


# read_masks is calibrated as the covered fraction of a latent pixel: above this, some of its image
# pixels may be mask (toy model: 29% of latent pixels at 0.1-0.2 and 86% at 0.2-0.3 decode to some
# mask pixels; with a sharper decoder, claims from 0.2 still left 5% of 3-4-layer scenes overlapping)
PRESENCE = 0.1


def _components(hard: torch.Tensor) -> torch.Tensor:
    """8-connected components of (N, h, w) bool: a label per True pixel (the smallest flat index in
    its component), h * w where False. Min-label propagation; latent grids are small."""
    N, h, w = hard.shape
    none = float(h * w)
    idx = torch.arange(h * w, dtype=torch.float32, device=hard.device).view(1, h, w).expand(N, -1, -1)
    lab = torch.where(hard, idx, torch.full_like(idx, none))
    for _ in range(h * w):
        low = -F.max_pool2d(-lab[:, None], 3, stride=1, padding=1)[:, 0]
        new = torch.where(hard, torch.minimum(lab, low), lab)
        if torch.equal(new, lab):
            break
        lab = new
    return lab.long()


def clean_layout(
    x0: torch.Tensor,
    white: torch.Tensor,
    black: torch.Tensor,
    empty: torch.Tensor,
    strength: float = 1.0,
    priority: torch.Tensor | None = None,
    gap: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predicted clean latents with each foreground reduced to one object and no two foregrounds
    claiming the same place (layout cleanup: our addition to the sampler of METHOD.md section 4).

    x0 (B, L, 8, h, w); ``empty`` (8,) the latent of an empty foreground layer (neutral fill image,
    black mask). On the masks read from x0 (:func:`read_masks`): per foreground, every connected
    group of mask pixels (> 0.5; pixels one latent pixel apart count as one group) except the one
    with the most mask mass is emptied, with a one-pixel margin. Where several foregrounds claim a
    pixel (> :data:`PRESENCE`), the one with the least mask mass (the smaller object, in front)
    keeps it, and between equal masses the stronger mask; with ``gap``, a pixel next to another
    foreground's winning mask pixel is emptied too, as decoded masks spread a little past their
    latent pixels. ``priority`` (B, K) bool: these layers (e.g. locked ones) always win
    and are never changed; ``valid`` (B, L) bool: padding layers of a mixed batch take no part.
    ``strength`` in 0..1 blends the emptied places towards ``empty``. The background never changes.
    """
    B, L = x0.shape[:2]
    K = L - 1
    if K < 1 or strength <= 0:
        return x0
    soft = read_masks(x0, white, black)  # (B, K, h, w)
    if valid is not None:
        soft = soft * valid[:, 1:, None, None].to(soft)
    h, w = soft.shape[-2:]
    hard = soft > 0.5
    flat_hard = rearrange(hard, "b k h w -> (b k) h w")
    grown = F.max_pool2d(flat_hard[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    lab = _components(grown)  # groups of the grown mask: a one-pixel gap does not split an object
    mass = torch.zeros(B * K, h * w + 1, device=x0.device)
    mass.scatter_add_(1, lab.flatten(1), rearrange(soft.clamp(min=0) * hard, "b k h w -> (b k) (h w)"))
    best = mass[:, : h * w].argmax(dim=1)  # (B*K,)
    keep = (lab == best[:, None, None]) & grown  # the main group, grown by a pixel
    stray = grown & ~keep
    stray = F.max_pool2d(stray[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    drop = rearrange(stray & ~(keep & flat_hard), "(b k) h w -> b k h w", b=B)
    kept = (soft > PRESENCE) & ~drop  # a latent pixel partly covered decodes to mask pixels too
    if K > 1:  # overlaps between foregrounds: one layer (a priority layer first) keeps each pixel
        # the smaller object sits in front: it keeps a shared pixel whatever the mask strengths (a
        # small object inside a large one's claim would otherwise lose its whole place); equal
        # sizes fall back to the stronger mask
        amount = (soft * kept).flatten(2).sum(-1)  # (B, K) mask mass of each foreground
        front = 10.0 * (1.0 - amount / amount.amax(dim=1, keepdim=True).clamp(min=1e-6))
        score = torch.where(kept, soft + front[:, :, None, None], torch.full_like(soft, -1.0))
        if priority is not None:
            score = score + 1e3 * priority.to(score.device)[:, :, None, None].to(score.dtype) * kept
        winner = score.argmax(dim=1, keepdim=True)  # (B, 1, h, w)
        k_idx = torch.arange(K, device=x0.device).view(1, K, 1, 1)
        claimed = kept.sum(dim=1, keepdim=True) > 1
        drop = drop | (kept & claimed & (k_idx != winner))
        if gap:  # a weaker pixel next to another foreground's stronger mask pixel yields too:
            # decoded masks spread past their latent pixels, so touching latents decode overlapping
            core = torch.where(kept & ~drop & hard, score, torch.full_like(score, -1.0))
            near = F.max_pool2d(core, 3, stride=1, padding=1)  # (B, K, h, w)
            for k in range(K):
                others = torch.cat([near[:, :k], near[:, k + 1:]], dim=1).amax(dim=1)
                drop[:, k] |= kept[:, k] & (others > score[:, k])
    if priority is not None:
        drop = drop & ~priority.to(drop.device)[:, :, None, None].bool()
    if not bool(drop.any()):
        return x0
    out = x0.clone()
    fg = out[:, 1:]
    target = empty.to(x0)[None, None, :, None, None]
    d = drop[:, :, None].to(x0.dtype) * float(min(strength, 1.0))
    out[:, 1:] = fg + d * (target - fg)
    return out


class _Levels:
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


def _noise(shape, generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """Per-sample noise drawn on the CPU (same numbers on every device), stacked on dim 0."""
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(
        device=device, dtype=dtype
    )


@torch.no_grad()
def sample(
    unet,
    cond: LayerConditioning,
    height: int,
    width: int,
    seeds: list[int],
    steps: int = 25,
    cfg: float = 7.5,
    background_cfg: float | None = None,
    scheduler: str = "ddim",
    scheduler_config: dict | None = None,
    mask_guidance: float = 0.0,
    mask_guidance_start: float = 0.25,
    mask_guidance_blur: float = 1.0,
    mask_guidance_erode: int = 0,
    mask_axis: tuple[torch.Tensor, torch.Tensor] | None = None,
    layout_cleanup: float = 0.0,
    layout_cleanup_start: float = 0.25,
    empty_latent: torch.Tensor | None = None,
    lock: Lock | None = None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    eta: float = 0.0,
    callback: Callback | None = None,
    max_batch: int | None = None,
    empty_layer_retries: int = 0,
    empty_layer_check: float = 0.2,
) -> torch.Tensor:
    """Denoise a batch of layer stacks; returns clean latents (B, L, 8, h, w).

    height/width are latent sizes. ``seeds`` gives one seed per sample (same seed -> same result).
    ``background_cfg`` is the background layer's guidance scale (None: ``cfg``), the foregrounds use
    ``cfg``. ``mask_guidance`` is the self-mask guidance scale s (0 disables it), switched on after the
    first ``mask_guidance_start`` fraction of steps; it degrades each foreground inside its predicted
    mask eroded by ``mask_guidance_erode`` latent pixels (0: the whole mask). ``init_latents`` with
    ``strength`` < 1 starts from those latents noised part-way (restyling); strength 0 returns them
    unchanged.
    ``callback(step, total, x0)`` runs after every step with the predicted clean latents; returning
    False (or raising) stops sampling with :class:`Interrupted`. ``max_batch`` splits the UNet batch.
    ``layout_cleanup`` (0..1, 0 disables it) applies :func:`clean_layout` to the predicted clean
    latents of every step after the first ``layout_cleanup_start`` fraction; it needs ``mask_axis``
    and ``empty_latent`` (the model bundle's ``empty_layer_latent()``).
    ``empty_layer_retries`` (0 disables it) redraws the starting noise of every foreground that is
    still empty after the first ``empty_layer_check`` fraction of the steps (no latent pixel of its
    predicted mask above 0.5; padding and locked layers excepted) and starts again from the first
    step, at most that many times: a foreground the prompt asked for must not vanish. The new noise
    comes from a stream of each sample's own seed, so results stay deterministic; other layers
    keep their noise. It needs ``mask_axis``, and it is off for partial starts (``strength`` < 1).
    """
    if not isinstance(cond, LayerConditioning):
        raise LayerDiffError(f"cond {limits.show(cond)} is not a LayerConditioning: give the output of "
                             "layerdiff.pipeline.encode_prompts")
    B, L = cond.batch_size, cond.num_layers
    for name, value in (("height", height), ("width", width)):  # latent sizes
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= limits.SIZE_MAX:
            raise LayerDiffError(f"{name} {limits.show(value)} must be a whole number of latent pixels in "
                                 f"1..{limits.SIZE_MAX} (the image size divided by the VAE's factor)")
    if isinstance(seeds, (str, bytes, dict)) or not isinstance(seeds, Iterable) or not hasattr(seeds, "__len__"):
        raise LayerDiffError(f"seeds {limits.show(seeds)} is not a list: give one seed per sample, e.g. [0, 1]")
    if len(seeds) != B:
        raise LayerDiffError(f"got {len(seeds)} seeds for a batch of {B}: give one seed per sample")
    seeds = [limits.check_int(s, f"seeds[{b}]", "seed") for b, s in enumerate(seeds)]
    steps = limits.check_int(steps, "steps")
    for name, value in (("cfg", cfg), ("mask_guidance", mask_guidance), ("mask_guidance_start", mask_guidance_start),
                        ("mask_guidance_blur", mask_guidance_blur), ("layout_cleanup", layout_cleanup),
                        ("layout_cleanup_start", layout_cleanup_start), ("strength", strength), ("eta", eta),
                        ("empty_layer_check", empty_layer_check)):
        limits.check_float(value, name)
    limits.check_float(background_cfg, "background_cfg", optional=True)
    limits.check_int(mask_guidance_erode, "mask_guidance_erode")
    limits.check_int(empty_layer_retries, "empty_layer_retries")
    limits.check_int(max_batch, "max_batch", optional=True)
    limits.check_choice(scheduler, "scheduler", SCHEDULERS)
    if scheduler_config is not None and not isinstance(scheduler_config, dict):
        raise LayerDiffError(f"scheduler_config {limits.show(scheduler_config)} is not a dict: give the model's "
                             "config.scheduler, or None")
    limits.check_callback(callback)
    if lock is not None and not isinstance(lock, Lock):
        raise LayerDiffError(f"lock {limits.show(lock)} is not a Lock: give Lock(latents, mask), or None")
    if init_latents is not None and not isinstance(init_latents, torch.Tensor):
        raise LayerDiffError(f"init_latents {limits.show(init_latents)} is not a tensor (B, L, 8, h, w), or None")
    config = getattr(unet, "config", None)
    if hasattr(config, "unet") and hasattr(unet, "device"):
        limits.check_memory(limits.sampling_bytes(config, B, L, height, width, unet.dtype), unet.device,
                            f"sampling {L} layers x {B} image(s) at latent size {width}x{height}")
    if mask_guidance and mask_axis is None:
        raise LayerDiffError("self-mask guidance needs mask_axis (the model bundle's mask_axis())")
    if empty_layer_retries and mask_axis is None:
        raise LayerDiffError("redrawing empty foregrounds needs mask_axis (the model bundle's mask_axis())")
    if layout_cleanup and (mask_axis is None or empty_latent is None):
        raise LayerDiffError("layout cleanup needs mask_axis and empty_latent (the model bundle's mask_axis() and "
                             "empty_layer_latent())")
    device, dtype = unet.device, unet.dtype
    shape = (B, L, 8, height, width)
    for name, t in (("lock.latents", lock.latents if lock else None), ("init_latents", init_latents)):
        if t is not None and tuple(t.shape) != shape:
            raise LayerDiffError(f"{name} has shape {tuple(t.shape)}: expected {shape} for this batch")
    if init_latents is not None and strength == 0.0:
        return init_latents.clone()

    sched = make_scheduler(scheduler, scheduler_config or {})
    max_steps = int(sched.config.num_train_timesteps) - int(sched.config.get("steps_offset", 0) or 0)
    if steps > max_steps:
        raise LayerDiffError(f"steps {steps} is more than this model's schedule allows: use at most {max_steps}")
    sched.set_timesteps(steps, device=device)
    n = len(sched.timesteps)
    levels = _Levels(sched, n)
    start = 0
    if init_latents is not None and strength < 1.0:
        start = min(n - 1, int(round(n * (1.0 - strength))))
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    locked = lock_clean = None
    if lock is not None:
        locked = lock.expanded().to(device)
        lock_clean = lock.latents.to(device=device, dtype=torch.float32)
    accepted = inspect.signature(sched.step).parameters
    step_kwargs = {}
    if "eta" in accepted:
        step_kwargs["eta"] = eta

    def begin(replaced: dict[tuple[int, int], torch.Tensor]):
        """Per-sample generators and starting latents, the noise of ``replaced`` (sample, layer)
        entries swapped in: the start of sampling, and its restart after an empty-layer retry."""
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        noise = _noise(shape, gens, device, torch.float32)
        for (b, layer), z in replaced.items():
            noise[b, layer] = z.to(device)
        if init_latents is not None and strength < 1.0:
            x = levels.noise_to(init_latents.float(), noise, start)
        else:
            x = noise * float(sched.init_noise_sigma)
        if locked is not None:
            x = torch.where(locked, levels.noise_to(lock_clean, noise, start), x)
        if "generator" in accepted:  # ancestral samplers: per-sample noise from each sample's seed
            step_kwargs["generator"] = gens[0] if B == 1 else gens
        return gens, x

    replaced: dict[tuple[int, int], torch.Tensor] = {}
    gens, x = begin(replaced)

    use_cfg = cfg != 1.0 or (background_cfg is not None and background_cfg != 1.0)
    scale: float | torch.Tensor = cfg
    if background_cfg is not None and background_cfg != cfg:  # per layer: (1, L, 1, 1, 1)
        scale = torch.full((1, L, 1, 1, 1), float(cfg), device=device)
        scale[:, 0] = float(background_cfg)
    smg_from = start + int(math.ceil(mask_guidance_start * (n - start)))
    clean_from = start + int(math.ceil(layout_cleanup_start * (n - start)))
    priority = lock.mask_locked().to(device) if lock is not None and layout_cleanup else None
    K = L - 1
    x0_prev = mask_prev = None
    check_at = start + int(math.ceil(empty_layer_check * (n - start)))
    retry_ok = empty_layer_retries > 0 and K > 0 and start == 0 and check_at < n
    retry_gens = None
    tries = 0
    reported = 0
    i = start
    while i < n:
        t = sched.timesteps[i]
        a = levels.a[i]
        x_in = sched.scale_model_input(x, t)  # VP space, (B, L, 8, h, w)
        smg = mask_guidance > 0 and K > 0 and i >= smg_from and x0_prev is not None
        inputs, glob, lay, val = [x_in], [cond.global_tokens], [cond.layer_tokens], [cond.valid]
        if use_cfg or smg:
            inputs.append(x_in)
            glob.append(cond.uncond_global_tokens)
            lay.append(cond.uncond_layer_tokens)
            val.append(cond.valid)
        if smg:
            # degrade each foreground's image inside its own predicted mask (previous step's x0,
            # so this pass is batched with the others): remove the detail blur(x0) lacks
            detail = x0_prev[:, 1:, :4] - _blur_layers(x0_prev[:, 1:, :4], mask_guidance_blur)  # (B, K, 4, h, w)
            x_deg = x_in.clone()
            x_deg[:, 1:, :4] -= math.sqrt(a) * mask_prev[:, :, None] * detail
            inputs.append(x_deg)
            glob.append(cond.uncond_global_tokens)
            lay.append(cond.uncond_layer_tokens)
            val.append(cond.valid)
        eps = _run(unet, torch.cat(inputs).to(dtype), t, torch.cat(glob), torch.cat(lay), torch.cat(val), max_batch)
        eps = eps.float().chunk(len(inputs))
        guided = eps[1] + scale * (eps[0] - eps[1]) if use_cfg else eps[0]
        if smg:
            guided = guided + mask_guidance * (eps[1] - eps[2])
        x0 = (x_in - math.sqrt(1 - a) * guided) / math.sqrt(a)  # (B, L, 8, h, w)
        if layout_cleanup and K > 0 and i >= clean_from:
            x0_clean = clean_layout(x0, *mask_axis, empty_latent, layout_cleanup, priority, valid=cond.valid)
            if x0_clean is not x0:  # the step continues from the cleaned prediction
                x0 = x0_clean
                guided = (x_in - math.sqrt(a) * x0) / math.sqrt(1 - a)
        if retry_ok and i == check_at and tries < empty_layer_retries:
            present = read_masks(x0, *mask_axis).flatten(2).amax(-1) > 0.5  # (B, K)
            gone = ~present & cond.valid[:, 1:].to(present.device)
            if locked is not None:
                gone &= ~locked[:, 1:].flatten(2).any(-1)
            if bool(gone.any()):
                tries += 1
                if retry_gens is None:
                    retry_gens = [torch.Generator("cpu").manual_seed((int(s) + 0x5EED) % (limits.SEED_MAX + 1)) for s in seeds]
                for b, k in gone.nonzero().tolist():
                    replaced[(b, k + 1)] = torch.randn(shape[2:], generator=retry_gens[b], dtype=torch.float32)
                logger.info("%d empty foreground(s) after step %d of %d: new noise for them, try %d of %d",
                            int(gone.sum()), i + 1, n, tries, empty_layer_retries)
                sched = make_scheduler(scheduler, scheduler_config or {})  # multistep solvers keep state
                sched.set_timesteps(steps, device=device)
                if hasattr(sched, "set_begin_index"):
                    sched.set_begin_index(start)
                gens, x = begin(replaced)
                x0_prev = mask_prev = None
                i = start
                continue
        if mask_guidance > 0 and K > 0:
            x0_u = (x_in - math.sqrt(1 - a) * eps[1]) / math.sqrt(a) if len(eps) > 1 else x0
            x0_prev = x0_u
            mask_prev = (read_masks(x0, *mask_axis) > 0.5).to(x0.dtype)  # (B, K, h, w)
            if mask_guidance_erode:  # the masks' interiors: SMG sharpens content, not outlines
                r = int(mask_guidance_erode)
                mask_prev = -F.max_pool2d(-mask_prev, 2 * r + 1, stride=1, padding=r)
        x = sched.step(guided, t, x, **step_kwargs).prev_sample
        if locked is not None:
            x = torch.where(locked, levels.noise_to(lock_clean, _noise(shape, gens, device, torch.float32), i + 1), x)
        if callback is not None and i - start + 1 > reported:  # a retry replays steps: reported once
            reported = i - start + 1
            if callback(reported, n - start, x0) is False:
                raise Interrupted(f"sampling stopped at step {reported} of {n - start}")
        i += 1
    if locked is not None:  # locked entries come back bit-identical
        return torch.where(locked, lock.latents.to(device), x.to(lock.latents.dtype))
    return x.to(dtype)


def _blur_layers(x: torch.Tensor, sigma: float) -> torch.Tensor:
    B = x.shape[0]
    return rearrange(gaussian_blur(rearrange(x, "b k c h w -> (b k) c h w"), sigma), "(b k) c h w -> b k c h w", b=B)


def _run(unet, x, t, glob, lay, valid, max_batch):
    if not max_batch or x.shape[0] <= max_batch:
        return unet(x, t, glob, lay, valid=valid)
    outs = [
        unet(x[s : s + max_batch], t, glob[s : s + max_batch], lay[s : s + max_batch], valid=valid[s : s + max_batch])
        for s in range(0, x.shape[0], max_batch)
    ]
    return torch.cat(outs)
