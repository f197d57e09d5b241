"""Layered PSD files <-> LayerStack, through psd-tools (an optional dependency, imported lazily).

A saved PSD holds the background as an opaque pixel layer at the bottom, then one RGBA pixel layer
per foreground (alpha = mask), back to front = bottom to top, all 8-bit, plus the flat composite.
Layer names are stored in full as Unicode (the 'luni' block) with a MacRoman name beside them for
older readers.

Reading is bounded before anything is decoded: the header's canvas, the layer count and every
layer's own pixel area are checked against the limits below, and layers are decoded one at a time
into the output tensors, so memory follows the pixels really returned, never what a header claims.
"""

from __future__ import annotations

import logging
import os
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from layerdiff.errors import LayerDiffError
from layerdiff.io import writing
from layerdiff.io.writing import check_export_args, ensure_dir, to_uint8
from layerdiff.stack import EXPOSED_GREY, LayerStack

logger = logging.getLogger("layerdiff.io.psd")

PSD_TOOLS_INSTALL = 'pip install "psd-tools>=1.9.28"'

PSD_MAX_SIDE = 30_000  # the format's limit per side (version 1, .psd)
PSB_MAX_SIDE = 300_000  # the large document format's limit (version 2, .psb)
MAX_PSD_CHANNELS = 56  # the format's limit
MAX_NAME_UNITS = 255  # Photoshop's limit on a layer name, in UTF-16 code units
# What load_psd returns is float32 (1, L, H, W, 3) images + (1, L - 1, H, W) masks: 16 bytes per
# layer pixel. These bound it (2 GiB) and what one layer's decoding holds at once.
MAX_LOAD_LAYER_PIXELS = 1 << 27  # layers x canvas pixels
MAX_LOAD_CANVAS_PIXELS = 1 << 26  # canvas width x height (8192 x 8192)
MAX_LOAD_LAYERS = 256
MAX_PSD_FILE_BYTES = 2 << 30  # the .psd format's own size limit; psd-tools reads the whole file
_COLOR_MODES = {0: "bitmap", 1: "grayscale", 2: "indexed", 3: "RGB", 4: "CMYK", 7: "multichannel",
                8: "duotone", 9: "Lab"}  # fmt: skip


def require_psd_tools():
    """The psd_tools module, or LayerDiffError with the pip line that installs it."""
    try:
        import psd_tools
    except ImportError as e:
        raise LayerDiffError(
            f"PSD files need the psd-tools package, which is not installed: {PSD_TOOLS_INSTALL}"
        ) from e
    return psd_tools


# ---------------------------------------------------------------------------- writing


def check_psd_size(width: int, height: int) -> None:
    """LayerDiffError unless a width x height document fits the .psd format (30000 a side)."""
    if not (1 <= width <= PSD_MAX_SIDE and 1 <= height <= PSD_MAX_SIDE):
        raise LayerDiffError(
            f"a {width}x{height} image cannot be saved as a PSD (at most {PSD_MAX_SIDE} pixels a side): "
            f"choose a smaller size, or skip the PSD (--no-psd)"
        )


def psd_layer_names(name: str) -> tuple[str, str]:
    """(Unicode name, MacRoman name) of a layer: the full name for the 'luni' block, cut to 255
    UTF-16 units (lone surrogates become U+FFFD), and a Pascal-string fallback for readers that
    know only MacRoman (letters outside it lose their accents or become '?')."""
    units = name.encode("utf-16-be", "surrogatepass").decode("utf-16-be", "replace").encode("utf-16-be")
    units = units[: 2 * MAX_NAME_UNITS]
    if len(units) >= 2 and 0xD8 <= units[-2] <= 0xDB:  # do not cut a surrogate pair in two
        units = units[:-2]
    full = units.decode("utf-16-be")
    fallback = []
    for ch in unicodedata.normalize("NFC", full):
        try:
            ch.encode("mac_roman")
            fallback.append(ch)
        except UnicodeEncodeError:
            base = unicodedata.normalize("NFKD", ch).encode("mac_roman", "ignore").decode("mac_roman")
            fallback.append(base or "?")
    return full, "".join(fallback)[:255]


