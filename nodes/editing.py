"""Layer Edit, Layer Inpaint, Layer Style and Transform Layer: thin wrappers over layerdiff.edit."""

from __future__ import annotations

from layerdiff.edit import (
    EDIT_DEFAULTS,
    edit_layer,
    inpaint_layer,
    style_layers,
    transform_layer,
)

from . import _host, _widgets, convert
from .prompting import unknown_word_notes, with_notes
from .sampling import prepare, progress

MODEL = ("LAYERDIFF_MODEL", {"tooltip": "The LayerDiff model (Load LayerDiff)."})
LAYERS_IN = ("LAYERDIFF_LAYERS", {"tooltip": "The layer stacks to change (they are not modified; a new stack is returned)."})
LAYERS_OUT = ("The edited layer stacks; every layer not edited is bit-identical to the input.",)


def _run(model, layers, steps, function, *args, **kwargs):
    layers = convert.require_stack(layers)
    prepare(model, layers.batch_size, layers.num_layers, layers.height, layers.width)
    with unknown_word_notes() as notes:  # prompt words the model does not know: the log and the node's text
        out = function(model, layers, *args, callback=progress(model, steps), **kwargs)
    return with_notes((out.to(_host.intermediate_device()),), notes)


class LayerDiffLayerEdit:
    DESCRIPTION = (
        "Regenerates one layer with a new prompt and seed. Every other layer is locked during sampling, so it comes "
        "back bit-identical (pixels, mask and latents) and the new layer is made to fit it."
    )
    CATEGORY = "LayerDiff/edit"
    RETURN_TYPES = ("LAYERDIFF_LAYERS",)
    RETURN_NAMES = ("layers",)
    OUTPUT_TOOLTIPS = LAYERS_OUT
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL,
                "layers": LAYERS_IN,
                "layer_index": _widgets.layer_index(1, what="The layer to regenerate"),
                "prompt": _widgets.edit_prompt(),
                "seed": _widgets.seed(),
                "regenerate": _widgets.regenerate(),
                "steps": _widgets.steps(),
                "cfg": _widgets.cfg(),
                "sampler_name": _widgets.sampler_name(),
            },
            "optional": {**_widgets.optional_prompts(), "scheduler": _widgets.scheduler()},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, layer_index, seed, steps, cfg, sampler_name=None, scheduler=None):
        return _widgets.validate(layer_index=layer_index, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                                 scheduler=scheduler)

    def edit(self, model, layers, layer_index, prompt, seed, regenerate, steps, cfg, sampler_name,
             global_prompt="", negative_prompt="", scheduler="normal"):
        _widgets.require(self.VALIDATE_INPUTS(layer_index, seed, steps, cfg, sampler_name, scheduler))
        return _run(model, layers, steps, edit_layer, layer_index, prompt, seed, regenerate=regenerate,
                    global_prompt=global_prompt, settings=_widgets.sampler_settings(steps, cfg, sampler_name, scheduler),
                    negative_prompt=negative_prompt or "")


class LayerDiffLayerInpaint:
    DESCRIPTION = (
        "Regenerates one layer inside a region (a MASK, 1 = change, at the layers' size). Outside the region, "
        "rounded out to the model's 8-pixel latent cells and grown by 'grow' cells, that layer keeps its pixels "
        "and mask exactly; every other layer is kept bit-identical."
    )
    CATEGORY = "LayerDiff/edit"
    RETURN_TYPES = ("LAYERDIFF_LAYERS",)
    RETURN_NAMES = ("layers",)
    OUTPUT_TOOLTIPS = LAYERS_OUT
    FUNCTION = "inpaint"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL,
                "layers": LAYERS_IN,
                "layer_index": _widgets.layer_index(0, what="The layer to inpaint"),
                "region": ("MASK", {"tooltip": (
                    "Where to change the layer: 1 = change (ComfyUI's mask meaning), same width and height as the "
                    "layers. One mask for every sample, or one per sample.")}),
                "prompt": _widgets.edit_prompt(),
                "seed": _widgets.seed(),
                "grow": ("INT", _widgets.ranged("grow", default=EDIT_DEFAULTS.inpaint_grow, tooltip=(
                    "Grow the region by this many latent cells (8 px each) to hide seams."))),
                "regenerate": _widgets.regenerate(),
                "steps": _widgets.steps(),
                "cfg": _widgets.cfg(),
                "sampler_name": _widgets.sampler_name(),
            },
            "optional": {**_widgets.optional_prompts(), "scheduler": _widgets.scheduler()},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, layer_index, seed, grow, steps, cfg, sampler_name=None, scheduler=None):
        return _widgets.validate(layer_index=layer_index, seed=seed, grow=grow, steps=steps, cfg=cfg,
                                 sampler_name=sampler_name, scheduler=scheduler)

    def inpaint(self, model, layers, layer_index, region, prompt, seed, grow, regenerate, steps, cfg, sampler_name,
                global_prompt="", negative_prompt="", scheduler="normal"):
        _widgets.require(self.VALIDATE_INPUTS(layer_index, seed, grow, steps, cfg, sampler_name, scheduler))
        mask = convert.region_mask(region, convert.require_stack(layers))
        return _run(model, layers, steps, inpaint_layer, layer_index, mask, prompt, seed, grow=grow,
                    regenerate=regenerate, global_prompt=global_prompt,
                    settings=_widgets.sampler_settings(steps, cfg, sampler_name, scheduler),
                    negative_prompt=negative_prompt or "")


