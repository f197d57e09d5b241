"""Layered KSampler: conditioning -> a batch of layer stacks (LAYERDIFF_LAYERS)."""

from __future__ import annotations

from layerdiff.pipeline import generate

from . import _host, _widgets, convert
from .preview import PreviewDecoder


def progress(model, steps: int) -> _host.Progress:
    """ComfyUI progress bar + interrupt, with the cheap latent-resolution composite preview."""
    return _host.Progress(steps, preview=lambda: PreviewDecoder(model))


def prepare(model, batch: int, layers: int, height: int, width: int) -> None:
    """Have ComfyUI load the model's weights and make room for sampling."""
    _host.ready(model, _host.sampling_memory(model, batch, layers, height, width))


class LayerDiffKSampler:
    DESCRIPTION = (
        "Generates a batch of layered images: the background and every foreground with its mask, jointly, with "
        "classifier-free guidance and self-mask guidance. Output: LAYERDIFF_LAYERS (composite, split, edit or "
        "save them as PSD)."
    )
    CATEGORY = "LayerDiff/sampling"
    RETURN_TYPES = ("LAYERDIFF_LAYERS",)
    RETURN_NAMES = ("layers",)
    OUTPUT_TOOLTIPS = ("The generated layer stacks: background first, then the foregrounds back to front.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("LAYERDIFF_MODEL", {"tooltip": "The LayerDiff model (Load LayerDiff)."}),
                "conditioning": ("LAYERDIFF_CONDITIONING", {"tooltip": "Encoded prompts (Prompt Enhancer)."}),
                "seed": _widgets.seed(),
                "steps": _widgets.steps(),
                "cfg": _widgets.cfg(),
                "mask_guidance": _widgets.mask_guidance(),
                "mask_guidance_start": _widgets.mask_guidance_start(),
                "sampler_name": _widgets.sampler_name(),
                "width": _widgets.size("width"),
                "height": _widgets.size("height"),
                "batch_size": ("INT", _widgets.ranged("batch", default=1, tooltip=(
                    "Layered images generated at once (seeds seed, seed + 1, ...)."))),
            },
            "optional": {
                "background_cfg": _widgets.background_cfg(),
                "layout_cleanup": _widgets.layout_cleanup(),
                "scheduler": _widgets.scheduler(),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, seed=None, steps=None, cfg=None, mask_guidance=None,
                        mask_guidance_start=None, batch_size=None, background_cfg=None, layout_cleanup=None,
                        sampler_name=None, scheduler=None):
        # sampler_name is checked here, not by ComfyUI's list: the combined names of earlier versions load
        return _widgets.validate(width=width, height=height, seed=seed, steps=steps, cfg=cfg, mask_guidance=mask_guidance,
                                 mask_guidance_start=mask_guidance_start, batch_size=batch_size,
                                 background_cfg=background_cfg, layout_cleanup=layout_cleanup,
                                 sampler_name=sampler_name, scheduler=scheduler)

    def sample(self, model, conditioning, seed, steps, cfg, mask_guidance, mask_guidance_start, sampler_name,
               width, height, batch_size=1, background_cfg=0.0, layout_cleanup=None, scheduler="normal"):
        _widgets.require(self.VALIDATE_INPUTS(
            width, height, seed=seed, steps=steps, cfg=cfg, mask_guidance=mask_guidance,
            mask_guidance_start=mask_guidance_start, batch_size=batch_size, background_cfg=background_cfg,
            layout_cleanup=layout_cleanup, sampler_name=sampler_name, scheduler=scheduler))
        settings = _widgets.sampler_settings(steps, cfg, sampler_name, scheduler, mask_guidance=mask_guidance,
                                             mask_guidance_start=mask_guidance_start, background_cfg=background_cfg,
                                             layout_cleanup=layout_cleanup)
        cond = convert.conditioning_to(conditioning, model.device)
        prepare(model, batch_size, cond.num_layers, height, width)
        stack = generate(model, cond, settings, width=width, height=height, seed=seed, batch=batch_size,
                         callback=progress(model, steps))
        return (stack.to(_host.intermediate_device()),)