def _add_pixel_layer(psd, image: Image.Image, name: str) -> None:
    full, fallback = psd_layer_names(name)
    if hasattr(psd, "create_pixel_layer"):  # newer psd-tools (tested with 1.26)
        layer = psd.create_pixel_layer(image, name=fallback)
    else:
        from psd_tools.api.layers import PixelLayer  # older psd-tools (untested): build, then append

        layer = PixelLayer.frompil(image, psd, fallback)
        if layer not in list(psd):
            psd.append(layer)
    layer.name = full  # the setter stores the 'luni' block (and '?' as the MacRoman name...)
    record = getattr(layer, "_record", None)
    if record is not None:
        record.name = fallback  # ...which the fallback, letters kept, replaces


def save_psd(
    stack: LayerStack, path: str | os.PathLike, batch_index: int = 0, overwrite: bool = False
) -> Path:
    """Write sample `batch_index` of `stack` as a layered 8-bit RGB PSD at `path` (atomically).

    Layers bottom to top: names[0] (opaque background), then each foreground as RGBA with alpha =
    mask. The document's merged image is the composite (psd-tools re-renders it from the layers
    where it can; otherwise the stack's own composite is kept). Prompts and seeds are not stored.
    """
    check_export_args(stack, batch_index)
    check_psd_size(stack.width, stack.height)
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
    try:
        composite = Image.fromarray(to_uint8(one.composite()[0])).convert("RGBA")  # (H, W, 3) -> RGBA
        # An RGBA document stores each layer's alpha as layer transparency (not as a layer mask).
        psd = PSDImage.frompil(composite)
        _add_pixel_layer(psd, Image.fromarray(to_uint8(one.images[0, 0])), stack.names[0])
        for i in range(1, stack.num_layers):
            _add_pixel_layer(psd, Image.fromarray(to_uint8(one.layer_rgba(i)[0])), stack.names[i])
    except (ValueError, TypeError, struct.error, UnicodeError) as e:
        raise LayerDiffError(
            f"cannot build the PSD {path} ({type(e).__name__}: {_short(e)}); skip the PSD (--no-psd)"
        ) from e
    ensure_dir(path.parent)
    writing.atomic_write(path, psd.save)
    logger.info("wrote %d-layer PSD %s", stack.num_layers, path)
    return path


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class PSDHeader:
    """The 26-byte file header: what the document claims, before anything is decoded."""

    version: int  # 1 = .psd, 2 = .psb
    channels: int
    height: int
    width: int
    depth: int
    color_mode: int


def _damaged(path: Path, why: str) -> LayerDiffError:
    return LayerDiffError(f"cannot read {path} as a PSD file ({why}); save it as .psd from your editor")


