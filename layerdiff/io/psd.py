"""Layered PSD files <-> LayerStack, through psd-tools (an optional dependency, imported lazily).

A saved PSD holds the background as an opaque pixel layer at the bottom, then one RGBA pixel layer
per foreground (alpha = mask), back to front = bottom to top, all 8-bit, plus the flat composite.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from layerdiff.errors import LayerDiffError
from layerdiff.io.export import atomic_write, ensure_dir, to_uint8
from layerdiff.stack import EXPOSED_GREY, LayerStack

logger = logging.getLogger("layerdiff.io.psd")

PSD_TOOLS_INSTALL = 'pip install "psd-tools>=1.9.28"'


def require_psd_tools():
    """The psd_tools module, or LayerDiffError with the pip line that installs it."""
    try:
        import psd_tools
    except ImportError as e:
        raise LayerDiffError(
            f"PSD files need the psd-tools package, which is not installed: {PSD_TOOLS_INSTALL}"
        ) from e
    return psd_tools


def _add_pixel_layer(psd, image: Image.Image, name: str) -> None:
    if hasattr(psd, "create_pixel_layer"):  # newer psd-tools (tested with 1.26)
        psd.create_pixel_layer(image, name=name)
        return
    from psd_tools.api.layers import PixelLayer  # older psd-tools (untested): build, then append

    layer = PixelLayer.frompil(image, psd, name)
    if layer not in list(psd):
        psd.append(layer)


def save_psd(
    stack: LayerStack, path: str | os.PathLike, batch_index: int = 0, overwrite: bool = False
) -> Path:
    """Write sample `batch_index` of `stack` as a layered 8-bit RGB PSD at `path` (atomically).

    Layers bottom to top: names[0] (opaque background), then each foreground as RGBA with alpha =
    mask. The document's merged image is the composite (psd-tools re-renders it from the layers
    where it can; otherwise the stack's own composite is kept). Prompts and seeds are not stored.
    """
    from layerdiff.io.export import check_export_args  # export imports this module lazily too

    check_export_args(stack, batch_index)
    path = Path(path)
    if not overwrite and (path.exists() or path.is_symlink()):
        raise LayerDiffError(
            f"PSD file {path} already exists: pass overwrite=True to replace it, or choose another name"
        )
    if path.is_dir():
        raise LayerDiffError(f"PSD path {path} is a folder: give a file name such as {path / 'layers.psd'}")
    require_psd_tools()
    from psd_tools import PSDImage

    one = stack.select_batch([batch_index])
    composite = Image.fromarray(to_uint8(one.composite()[0])).convert("RGBA")  # (H, W, 3) -> RGBA
    # An RGBA document stores each layer's alpha as layer transparency (not as a layer mask).
    psd = PSDImage.frompil(composite)
    _add_pixel_layer(psd, Image.fromarray(to_uint8(one.images[0, 0])), stack.names[0])
    for i in range(1, stack.num_layers):
        _add_pixel_layer(psd, Image.fromarray(to_uint8(one.layer_rgba(i)[0])), stack.names[i])
    ensure_dir(path.parent)
    atomic_write(path, psd.save)
    logger.info("wrote %d-layer PSD %s", stack.num_layers, path)
    return path


def _layer_rgba(layer, width: int, height: int) -> np.ndarray | None:
    """(H, W, 4) float32 canvas with the layer's pixels placed at its offset; alpha 0 elsewhere."""
    image = layer.topil()
    if image is None or image.width == 0 or image.height == 0:
        return None
    src = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255  # (h, w, 4)
    src[..., 3] *= layer.opacity / 255
    canvas = np.zeros((height, width, 4), np.float32)
    canvas[..., :3] = EXPOSED_GREY
    left, top = layer.left, layer.top
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + src.shape[1], width), min(top + src.shape[0], height)
    if x1 > x0 and y1 > y0:
        canvas[y0:y1, x0:x1] = src[y0 - top : y1 - top, x0 - left : x1 - left]
    mask = layer.mask if layer.has_mask() else None
    if mask is not None and not mask.disabled:
        # a layer mask (Photoshop's, or psd-tools' way to keep alpha in a non-RGBA document)
        stored = mask.topil()
        full = Image.new("L", (width, height), int(mask.background_color))
        if stored is not None:
            full.paste(stored.convert("L"), (mask.left, mask.top))
        canvas[..., 3] *= np.asarray(full, dtype=np.float32) / 255  # (H, W)
    return canvas


def load_psd(path: str | os.PathLike) -> LayerStack:
    """Read a layered PSD/PSB into a LayerStack with B = 1, no latents, empty prompts.

    Visible pixel layers are taken bottom to top, groups flattened in order; hidden layers are
    skipped (so the stack's composite matches what the editor shows). Layer opacity and the
    layer's pixel mask multiply alpha; blend modes, vector masks, clipping and effects are
    ignored. Layers of any size and offset are placed on the document canvas. The bottom layer
    becomes the background, composited over white where it is transparent (white: the usual
    canvas colour in editors); the others become foregrounds with mask = alpha and grey
    0.5 RGB outside their pixel area. Precision is 8 bits per channel.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise LayerDiffError(f"PSD file {path} {what}: check the path")
    require_psd_tools()
    from psd_tools import PSDImage

    try:
        psd = PSDImage.open(path)
    except Exception as e:  # psd-tools raises many types on malformed files
        raise LayerDiffError(
            f"cannot read {path} as a PSD file ({type(e).__name__}: {e}); save it as .psd from your editor"
        ) from e
    width, height = psd.width, psd.height
    all_layers = list(psd.descendants())
    pixel = [layer for layer in all_layers if layer.kind == "pixel"]
    hidden = [layer.name for layer in pixel if not layer.is_visible()]
    if hidden:
        logger.info("%s: hidden layers skipped: %s", path, hidden)
    rgba, names = [], []
    for layer in pixel:
        if not layer.is_visible():
            continue
        canvas = _layer_rgba(layer, width, height)
        if canvas is None:
            logger.info("%s: empty layer %r skipped", path, layer.name)
            continue
        blend = str(getattr(layer, "blend_mode", "")).rsplit(".", 1)[-1].lower()
        if blend not in ("", "normal", "pass_through"):
            logger.warning("%s: layer %r uses blend mode %s, read as normal", path, layer.name, blend)
        rgba.append(canvas)
        names.append(layer.name)
    if not rgba:
        kinds = sorted({layer.kind for layer in all_layers})
        found = f"only {', '.join(kinds)} layers" if kinds else "no layers at all"
        raise LayerDiffError(
            f"{path} has no pixel layers: found {found} (hidden and empty layers are skipped); "
            f"rasterise the layers and save a layered PSD"
        )
    stacked = torch.from_numpy(np.stack(rgba))  # (L, H, W, 4)
    bg = stacked[0]
    background = bg[..., :3] * bg[..., 3:] + (1 - bg[..., 3:])  # over white, (H, W, 3)
    images = torch.cat([background[None], stacked[1:, ..., :3]])  # (L, H, W, 3)
    masks = stacked[1:, ..., 3]  # (K, H, W)
    return LayerStack(images=images[None], masks=masks[None], names=tuple(names))
