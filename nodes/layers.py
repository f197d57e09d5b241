"""Composite Layers, Split Layers and Layers from Images: LAYERDIFF_LAYERS <-> ComfyUI IMAGE/MASK."""

from __future__ import annotations

from layerdiff.conditioning import LayerPrompts
from layerdiff.errors import LayerDiffError
from layerdiff.stack import LayerStack

from . import _host, _widgets, convert

LAYERS_IN = ("LAYERDIFF_LAYERS", {"tooltip": "Layer stacks (Layered KSampler, an edit node, Load PSD as Layers...)."})
ORDER = "sample-major, background first: row b * L + l is sample b, layer l (L layers per sample)"


def _out(*tensors):
    device = _host.intermediate_device()
    return tuple(t.to(device) if hasattr(t, "to") else t for t in tensors)


class LayerDiffCompositeLayers:
    DESCRIPTION = "Flattens each layer stack into one image: the foregrounds over the background, back to front."
    CATEGORY = "LayerDiff/layers"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The composites (B, H, W, 3), one per sample.",)
    FUNCTION = "composite"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"layers": LAYERS_IN}}

    def composite(self, layers):
        return _out(convert.require_stack(layers).composite().float())


class LayerDiffSplitLayers:
    DESCRIPTION = (
        "Splits layer stacks into ComfyUI images: every layer as an RGBA image (alpha = its mask, so Save Image "
        f"writes transparent PNGs) and the masks, {ORDER}; plus one chosen layer of every sample."
    )
    CATEGORY = "LayerDiff/layers"
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE", "MASK", "INT")
    RETURN_NAMES = ("all_layers", "all_masks", "layer", "layer_mask", "layer_count")
    OUTPUT_TOOLTIPS = (
        f"Every layer as RGBA (B*L, H, W, 4), {ORDER}. The background is opaque.",
        "Every layer's mask (B*L, H, W), 1 = the layer's object, same order; the background's is all ones.",
        "The chosen layer of every sample as RGBA (B, H, W, 4).",
        "The chosen layer's mask (B, H, W), 1 = object.",
        "L, the number of layers per sample (background included).",
    )
    FUNCTION = "split"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "layers": LAYERS_IN,
            "layer_index": _widgets.layer_index(1, what="The layer for the 'layer' outputs"),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, layer_index):
        return _widgets.validate(layer_index=layer_index)

    def split(self, layers, layer_index):
        stack = convert.require_stack(layers)
        rgba, masks = convert.flat_layers(stack)
        one, one_mask = convert.one_layer(stack, layer_index)
        return _out(rgba, masks, one, one_mask) + (stack.num_layers,)


class LayerDiffLayersFromImages:
    DESCRIPTION = (
        "Builds layer stacks from your own images: a background and K foreground images (back to front) with their "
        "masks, or RGBA foregrounds whose alpha is the mask. Several backgrounds: give K foregrounds per background, "
        "sample-major. The result has no latents; edit nodes encode it with the model."
    )
    CATEGORY = "LayerDiff/layers"
    RETURN_TYPES = ("LAYERDIFF_LAYERS",)
    RETURN_NAMES = ("layers",)
    OUTPUT_TOOLTIPS = ("Layer stacks: the background, then the foregrounds back to front.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "background": ("IMAGE", {"tooltip": "Background image(s) (B, H, W, 3): layer 0."}),
                "invert_masks": ("BOOLEAN", {"default": False, "tooltip": (
                    "Turn on for masks from Load Image, which are 1 - alpha (1 = transparent). Off: 1 = object.")}),
            },
            "optional": {
                "foregrounds": ("IMAGE", {"tooltip": (
                    "Foreground images back to front, same size as the background; RGBA images carry their mask "
                    "in alpha. With B backgrounds: B*K images, sample-major.")}),
                "masks": ("MASK", {"tooltip": (
                    "One mask per foreground image (1 = object), same size; overrides RGBA alpha.")}),
                "prompts": ("LAYERDIFF_PROMPTS", {"tooltip": (
                    "Optional Layer Prompt chain describing these layers (one prompt per layer); edits use it.")}),
            },
        }

    def build(self, background, invert_masks=False, foregrounds=None, masks=None, prompts=None):
        bg, fgs = convert.layers_from_images(background, foregrounds, masks, invert_masks)
        layer_prompts, names, scene = (), (), ""
        if prompts is not None:
            if not isinstance(prompts, LayerPrompts):
                raise LayerDiffError(f"prompts must come from Layer Prompt, got {type(prompts).__name__}")
            if len(prompts.layers) != 1 + len(fgs):
                raise LayerDiffError(
                    f"prompts has {len(prompts.layers)} layer prompts but there are {1 + len(fgs)} layers (background "
                    f"+ {len(fgs)} foregrounds): chain one Layer Prompt per layer, background first"
                )
            layer_prompts, names, scene = prompts.layers, prompts.layer_names(), prompts.global_prompt
        stack = LayerStack.from_rgba(bg, fgs, names=names, prompts=layer_prompts, global_prompt=scene)
        return (stack.to(_host.intermediate_device()),)