def read_psd_header(path: str | os.PathLike) -> PSDHeader:
    """The header of the PSD/PSB file at `path`, checked against the format's limits."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError as e:
        raise LayerDiffError(f"cannot read PSD file {path}: {e.strerror or e}; check the file") from e
    if len(head) < 26:
        raise _damaged(path, f"{len(head)} bytes, less than a PSD header")
    signature, version, _reserved, channels, height, width, depth, mode = struct.unpack(">4sH6sHIIHH", head)
    if signature != b"8BPS":
        raise _damaged(path, f"it starts with {signature!r}, not the PSD signature b'8BPS'")
    if version not in (1, 2):
        raise _damaged(path, f"PSD version {version}; 1 (.psd) and 2 (.psb) exist")
    if not 1 <= channels <= MAX_PSD_CHANNELS:
        raise _damaged(path, f"the header claims {channels} channels; a PSD has 1 to {MAX_PSD_CHANNELS}")
    side = PSD_MAX_SIDE if version == 1 else PSB_MAX_SIDE
    if not (1 <= width <= side and 1 <= height <= side):
        kind = ".psd" if version == 1 else ".psb"
        raise _damaged(
            path, f"the header claims a {width}x{height} canvas; a {kind} is 1 to {side} pixels a side"
        )
    if depth not in (1, 8, 16, 32):
        raise _damaged(path, f"the header claims {depth} bits per channel; 1, 8, 16 or 32 exist")
    if mode not in _COLOR_MODES:
        raise _damaged(path, f"the header claims colour mode {mode}, which PSD does not define")
    return PSDHeader(version, channels, height, width, depth, mode)


def _short(text, limit: int = 200) -> str:
    """Untrusted text (a layer name, a parser's message) cut and folded onto one line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def check_load_size(path: Path, width: int, height: int, layers: int = 1) -> None:
    """LayerDiffError unless `layers` layers of a width x height canvas fit load_psd's limits."""
    canvas = width * height
    if canvas > MAX_LOAD_CANVAS_PIXELS:
        raise LayerDiffError(
            f"{path} has a {width}x{height} canvas ({_megapixels(canvas)}); Load PSD reads at most "
            f"{_megapixels(MAX_LOAD_CANVAS_PIXELS)}: scale the document down in your editor"
        )
    if layers > MAX_LOAD_LAYERS:
        raise LayerDiffError(
            f"{path} has {layers} visible pixel layers; Load PSD reads at most {MAX_LOAD_LAYERS}: "
            f"merge or hide some"
        )
    if layers * canvas > MAX_LOAD_LAYER_PIXELS:
        need = layers * canvas * 16 / 2**30
        raise LayerDiffError(
            f"{path} has {layers} visible layers of {width}x{height} ({need:.1f} GiB as layers); Load PSD "
            f"reads at most {_megapixels(MAX_LOAD_LAYER_PIXELS)} in all layers: merge layers or scale the "
            f"document down"
        )


def _check_layer_area(path: Path, layer, what: str, width: int, height: int) -> None:
    if width * height > MAX_LOAD_CANVAS_PIXELS:
        raise LayerDiffError(
            f"{path}: the {what} of layer {_short(layer.name, 60)!r} is {width}x{height} pixels "
            f"({_megapixels(width * height)}); Load PSD decodes at most "
            f"{_megapixels(MAX_LOAD_CANVAS_PIXELS)} per layer: crop the layer to the canvas"
        )


def _visible_pixel_layers(psd, path: Path) -> list:
    """Visible pixel layers with pixels, bottom to top (groups flattened); sizes checked."""
    all_layers = list(psd.descendants())
    pixel = [layer for layer in all_layers if layer.kind == "pixel"]
    hidden = [layer.name for layer in pixel if not layer.is_visible()]
    if hidden:
        logger.info("%s: hidden layers skipped: %s", path, hidden[:20])
    chosen = []
    for layer in pixel:
        if not layer.is_visible():
            continue
        if layer.width <= 0 or layer.height <= 0:
            logger.info("%s: empty layer %r skipped", path, layer.name)
            continue
        _check_layer_area(path, layer, "pixel area", layer.width, layer.height)
        mask = layer.mask if layer.has_mask() else None
        if mask is not None:
            _check_layer_area(path, layer, "mask", max(mask.width, 0), max(mask.height, 0))
        chosen.append(layer)
    if not chosen:
        kinds = sorted({layer.kind for layer in all_layers})
        found = f"only {', '.join(kinds)} layers" if kinds else "no layers at all"
        raise LayerDiffError(
            f"{path} has no pixel layers: found {found} (hidden and empty layers are skipped); "
            f"rasterise the layers and save a layered PSD"
        )
    return chosen


def _place_layer(layer, width: int, height: int, rgb: torch.Tensor, alpha: torch.Tensor) -> bool:
    """Decode `layer` into rgb (H, W, 3) and alpha (H, W), placed at its offset: grey and alpha 0
    outside its pixels. False if it has no pixels after all."""
    image = layer.topil()
    if image is None or image.width == 0 or image.height == 0:
        return False
    src = np.asarray(image.convert("RGBA"))  # (h, w, 4) uint8
    rgb.fill_(EXPOSED_GREY)
    alpha.zero_()
    left, top = layer.left, layer.top
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + src.shape[1], width), min(top + src.shape[0], height)
    if x1 > x0 and y1 > y0:
        part = torch.from_numpy(np.array(src[y0 - top : y1 - top, x0 - left : x1 - left]))  # (h', w', 4)
        rgb[y0:y1, x0:x1] = part[..., :3].float() / 255
        alpha[y0:y1, x0:x1] = part[..., 3].float() * (layer.opacity / 255 / 255)
    mask = layer.mask if layer.has_mask() else None
    if mask is not None and not mask.disabled:
        # a layer mask (Photoshop's, or psd-tools' way to keep alpha in a non-RGBA document)
        stored = mask.topil()
        full = Image.new("L", (width, height), int(mask.background_color))
        if stored is not None:
            full.paste(stored.convert("L"), (mask.left, mask.top))
        alpha.mul_(torch.from_numpy(np.array(full)).float() / 255)  # (H, W)
    return True


