"""Layout conversions at the ComfyUI boundary, each with a shape check that shows both shapes.

ComfyUI types: IMAGE is (B, H, W, C) float 0..1 with C = 3 (RGB) or 4 (RGBA); MASK is (B, H, W)
float 0..1 (a single (H, W) mask is accepted too). Layer batches are sample-major, background
first: row ``b * L + l`` is sample b, layer l (LayerStack.flat_rgba_batch). Masks given to and
returned by the LayerDiff nodes are object masks, 1 = the layer's object (its alpha), which is
ComfyUI's "selected area" meaning (ImageCompositeMasked, SetLatentNoiseMask, GrowMask).
LoadImage's MASK is the opposite (1 - alpha): invert it first (Invert Mask, or the nodes' option).
Nothing here writes into a tensor it was given.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch

from layerdiff.conditioning import LayerConditioning
from layerdiff.errors import LayerDiffError
from layerdiff.limits import show
from layerdiff.stack import LayerStack


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")" if isinstance(t, torch.Tensor) else type(t).__name__


def image_batch(image, what: str) -> torch.Tensor:
    """IMAGE (B, H, W, 3|4) -> float32 (B, H, W, C); a single (H, W, C) image becomes B = 1."""
    if not isinstance(image, torch.Tensor):
        raise LayerDiffError(f"{what} must be an IMAGE tensor (B, H, W, C), got {type(image).__name__}")
    t = image[None] if image.ndim == 3 else image
    if t.ndim != 4 or t.shape[-1] not in (3, 4):
        raise LayerDiffError(
            f"{what} has shape {_shape(image)} but an IMAGE is (B, H, W, 3) or RGBA (B, H, W, 4): connect an "
            "image output (a MASK goes to a mask input)"
        )
    return t.float()


def mask_batch(mask, what: str) -> torch.Tensor:
    """MASK (B, H, W) or (H, W) -> float32 (B, H, W)."""
    if not isinstance(mask, torch.Tensor):
        raise LayerDiffError(f"{what} must be a MASK tensor (B, H, W), got {type(mask).__name__}")
    t = mask[None] if mask.ndim == 2 else mask
    if t.ndim != 3:
        raise LayerDiffError(
            f"{what} has shape {_shape(mask)} but a MASK is (B, H, W): connect a mask output (an IMAGE can be "
            "turned into a mask with Convert Image to Mask)"
        )
    return t.float()


def rgb_and_alpha(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, H, W, 3|4) -> RGB (B, H, W, 3) and alpha (B, H, W) or None (views, not copies)."""
    if image.shape[-1] == 4:
        return image[..., :3], image[..., 3]
    return image, None


def region_mask(mask, stack: LayerStack, what: str = "region") -> torch.Tensor:
    """A ComfyUI MASK for an edit region -> (B, H, W) or (1, H, W) at the layers' size."""
    m = mask_batch(mask, what)
    want = (stack.batch_size, stack.height, stack.width)
    if tuple(m.shape[1:]) != want[1:] or m.shape[0] not in (1, want[0]):
        raise LayerDiffError(
            f"{what} mask has shape {_shape(m)} (B, H, W) but the layers are {want} (B, H, W): give a mask of "
            f"the layers' size {stack.width}x{stack.height}, e.g. scale it with Upscale Image or draw it on "
            "the composite"
        )
    return m