class LayerDiffLayerStyle:
    DESCRIPTION = (
        "Restyles the chosen layers (or all): their images are noised to 'strength' and redrawn with the style "
        "phrase added to their prompts ('a red star, watercolor style'); their masks stay locked, so the layout "
        "is kept. Other layers are kept bit-identical. Strength 0 passes the layers through unchanged."
    )
    CATEGORY = "LayerDiff/edit"
    RETURN_TYPES = ("LAYERDIFF_LAYERS",)
    RETURN_NAMES = ("layers",)
    OUTPUT_TOOLTIPS = LAYERS_OUT
    FUNCTION = "style"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL,
                "layers": LAYERS_IN,
                "style": ("STRING", {"multiline": False, "default": "watercolor style", "tooltip": (
                    "Style phrase added to the chosen layers' prompts. Empty: a plain re-noise (variation). The "
                    "built-in model was trained on no style words: with it every phrase gives a variation.")}),
                "strength": ("FLOAT", _widgets.ranged("strength", default=EDIT_DEFAULTS.style_strength, step=0.01,
                                                      tooltip="How much changes: 0 nothing, 1 the whole image "
                                                              "regenerated.")),
                "layers_to_style": ("STRING", {"default": "all", "tooltip": (
                    "'all', or layer indices such as '1' or '0, 2' (0 = background).")}),
                "seed": _widgets.seed(),
                "steps": _widgets.steps(),
                "cfg": _widgets.cfg(),
                "sampler_name": _widgets.sampler_name(),
            },
            "optional": {"negative_prompt": _widgets.optional_prompts()["negative_prompt"],
                         "scheduler": _widgets.scheduler()},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, strength, seed=None, steps=None, cfg=None, sampler_name=None, scheduler=None):
        return _widgets.validate(strength=strength, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                                 scheduler=scheduler)

    def style(self, model, layers, style, strength, layers_to_style, seed, steps, cfg, sampler_name,
              negative_prompt="", scheduler="normal"):
        _widgets.require(self.VALIDATE_INPUTS(strength, seed, steps, cfg, sampler_name, scheduler))
        chosen = convert.layer_list(layers_to_style, "layers_to_style")
        if strength == 0:
            return (layers,)  # unchanged, the same object
        return _run(model, layers, steps, style_layers, style, strength, chosen, seed,
                    settings=_widgets.sampler_settings(steps, cfg, sampler_name, scheduler),
                    negative_prompt=negative_prompt or "")


class LayerDiffTransformLayer:
    DESCRIPTION = (
        "Scales a foreground about its centre, shifts it by dx, dy pixels and moves it to another position in the "
        "stack, or removes it. Other layers are untouched. Optional: a low-strength harmonisation pass (needs the "
        "model) that blends the moved layer in, its mask kept."
    )
    CATEGORY = "LayerDiff/edit"
    RETURN_TYPES = ("LAYERDIFF_LAYERS",)
    RETURN_NAMES = ("layers",)
    OUTPUT_TOOLTIPS = ("The transformed layer stacks.",)
    FUNCTION = "transform"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "layers": LAYERS_IN,
                "layer_index": _widgets.layer_index(1, minimum=1, what="The foreground to transform (1..K)"),
                "dx": ("INT", _widgets.ranged("dx", default=0, tooltip="Shift right (negative: left), pixels.")),
                "dy": ("INT", _widgets.ranged("dy", default=0, tooltip="Shift down (negative: up), pixels.")),
                "scale": ("FLOAT", _widgets.ranged("scale", default=1.0, step=0.05, tooltip=(
                    "Scale about the layer's mask centre (applied before the shift); 1 keeps the size."))),
                "move_to": ("INT", _widgets.ranged("move_to", default=0, tooltip=(
                    "New position back to front (1 = just in front of the background); 0 keeps the position."))),
                "remove": ("BOOLEAN", {"default": False, "tooltip": "Remove the layer (the other settings are ignored)."}),
                "harmonize": ("FLOAT", {"default": EDIT_DEFAULTS.harmonize_strength,
                                        **_widgets.ranged("harmonize"), "step": 0.01, "tooltip": (
                    "Strength of a style pass without a style phrase on the transformed layer (after a removal: on "
                    "every layer), masks kept. 0 = off; 0.2-0.3 blends a moved layer in. Needs the model.")}),
                "seed": _widgets.seed("Seed of the harmonisation pass."),
            },
            "optional": {
                "model": ("LAYERDIFF_MODEL", {"tooltip": "The LayerDiff model; needed only when harmonize > 0."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, harmonize, layer_index=None, dx=None, dy=None, scale=None, move_to=None, seed=None):
        return _widgets.validate(harmonize=harmonize, layer_index=layer_index, dx=dx, dy=dy, scale=scale,
                                 move_to=move_to, seed=seed)

    def transform(self, layers, layer_index, dx, dy, scale, move_to, remove, harmonize, seed, model=None):
        _widgets.require(self.VALIDATE_INPUTS(harmonize, layer_index, dx, dy, scale, move_to, seed))
        layers = convert.require_stack(layers)
        callback = None
        if harmonize > 0 and model is not None:
            prepare(model, layers.batch_size, layers.num_layers, layers.height, layers.width)
            callback = progress(model, model.config.sampling.steps)
        with unknown_word_notes() as notes:
            out = transform_layer(layers, layer_index, dx=dx, dy=dy, scale=scale, move_to=move_to or None,
                                  remove=remove, model=model, harmonize=harmonize, seed=seed, callback=callback)
        return with_notes((out.to(_host.intermediate_device()),), notes)