def load_psd(path: str | os.PathLike) -> LayerStack:
    """Read a layered PSD/PSB into a LayerStack with B = 1, no latents, empty prompts.

    Visible pixel layers are taken bottom to top, groups flattened in order; hidden layers are
    skipped (so the stack's composite matches what the editor shows). Layer opacity and the
    layer's pixel mask multiply alpha; blend modes, vector masks, clipping and effects are
    ignored. Layers of any size and offset are placed on the document canvas. The bottom layer
    becomes the background, composited over white where it is transparent (white: the usual
    canvas colour in editors); the others become foregrounds with mask = alpha and grey
    0.5 RGB outside their pixel area. Precision is 8 bits per channel.

    Damaged files and files beyond the MAX_LOAD_* limits end in LayerDiffError before their
    pixels are decoded.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist" if not path.exists() else (
            "is not a regular file (a pipe, socket or device)")
        raise LayerDiffError(f"PSD file {path} {what}: check the path")
    size = path.stat().st_size
    if size > MAX_PSD_FILE_BYTES:
        raise LayerDiffError(
            f"{path} is {size / 2**30:.1f} GiB; Load PSD reads files of at most "
            f"{MAX_PSD_FILE_BYTES / 2**30:.0f} GiB: flatten or scale the document down"
        )
    header = read_psd_header(path)
    check_load_size(path, header.width, header.height)
    require_psd_tools()
    from psd_tools import PSDImage

    try:
        psd = PSDImage.open(path)
    except Exception as e:  # psd-tools raises many types on malformed files
        raise _damaged(path, f"{type(e).__name__}: {_short(e)}") from e
    width, height = psd.width, psd.height
    try:
        layers = _visible_pixel_layers(psd, path)
    except LayerDiffError:
        raise
    except Exception as e:  # damaged layer records, absurd nesting (RecursionError), ...
        raise LayerDiffError(
            f"cannot read the layers of {path} ({type(e).__name__}: {_short(e)}); the file is damaged: "
            f"save it again from your editor"
        ) from e
    check_load_size(path, width, height, len(layers))

    images = torch.empty(1, len(layers), height, width, 3)  # (1, L, H, W, 3)
    masks = torch.empty(1, max(len(layers) - 1, 0), height, width)  # (1, K, H, W)
    background_alpha = torch.empty(height, width)
    names, n = [], 0
    for layer in layers:
        try:
            alpha = background_alpha if n == 0 else masks[0, n - 1]
            placed = _place_layer(layer, width, height, images[0, n], alpha)
        except Exception as e:  # a damaged channel, an unsupported colour mode, ...
            raise LayerDiffError(
                f"cannot decode layer {_short(layer.name, 60)!r} of {path} "
                f"({type(e).__name__}: {_short(e)}); save the PSD again from your editor as 8-bit RGB"
            ) from e
        if not placed:
            logger.info("%s: empty layer %r skipped", path, layer.name)
            continue
        blend = str(getattr(layer, "blend_mode", "")).rsplit(".", 1)[-1].lower()
        if blend not in ("", "normal", "pass_through"):
            logger.warning("%s: layer %r uses blend mode %s, read as normal", path, layer.name, blend)
        if n == 0:  # the background, over white: (H, W, 3)
            a = background_alpha[..., None]
            images[0, 0].mul_(a).add_(1 - a)
        names.append(layer.name)
        n += 1
    if n == 0:
        raise LayerDiffError(
            f"{path} has no pixel layers with pixels (hidden and empty layers are skipped); "
            f"rasterise the layers and save a layered PSD"
        )
    if n < len(layers):  # layers without pixels after all: keep only the filled slots
        images, masks = images[:, :n].clone(), masks[:, : n - 1].clone()
    return LayerStack(images=images, masks=masks, names=tuple(names))
