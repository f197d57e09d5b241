"""The evaluation loop: every scene generated with plain CFG and with self-mask guidance, then judged.

Generation uses the model's own sampler settings (steps, cfg, scheduler), at its image size, each
sample with noise seed ``seed + i``, twice: plain classifier-free guidance (mask guidance 0) and
self-mask guidance (the model's default scale), on identical prompts and seeds. Each batch's stacks
are decoded with soft masks and judged by :func:`layerdiff.evaluation.metrics.judge_stack`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from layerdiff.errors import LayerDiffError
from layerdiff.evaluation.metrics import VARIANTS, judge_stack
from layerdiff.evaluation.scenes import EvalItem, batches

logger = logging.getLogger("layerdiff.eval")

DEFAULT_BATCH = 8  # prompt sets per sampler call

__all__ = ["DEFAULT_BATCH", "evaluate"]


def evaluate(model, items: Sequence[EvalItem], batch: int = DEFAULT_BATCH, steps: int | None = None,
             settings=None, keep: int = 0, progress: Callable[[int], object] | None = None) -> dict:
    """Generate every item with plain CFG and with SMG (same prompts and seeds) and judge them.

    ``settings`` (:class:`layerdiff.settings.SamplerSettings`, None fields: the model's) apply to both
    runs; its mask_guidance is the SMG run's scale (the CFG run's is 0).

    Returns {"settings", "records": {"cfg": [...], "smg": [...]} (in item order), "kept": {"cfg":
    {index: LayerStack}, "smg": ...} for items with index < ``keep``, "timing"}. ``progress(n)`` is
    called with the number of samples finished by each sampler call.
    """
    import torch

    from layerdiff.conditioning import LayerPrompts, encode_prompts
    from layerdiff.pipeline import check_settings, check_size, decode_stack, run
    from layerdiff.settings import DEFAULTS

    if batch < 1:
        raise LayerDiffError(f"--batch {batch} must be at least 1")
    given = check_settings(settings)
    resolved = given.resolve(model)
    smg_scale = resolved.mask_guidance
    if given.mask_guidance is None and smg_scale <= 0:
        smg_scale = DEFAULTS.mask_guidance
        logger.warning("the model's default mask guidance is 0: the SMG run uses %.2f", smg_scale)
    if smg_scale <= 0:
        raise LayerDiffError(f"--mask-guidance {given.mask_guidance} must be above 0: the SMG run compares it with "
                             "plain CFG (0)")
    variants = {v: resolved.replace(mask_guidance=0.0 if v == "cfg" else smg_scale) for v in VARIANTS}
    smg = variants["smg"]
    settings = {
        **smg.to_dict(),
        "background_cfg": smg.cfg if smg.background_cfg is None else smg.background_cfg,
        "image_size": model.config.image_size,
        "batch": batch,
    }
    size = model.config.image_size
    f = model.vae_scale_factor
    check_size(size, size, f)
    records: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    kept: dict[str, dict] = {v: {} for v in VARIANTS}
    timing = {"cfg_s": 0.0, "smg_s": 0.0, "judge_s": 0.0}
    for group in batches(items, batch):
        prompts = [LayerPrompts(it.spec.global_prompt, tuple(it.spec.layer_prompts)) for it in group]
        cond = encode_prompts(model, prompts)
        seeds = [it.seed for it in group]
        for variant in VARIANTS:
            t0 = time.perf_counter()
            latents = run(model, cond, variants[variant], seeds=seeds, width=size, height=size, decode=False)
            stack = decode_stack(model, latents, binarize=False)  # soft masks: overlaps are measured on them
            t1 = time.perf_counter()
            timing[f"{variant}_s"] += t1 - t0
            for it, rec in zip(group, judge_stack(stack, [it.spec for it in group])):
                records[variant][it.index] = rec
            for b, it in enumerate(group):
                if it.index < keep:
                    kept[variant][it.index] = stack.select_batch([b])
            timing["judge_s"] += time.perf_counter() - t1
            if progress is not None:
                progress(len(group))
        logger.info("%d-layer batch of %d done (cfg %.0f s, smg %.0f s so far)", group[0].num_layers, len(group),
                    timing["cfg_s"], timing["smg_s"])
        del cond
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    order = [it.index for it in items]
    return {
        "settings": settings,
        "records": {v: [records[v][i] for i in order] for v in VARIANTS},
        "kept": kept,
        "timing": {k: round(v, 1) for k, v in timing.items()},
    }