def layers_from_images(
    background,
    foregrounds=None,
    masks=None,
    invert_masks: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """ComfyUI images -> (background (B, H, W, 3), foregrounds [K x (B, H, W, 4)]) for
    LayerStack.from_rgba.

    ``foregrounds`` is an IMAGE batch of B*K images, sample-major (sample 0's foregrounds back to
    front, then sample 1's...; with one background: just the K foregrounds back to front). Their
    masks come from ``masks`` (B*K masks, or one mask per foreground shared by all samples) when
    given, else from the images' alpha channel (RGBA). ``invert_masks`` for LoadImage-style masks.
    """
    bg = image_batch(background, "background")
    B, H, W = bg.shape[:3]
    bg_rgb, _ = rgb_and_alpha(bg)
    if foregrounds is None:
        if masks is not None:
            raise LayerDiffError("masks were given without foreground images: connect the foregrounds too")
        return bg_rgb, []
    fg = image_batch(foregrounds, "foregrounds")
    if tuple(fg.shape[1:3]) != (H, W):
        raise LayerDiffError(
            f"foregrounds have shape {_shape(fg)} but the background is {_shape(bg)} (B, H, W, C): every layer "
            f"must be {W}x{H}; resize them (Upscale Image) to the background's size"
        )
    N = fg.shape[0]
    if N % B:
        raise LayerDiffError(
            f"{N} foreground images for {B} backgrounds: give K foregrounds per background, sample-major "
            f"(a multiple of {B})"
        )
    K = N // B
    rgb, alpha = rgb_and_alpha(fg)
    if masks is not None:
        m = mask_batch(masks, "masks")
        if tuple(m.shape[1:]) != (H, W):
            raise LayerDiffError(
                f"masks have shape {_shape(m)} but the foreground images are {_shape(fg)}: masks must be "
                f"(N, {H}, {W}) like the images' (N, H, W); resize or crop them to {W}x{H}"
            )
        if m.shape[0] == K and N != K:
            m = m.repeat(B, 1, 1)  # one mask per foreground, shared by every sample
        if m.shape[0] != N:
            raise LayerDiffError(
                f"masks have shape {_shape(m)} but there are {N} foreground images {_shape(fg)}: give one mask "
                f"per foreground image ({N}), in the same order"
            )
        alpha = m
    elif alpha is None:
        raise LayerDiffError(
            f"foregrounds {_shape(fg)} are RGB and no masks were given: connect masks (1 = object), or give "
            "RGBA images whose alpha is the mask"
        )
    if invert_masks:
        alpha = 1.0 - alpha
    rgba = torch.cat([rgb, alpha.clamp(0, 1)[..., None]], dim=-1)  # (N, H, W, 4), a new tensor
    rgba = rgba.reshape(B, K, H, W, 4)  # sample-major: row b*K + k
    return bg_rgb, [rgba[:, k] for k in range(K)]


def flat_layers(stack: LayerStack) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerStack -> RGBA IMAGE (B*L, H, W, 4) and MASK (B*L, H, W), sample-major, background
    first (its mask all ones)."""
    return stack.flat_rgba_batch().float(), stack.flat_masks().float()


def one_layer(stack: LayerStack, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``index`` of every sample -> RGBA IMAGE (B, H, W, 4) and MASK (B, H, W)."""
    n = stack.num_layers
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < n:
        raise LayerDiffError(
            f"layer_index {show(index)} is out of range for a stack of {n} layers: use 0..{n - 1} (0 = background)"
        )
    rgba = stack.layer_rgba(int(index)).float()  # (B, H, W, 4)
    return rgba, rgba[..., 3].clone()


def conditioning_to(cond: LayerConditioning, device) -> LayerConditioning:
    """A LayerConditioning with every tensor on ``device`` (a new object; same one if already there)."""
    if not isinstance(cond, LayerConditioning):
        raise LayerDiffError(
            f"conditioning must come from a LayerDiff Prompt Enhancer (LAYERDIFF_CONDITIONING), got {type(cond).__name__}"
        )
    tensors = {f.name: getattr(cond, f.name) for f in dataclasses.fields(cond)}
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if all(v.device == torch.device(device) for v in tensors.values()):
        return cond
    return dataclasses.replace(cond, **{k: v.to(device) for k, v in tensors.items()})


def layer_list(text: str, what: str = "layers") -> list[int] | None:
    """'all' (or empty) -> None; '1, 2' or '0 2' -> [1, 2] / [0, 2]."""
    t = (text or "").strip().lower()
    if t in ("", "all", "*"):
        return None
    try:
        return [int(p) for p in t.replace(",", " ").split()]
    except ValueError:
        raise LayerDiffError(
            f"{what} {text!r} is not 'all' or a list of layer indices: write e.g. 'all', '1' or '0, 2' "
            "(0 = background)"
        ) from None


def require_stack(layers, what: str = "layers") -> LayerStack:
    """The LayerStack behind a LAYERDIFF_LAYERS input, or an error naming the input."""
    if not isinstance(layers, LayerStack):
        raise LayerDiffError(
            f"{what} must be LayerDiff layers (LAYERDIFF_LAYERS, e.g. from Layered KSampler), got {type(layers).__name__}"
        )
    return layers
