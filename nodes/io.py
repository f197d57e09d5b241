"""Save Layers as PSD (output folder, ComfyUI's counter naming) and Load PSD as Layers (input folder)."""

from __future__ import annotations

import hashlib
import logging
import os

from layerdiff.errors import LayerDiffError
from layerdiff.io.psd import load_psd, save_psd
from layerdiff.io.resultset import clean_stale_temp_files
from layerdiff.io.writing import png_bytes, to_uint8

from . import _host, convert

logger = logging.getLogger("layerdiff.nodes")


class LayerDiffSavePSD:
    DESCRIPTION = (
        "Saves each layer stack as a layered PSD in ComfyUI's output folder, named like Save Image "
        "(<prefix>_00001_.psd, counting up, never overwriting): the background at the bottom, each foreground as a "
        "transparent layer above it, back to front. The node shows the composite."
    )
    CATEGORY = "LayerDiff/io"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "layers": ("LAYERDIFF_LAYERS", {"tooltip": "The layer stacks to save, one PSD per sample."}),
            "filename_prefix": ("STRING", {"default": "LayerDiff", "tooltip": (
                "File name prefix, may include a subfolder ('layers/scene') and Save Image's %date:...% style "
                "variables. Files go to ComfyUI's output folder.")}),
        }}

    def save(self, layers, filename_prefix="LayerDiff"):
        stack = convert.require_stack(layers)
        folder, base, counter, subfolder = _host.save_path(filename_prefix, stack.width, stack.height)
        clean_stale_temp_files(folder)  # what a killed save left (never another live writer's)
        saved, previews = [], []
        for b in range(stack.batch_size):
            while True:  # counter from the folder listing; skip names taken meanwhile (never overwrite)
                name = f"{base}_{counter:05}_.psd"
                try:
                    save_psd(stack, os.path.join(folder, name), batch_index=b, overwrite=False)
                    break
                except LayerDiffError:
                    if not os.path.exists(os.path.join(folder, name)):
                        raise
                    counter += 1
            saved.append({"filename": name, "subfolder": subfolder, "type": "output"})
            previews.append(self._preview(stack, b, f"{base}_{counter:05}_psd_preview.png", subfolder))
            counter += 1
        logger.info("saved %d PSD file(s) in %s", len(saved), folder)
        return {"ui": {"images": [p for p in previews if p], "psd": saved,
                       "text": [os.path.join(s["subfolder"], s["filename"]) for s in saved]}}

    @staticmethod
    def _preview(stack, b, name, subfolder):
        """The composite as a PNG in ComfyUI's temp folder, for the node's image preview."""
        try:
            folder = os.path.join(_host.folder("temp"), subfolder)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(png_bytes(to_uint8(stack.select_batch([b]).composite()[0])))
            return {"filename": name, "subfolder": subfolder, "type": "temp"}
        except OSError:
            logger.warning("could not write the PSD preview %s", name, exc_info=True)
            return None


class LayerDiffLoadPSD:
    DESCRIPTION = (
        "Loads a layered PSD from ComfyUI's input folder (upload it, or copy it there) as layer stacks: the bottom "
        "visible pixel layer is the background, the others are foregrounds with their transparency as the mask."
    )
    CATEGORY = "LayerDiff/io"
    RETURN_TYPES = ("LAYERDIFF_LAYERS",)
    RETURN_NAMES = ("layers",)
    OUTPUT_TOOLTIPS = ("The PSD's layers (one sample, no latents; edit nodes encode them with the model).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            # Not "image_upload": the frontend's image button offers only PNG/JPEG/WebP and drops files whose
            # MIME type is not image/* (a .psd often has none); web/psd_upload.js adds a PSD button instead.
            "psd": (_host.input_files(_host.PSD_EXTENSIONS), {
                "layerdiff_upload": ",".join(_host.PSD_EXTENSIONS),
                "tooltip": ("A .psd/.psb file in ComfyUI's input folder: upload one with the button below (or drop it "
                            "on the node), or copy it there and refresh (R).")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, psd):
        if psd is None:
            return True
        try:
            input_psd_path(psd)
        except LayerDiffError as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, psd):
        try:
            path = input_psd_path(psd)
        except LayerDiffError:
            return ""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def load(self, psd):
        return (load_psd(input_psd_path(psd)).to(_host.intermediate_device()),)


def input_psd_path(psd) -> str:
    """The real path of the PSD named `psd` in ComfyUI's input folder, or LayerDiffError.

    Names are taken as ComfyUI's Load Image takes them: relative to the input folder, optionally
    annotated 'name.psd [input]'. Symlinks and '..' are resolved first and anything that ends up
    outside the input folder is refused, as are absolute paths elsewhere, other folders'
    annotations ('[output]', '[temp]') and anything that is not a regular file.
    """
    root = _host.folder("input")
    shown = repr(psd) if len(repr(psd)) <= 120 else repr(psd)[:117] + "..."
    if not isinstance(psd, str) or not psd.strip() or "\x00" in psd:
        raise LayerDiffError(
            f"psd {shown} is not a file name: upload a .psd/.psb file to the input folder ({root})"
        )
    name = psd
    if name.endswith("[input]"):  # as folder_paths.annotated_filepath strips it
        name = name[:-8]
    elif name.endswith(("[output]", "[temp]")):
        raise LayerDiffError(
            f"psd {shown} names a file outside the input folder ({root}); Load PSD as Layers reads only the "
            f"input folder: upload the file or copy it there"
        )
    if not name.lower().endswith(_host.PSD_EXTENSIONS):
        raise LayerDiffError(f"psd {shown} is not a .psd/.psb file: upload a layered Photoshop file")
    real_root = os.path.normcase(os.path.realpath(root))
    real = os.path.realpath(os.path.join(root, name))  # an absolute name replaces root here
    try:
        inside = os.path.commonpath([real_root, os.path.normcase(real)]) == real_root
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside:
        raise LayerDiffError(
            f"psd {shown} resolves outside the input folder ({root}); Load PSD as Layers reads only the "
            f"input folder: upload the file or copy it there"
        )
    if not os.path.isfile(real):
        if os.path.exists(real):
            raise LayerDiffError(
                f"psd {shown} in the input folder ({root}) is not a regular file (a folder, pipe or device): "
                f"upload a .psd/.psb file"
            )
        raise LayerDiffError(
            f"psd file {shown} is not in the input folder ({root}): upload it or copy it there"
        )
    return real

