"""Layer edit, inpaint, style and transform on a LayerStack (METHOD.md section 5).

Everything runs on the sampler's RePaint locks (:class:`layerdiff.sampling.Lock`): what is kept is
locked to its clean latents at every step, so the edited parts adapt to a fixed context (inter-layer
attention sees the kept layers) and the kept latents come back bit-identical. Kept layers' pixels
and masks are *copied* from the input stack, never re-decoded, so they are bit-identical too; only
the edited layers are decoded.

Stacks without latents (user images, PSD files, stacks after a move or scale) are encoded first
with :meth:`LayerDiffModel.encode_layers`. Every function returns a new stack and never writes into
the one it was given.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerdiff import limits
from layerdiff.conditioning import LayerPrompts, check_model, describe_scene
from layerdiff.config import IMAGE_CHANNELS, LAYER_CHANNELS
from layerdiff.errors import LayerDiffError
from layerdiff.model.bundle import LayerDiffModel
from layerdiff.pipeline import check_size, run
from layerdiff.sampling import Callback, Lock
from layerdiff.settings import SamplerSettings
from layerdiff.stack import LayerStack, automatic_name, default_name

logger = logging.getLogger("layerdiff.edit")

# What an edit regenerates of the chosen layer; the rest of that layer is locked.
REGENERATE = {
    "image and mask": slice(0, LAYER_CHANNELS),  # a new object (shape and look)
    "image only": slice(0, IMAGE_CHANNELS),  # new look, same shape (mask channels locked)
    "mask only": slice(IMAGE_CHANNELS, LAYER_CHANNELS),  # new shape, texture latents kept
}


@dataclass(frozen=True)
class EditDefaults:
    """Defaults (and ranges) of the edit functions and their node widgets."""

    style_strength: float = 0.5  # 0 keeps the layer, 1 regenerates its image from noise
    harmonize_strength: float = 0.0  # 0 = no harmonisation pass after a transform; try 0.2..0.3
    inpaint_grow: int = 1  # latent pixels the inpaint region is dilated by (seams)
    inpaint_grow_max: int = limits.RANGES["grow"].high
    region_threshold: float = 0.5  # region mask pixels above this are inside


EDIT_DEFAULTS = EditDefaults()


# ---------------------------------------------------------------------------- checks


def _index(stack: LayerStack, index, what: str = "layer_index") -> int:
    n = stack.num_layers
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < n:
        raise LayerDiffError(
            f"{what} {limits.show(index)} is out of range for a stack of {n} layers: use 0..{n - 1} (0 is the background, "
            "1.. the foregrounds back to front)"
        )
    return int(index)


def _check_strength(strength, what: str = "strength") -> float:
    return limits.check_float(strength, what)


def _check_common(seed, settings, callback, global_prompt=None, negative_prompt="") -> int:
    """The arguments every edit shares; returns the seed as an int."""
    if settings is not None and not isinstance(settings, SamplerSettings):
        raise LayerDiffError(f"settings {limits.show(settings)} is not a SamplerSettings: give "
                             "SamplerSettings(steps=..., cfg=...) or None")
    limits.check_callback(callback)
    limits.check_text(global_prompt, "global_prompt", optional=True)
    limits.check_text(negative_prompt, "negative_prompt")
    return limits.check_int(seed, "seed")


def _check_model_fits(model: LayerDiffModel, stack: LayerStack) -> None:
    check_model(model)
    if not isinstance(stack, LayerStack):
        raise LayerDiffError(f"expected a LayerStack (LAYERDIFF_LAYERS), got {type(stack).__name__}")
    if stack.num_layers > model.max_layers:
        raise LayerDiffError(
            f"the stack has {stack.num_layers} layers but this model handles at most {model.max_layers} "
            f"(background + {model.max_layers - 1} foregrounds): remove {stack.num_layers - model.max_layers} "
            "layer(s) first (Transform Layer: remove)"
        )
    f = model.vae_scale_factor
    try:
        check_size(stack.width, stack.height, f)
    except LayerDiffError as exc:
        raise LayerDiffError(f"the layers are {stack.width}x{stack.height} (WxH): {exc}; resize them first") from None
    limits.check_run_size(stack.width, stack.height, stack.num_layers, stack.batch_size,
                          names=("the stack's layer count", "the stack's batch"))
    limits.check_run_memory(model.config, stack.batch_size, stack.num_layers, stack.height, stack.width,
                            model.dtype, model.device)


def _check_prompt(prompt, what: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise LayerDiffError(f"{what} {prompt!r} is empty: describe what the edited layer should show")
    return prompt.strip()


# ---------------------------------------------------------------------------- prompts

def _prompt_of(stack: LayerStack, i: int) -> str:
    """Layer i's prompt; for stacks without prompts (user images, PSD files) the prompt part of an
    automatic name ('layer 1: a red star'), else the name itself, else a generic word."""
    if stack.prompts[i].strip():
        return stack.prompts[i]
    name = stack.names[i].strip()
    automatic, prompt = automatic_name(name)
    if prompt:
        return prompt
    if name and not automatic:
        return name
    return "background" if i == 0 else "object"


def _layer_prompts(
    stack: LayerStack, changed: dict[int, str], global_prompt: str | None, negative: str
) -> LayerPrompts:
    """Prompts of the stack with the changed layers' prompts replaced; the global prompt is the
    given one, else the stack's with each changed layer's old prompt replaced where it occurs,
    else one described from the layer prompts."""
    old = [_prompt_of(stack, i) for i in range(stack.num_layers)]
    new = [changed.get(i, p) for i, p in enumerate(old)]
    if global_prompt and global_prompt.strip():
        glob = global_prompt.strip()
    elif stack.global_prompt.strip():
        glob = stack.global_prompt
        for i, p in changed.items():
            if stack.prompts[i].strip() and stack.prompts[i] in glob:
                glob = glob.replace(stack.prompts[i], p)
    else:
        glob = describe_scene(new)
    return LayerPrompts(glob, tuple(new), negative or "")


def _name_for(stack: LayerStack, i: int, prompt: str) -> str:
    """Automatic names follow the new prompt; names a user gave are kept."""
    name = stack.names[i]
    return default_name(i, prompt) if automatic_name(name)[0] else name


# ---------------------------------------------------------------------------- latents


@torch.no_grad()
def ensure_latents(model: LayerDiffModel, stack: LayerStack) -> LayerStack:
    """The stack with layer latents: its own, or encoded with ``model.encode_layers``."""
    _check_model_fits(model, stack)
    f = model.vae_scale_factor
    want = (stack.height // f, stack.width // f)
    if stack.latents is not None:
        if tuple(stack.latents.shape[-2:]) == want:
            return stack
        logger.info("stack latents %s do not match this model's %s: re-encoding", tuple(stack.latents.shape), want)
    images = stack.images.to(model.device, torch.float32)  # (B, L, H, W, 3)
    masks = stack.masks.to(model.device, torch.float32)  # (B, K, H, W)
    latents = model.encode_layers(images, masks).float().to(stack.images.device)  # (B, L, 8, h, w)
    return stack.with_latents(latents)


@torch.no_grad()
def _decode_layer(model: LayerDiffModel, latents: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer i of latents (B, L, 8, h, w) -> image (B, H, W, 3) and soft mask (B, H, W) (None for
    the background). Same conversion as LayerDiffModel.decode_layers, for one layer only."""
    img = model.decode_images(latents[:, i, :IMAGE_CHANNELS])  # (B, 3, H, W) in [-1, 1]
    image = ((img + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).float()  # (B, H, W, 3)
    mask = None
    if i > 0:
        m = model.decode_images(latents[:, i, IMAGE_CHANNELS:]).mean(dim=1)  # (B, H, W): grey of the mask image
        mask = ((m + 1) / 2).clamp(0, 1).float()
    return image, mask


def _resample(
    model: LayerDiffModel,
    stack: LayerStack,
    prompts: LayerPrompts,
    keep: torch.Tensor,
    seed: int,
    settings: SamplerSettings | None,
    callback: Callback | None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Sample with everything where ``keep`` (bool, broadcastable to (B, L, 8, h, w)) is True locked
    to the stack's latents; returns latents (B, L, 8, h, w) on the stack's device, float32."""
    lat = stack.latents  # (B, L, 8, h, w)
    out = run(model, prompts, settings, seeds=limits.batch_seeds(seed, stack.batch_size), width=stack.width,
              height=stack.height, lock=Lock(lat, keep.to(lat.device)), init_latents=lat if strength < 1.0 else None,
              strength=strength, callback=callback, decode=False)
    return out.to(lat.device, torch.float32)


def _keep_all(stack: LayerStack, spatial: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """(B, L, 8, *spatial) all True: start of a lock mask."""
    return torch.ones(stack.batch_size, stack.num_layers, LAYER_CHANNELS, *spatial, dtype=torch.bool)


def _binary(mask: torch.Tensor) -> torch.Tensor:
    return (mask > 0.5).float()


# ---------------------------------------------------------------------------- edit and inpaint


def edit_layer(
    model: LayerDiffModel,
    stack: LayerStack,
    index: int,
    prompt: str,
    seed: int = 0,
    regenerate: str = "image and mask",
    global_prompt: str | None = None,
    settings: SamplerSettings | None = None,
    callback: Callback | None = None,
    negative_prompt: str = "",
) -> LayerStack:
    """Regenerate layer ``index`` with a new prompt and seed; every other layer is locked, so its
    latents, pixels and mask come back bit-identical, and the new layer fits them.

    ``regenerate``: "image and mask" (a new object), "image only" (same shape) or "mask only".
    The background has no mask: it regenerates its image only. Sample b uses seed ``seed + b``.
    """
    return _edit(model, stack, index, prompt, seed, regenerate, None, EDIT_DEFAULTS.inpaint_grow,
                 global_prompt, settings, callback, negative_prompt)


def inpaint_layer(
    model: LayerDiffModel,
    stack: LayerStack,
    index: int,
    region: torch.Tensor,
    prompt: str,
    seed: int = 0,
    grow: int = EDIT_DEFAULTS.inpaint_grow,
    regenerate: str = "image and mask",
    global_prompt: str | None = None,
    settings: SamplerSettings | None = None,
    callback: Callback | None = None,
    negative_prompt: str = "",
) -> LayerStack:
    """Regenerate layer ``index`` inside ``region`` (B, H, W) or (H, W), 1 = change, at the layers'
    pixel size. The region is taken to latent cells (a cell is inside if any of its pixels is above
    0.5), grown by ``grow`` cells; outside it the layer is locked too, and its pixels and mask come
    back identical (new pixels are pasted only inside the grown, latent-aligned region)."""
    return _edit(model, stack, index, prompt, seed, regenerate, region, grow, global_prompt, settings, callback,
                 negative_prompt)


def region_to_latent(region: torch.Tensor, stack: LayerStack, factor: int, grow: int) -> torch.Tensor:
    """Pixel region (B, H, W) / (1, H, W) / (H, W) -> editable latent cells (B, h, w) bool."""
    if not isinstance(region, torch.Tensor):
        raise LayerDiffError(f"region must be a mask tensor (B, H, W), got {type(region).__name__}")
    r = region.detach().float()
    if r.ndim == 2:
        r = r[None]
    B, H, W = stack.batch_size, stack.height, stack.width
    if r.ndim != 3 or tuple(r.shape[1:]) != (H, W) or r.shape[0] not in (1, B):
        raise LayerDiffError(
            f"region mask has shape {tuple(region.shape)} but the layers need ({B}, {H}, {W}) or (1, {H}, {W}) "
            f"(B, H, W): give a mask of the layers' size {W}x{H} (resize or crop the mask)"
        )
    grow = limits.check_int(grow, "grow")
    inside = (r > EDIT_DEFAULTS.region_threshold).float().expand(B, H, W).to("cpu")
    cells = F.max_pool2d(inside[:, None], factor, factor)  # (B, 1, h, w): any pixel inside
    if grow:
        cells = F.max_pool2d(cells, 2 * grow + 1, stride=1, padding=grow)
    return cells[:, 0] > 0


def _edit(model, stack, index, prompt, seed, regenerate, region, grow, global_prompt, settings, callback, negative):
    _check_model_fits(model, stack)
    i = _index(stack, index)
    prompt = _check_prompt(prompt)
    seed = _check_common(seed, settings, callback, global_prompt, negative)
    if not isinstance(regenerate, str) or regenerate not in REGENERATE:
        raise LayerDiffError(f"regenerate {regenerate!r} is unknown: choose one of {', '.join(map(repr, REGENERATE))}")
    channels = REGENERATE[regenerate]
    if i == 0:
        if regenerate == "mask only":
            raise LayerDiffError(
                "layer_index 0 is the background, which has no mask to edit: choose a foreground (1..K) or "
                "regenerate 'image and mask' / 'image only'"
            )
        channels = slice(0, IMAGE_CHANNELS)  # the background's mask slot stays the all-white latent
    f = model.vae_scale_factor
    cells = None
    if region is not None:
        cells = region_to_latent(region, stack, f, grow)  # (B, h, w)
        if not cells.any():
            raise LayerDiffError(
                "the region mask is empty (no pixel above 0.5): paint the area to change (1 = change)"
            )
    stack = ensure_latents(model, stack)
    B, L, _, h, w = stack.latents.shape
    keep = _keep_all(stack, (h, w))  # (B, L, 8, h, w)
    if cells is None:
        keep[:, i, channels] = False
    else:
        keep[:, i, channels] = ~cells[:, None]
    prompts = _layer_prompts(stack, {i: prompt}, global_prompt, negative)
    latents = _resample(model, stack, prompts, keep, seed, settings, callback)
    image, soft = _decode_layer(model, latents, i)
    new_image = image if channels.start == 0 else None
    new_mask = _binary(soft) if soft is not None and channels.stop == 8 else None
    if cells is not None:  # paste only inside the latent-aligned region
        paste = cells.repeat_interleave(f, 1).repeat_interleave(f, 2).to(stack.images.device)  # (B, H, W)
        if new_image is not None:
            new_image = torch.where(paste[..., None], new_image.to(stack.images), stack.images[:, i])
        if new_mask is not None:
            new_mask = torch.where(paste, new_mask.to(stack.masks), stack.masks[:, i - 1])
    out = stack.replace_layer(
        i, image=new_image, mask=new_mask, latent=latents[:, i], prompt=prompt,
        name=_name_for(stack, i, prompt), seed=int(seed),
    )
    return dataclasses.replace(out, global_prompt=prompts.global_prompt)


# ---------------------------------------------------------------------------- style


def _style_indices(stack: LayerStack, layers) -> list[int]:
    if layers is None:
        return list(range(stack.num_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not len(layers):
        raise LayerDiffError(f"layers {layers!r} must be a non-empty list of layer indices, or None for all")
    return sorted({_index(stack, j, "layer index") for j in layers})


def style_layers(
    model: LayerDiffModel,
    stack: LayerStack,
    style: str,
    strength: float = EDIT_DEFAULTS.style_strength,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    settings: SamplerSettings | None = None,
    callback: Callback | None = None,
    negative_prompt: str = "",
) -> LayerStack:
    """Restyle ``layers`` (None: all): their image channels are noised to ``strength`` and
    denoised with ``", " + style`` added to their prompts; their mask channels stay locked (the
    layout is kept), other layers are locked whole. Strength 0 returns ``stack`` itself."""
    strength = _check_strength(strength)
    if not isinstance(style, str):
        raise LayerDiffError(f"style must be a text such as 'watercolor style', got {style!r}")
    _check_model_fits(model, stack)
    seed = _check_common(seed, settings, callback, negative_prompt=negative_prompt)
    chosen = _style_indices(stack, layers)
    if strength == 0.0:
        return stack
    stack = ensure_latents(model, stack)
    keep = _keep_all(stack)  # (B, L, 8, 1, 1)
    for j in chosen:
        keep[:, j, :IMAGE_CHANNELS] = False
    style = style.strip()
    changed = {j: f"{_prompt_of(stack, j)}, {style}" if style else _prompt_of(stack, j) for j in chosen}
    glob = stack.global_prompt.strip() or describe_scene([_prompt_of(stack, i) for i in range(stack.num_layers)])
    if style and len(chosen) == stack.num_layers:  # the whole picture is restyled
        glob = f"{glob}, {style}"
    prompts = _layer_prompts(stack, changed, glob, negative_prompt)
    latents = _resample(model, stack, prompts, keep, seed, settings, callback, strength=strength)
    out = stack
    for j in chosen:
        image, _ = _decode_layer(model, latents, j)
        out = out.replace_layer(j, image=image, latent=latents[:, j], prompt=changed[j], seed=int(seed))
    # the mask channels were locked: the masks, and the names, stay as they were
    return dataclasses.replace(out, global_prompt=glob)


# ---------------------------------------------------------------------------- transform


def transform_layer(
    stack: LayerStack,
    index: int,
    dx: int = 0,
    dy: int = 0,
    scale: float = 1.0,
    move_to: int | None = None,
    remove: bool = False,
    model: LayerDiffModel | None = None,
    harmonize: float = EDIT_DEFAULTS.harmonize_strength,
    seed: int = 0,
    settings: SamplerSettings | None = None,
    callback: Callback | None = None,
    negative_prompt: str = "",
) -> LayerStack:
    """Scale foreground ``index`` (about its mask's centre), shift it by (dx, dy) pixels, then move
    it to position ``move_to`` (1..K, None keeps it); or ``remove`` it. Plain stack operations: the
    other layers are untouched. With ``harmonize`` > 0 a style pass without a style phrase at that
    strength (masks locked) blends the transformed layer in (after a removal: every layer)."""
    harmonize = _check_strength(harmonize, "harmonize")
    if not isinstance(stack, LayerStack):
        raise LayerDiffError(f"expected a LayerStack (LAYERDIFF_LAYERS), got {type(stack).__name__}")
    index = _index(stack, index)
    if index == 0:
        raise LayerDiffError(
            "layer_index 0 is the background, which cannot be moved, scaled, reordered or removed: "
            f"choose a foreground (1..{stack.num_layers - 1})" if stack.num_layers > 1 else
            "layer_index 0 is the background and the stack has no foreground to transform"
        )
    dx, dy = limits.check_int(dx, "dx"), limits.check_int(dy, "dy")
    scale = limits.check_float(scale, "scale")
    move_to = limits.check_int(move_to, "move_to", optional=True)
    remove = limits.check_flag(remove, "remove")
    seed = _check_common(seed, settings, callback, negative_prompt=negative_prompt)
    if model is not None:
        check_model(model)
    if harmonize > 0 and model is None:
        raise LayerDiffError("harmonize > 0 needs a model: connect the LayerDiff model, or set harmonize to 0")
    if remove:
        out = stack.remove_layer(index)
        targets = None  # every remaining layer
    else:
        out = stack
        if scale != 1.0:
            out = out.scale_layer(index, float(scale))
        if dx or dy:
            out = out.translate_layer(index, int(dx), int(dy))
        new_index = index
        if move_to not in (None, 0) and move_to != index:
            out = out.move_layer(index, move_to)
            new_index = move_to
        targets = [new_index]
    if harmonize == 0.0:
        return out
    return style_layers(model, out, "", harmonize, targets, seed, settings, callback, negative_prompt)
