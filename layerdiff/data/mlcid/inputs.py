"""The MLCID builder's inputs: the list of images, each image and its sidecar, all untrusted.

Inputs are a folder (searched recursively; hidden files and ``.txt``/``.json`` sidecars are not
inputs) or a ``.txt`` list of paths (relative to the list's folder). Each is read only if it is a
regular file of bounded size (:mod:`layerdiff.data.input_files`), decoded only in an everyday photo
format and only up to a pixel bound; a sidecar is JSON of bounded size and nesting whose fields are
checked before use. What cannot be used gives a reason the builder counts; nothing here raises for
one bad file.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from layerdiff.data.input_files import (
    MISSING,
    NOT_A_FILE,
    TOO_LARGE,
    UNREADABLE,
    InputFileError,
    parse_untrusted_json,
    read_regular_file,
)
from layerdiff.data.mlcid import pipeline as P
from layerdiff.data.mlcid.phrases import parse_phrase_list
from layerdiff.data.mlcid.stages import Detection
from layerdiff.errors import LayerDiffError

SIDECAR_SUFFIXES = (".json", ".txt")

# why an input gives no image (counted under "unreadable"); MISSING, NOT_A_FILE (a pipe, socket,
# device or folder), UNREADABLE (no permission, a link loop) and TOO_LARGE come from input_files
NOT_AN_IMAGE = "not_an_image"
CORRUPT = "corrupt"
BAD_SIDECAR = "bad_sidecar"
UNREADABLE_REASONS = (MISSING, NOT_A_FILE, UNREADABLE, TOO_LARGE, NOT_AN_IMAGE, CORRUPT, BAD_SIDECAR)

# bounds on what one input may cost
MAX_IMAGE_BYTES = 256 * 2**20  # an image file
MAX_IMAGE_PIXELS = 50_000_000  # decoded (large JPEGs are decoded at 1/2, 1/4 or 1/8 scale to fit)
MAX_SIDECAR_BYTES = 2**20
SIDECAR_DEPTH = 16  # {"objects": [{"box": [...]}]} is 4 deep; room for the user's own keys
MAX_SIDECAR_OBJECTS = 100  # boxes of one image (each is segmented)
MAX_SIDECAR_PHRASES = 100  # phrases of one image (each is searched for)
MAX_LIST_BYTES = 64 * 2**20  # a .txt list of inputs
# what Pillow may decode: the everyday photo formats, none that hands the file to another program
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "TGA", "JPEG2000")


def list_inputs(images) -> list[tuple[str, Path]]:
    """Sorted ``(relative name, path)`` of every input: a folder's files or a ``.txt`` list's lines.

    Only names are listed here; what each one is (a pipe, a folder, a loop of links) is found out
    when it is read, where it is skipped and counted like any other bad file."""
    root = Path(images)
    if root.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or name.lower().endswith(SIDECAR_SUFFIXES):
                    continue
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
        return sorted(found)
    if root.suffix.lower() == ".txt" and (root.exists() or root.is_symlink()):
        try:
            raw = read_regular_file(root, MAX_LIST_BYTES)
        except InputFileError as exc:
            raise LayerDiffError(f"--images {exc}: give a folder of images or a .txt list of image paths") from None
        entries = {}
        for line in raw.decode("utf-8", errors="replace").splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "\0" not in line:
                path = Path(line) if Path(line).is_absolute() else root.parent / line
                entries[Path(line).as_posix()] = path
        return sorted(entries.items())
    if root.exists():
        raise LayerDiffError(f"--images {str(root)!r} is neither a folder nor a .txt list: give a folder of images or "
                             "a .txt with one path per line")
    raise LayerDiffError(f"--images {str(root)!r} does not exist: give a folder of images or a .txt list of image paths")


def _sidecar_bytes(path: Path) -> bytes | None:
    """The bytes of a sidecar file; None when there is none (ValueError when it cannot be read)."""
    try:
        return read_regular_file(path, MAX_SIDECAR_BYTES)
    except InputFileError as exc:
        if exc.reason == MISSING:
            return None
        raise ValueError(f"{path.name} {exc.why}") from None


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # JSON true/false are not coordinates


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def parse_sidecar(data, scale: float = 1.0) -> P.Sidecar:
    """A parsed ``IMAGE.json`` -> :class:`Sidecar`; ValueError naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"the top level is {_kind(data)}, not an object")
    caption, bg = data.get("caption"), data.get("background_prompt")
    for name, value in (("caption", caption), ("background_prompt", bg)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f'"{name}" is {_kind(value)}, not a string')
    phrases = data.get("phrases", [])
    if isinstance(phrases, str):
        phrases = parse_phrase_list(phrases)
    elif isinstance(phrases, list) and all(isinstance(p, str) for p in phrases):
        phrases = [" ".join(p.split()) for p in phrases if p.strip()]
    else:
        raise ValueError('"phrases" must be a string or a list of strings')
    if len(phrases) > MAX_SIDECAR_PHRASES:
        raise ValueError(f'"phrases" lists {len(phrases)} phrases, more than the {MAX_SIDECAR_PHRASES} allowed')
    found = data.get("objects", [])
    if not isinstance(found, list):
        raise ValueError(f'"objects" is {_kind(found)}, not a list')
    if len(found) > MAX_SIDECAR_OBJECTS:
        raise ValueError(f'"objects" lists {len(found)} boxes, more than the {MAX_SIDECAR_OBJECTS} allowed')
    objects = []
    for i, obj in enumerate(found):
        if not isinstance(obj, dict):
            raise ValueError(f'"objects"[{i}] is {_kind(obj)}, not an object with "phrase" and "box"')
        box, score, phrase = obj.get("box"), obj.get("score", 1.0), obj.get("phrase", "object")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise ValueError(f'"objects"[{i}].box must be [x0, y0, x1, y1], four numbers in pixels')
        if not _is_number(score):
            raise ValueError(f'"objects"[{i}].score must be a number')
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f'"objects"[{i}].phrase must be a non-empty string')
        objects.append(Detection(tuple(float(v) * scale for v in box), float(score), " ".join(phrase.split())))
    return P.Sidecar(caption=caption or None, phrases=phrases, objects=objects, background_prompt=bg or None)


def read_sidecar(image_path: Path, scale: float = 1.0) -> P.Sidecar:
    """``IMAGE.json`` ({"caption", "phrases", "objects": [{"phrase", "box"}], "background_prompt"})
    or ``IMAGE.txt`` (phrases, one per line or comma-separated); boxes scale with the image.
    ValueError (naming the file) when a sidecar is there but cannot be used."""
    js, txt = image_path.with_suffix(".json"), image_path.with_suffix(".txt")
    raw = _sidecar_bytes(js)
    if raw is not None:
        try:
            return parse_sidecar(parse_untrusted_json(raw, SIDECAR_DEPTH), scale)
        except ValueError as exc:
            raise ValueError(f"{js.name}: {exc}") from None
    raw = _sidecar_bytes(txt)
    if raw is not None:
        return P.Sidecar(phrases=parse_phrase_list(raw.decode("utf-8", errors="replace")))
    return P.Sidecar()


def _image_formats() -> list[str]:
    """The formats of IMAGE_FORMATS this Pillow build has (Image.open fails on a missing one)."""
    Image.init()
    return [f for f in IMAGE_FORMATS if f in Image.OPEN]


def _draft_to_fit(im: Image.Image) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when its full size is over MAX_IMAGE_PIXELS."""
    w, h = im.size
    if w * h <= MAX_IMAGE_PIXELS or im.format not in ("JPEG", "MPO"):
        return
    for s in (2, 4, 8):
        if w * h <= MAX_IMAGE_PIXELS * s * s:
            break
    im.draft(None, (max(1, w // s), max(1, h // s)))


def load_image(path: Path, max_side: int = 1024, draft_side: int = 0) -> tuple[Image.Image | None, float, str]:
    """(RGB image or None, scale applied, reason when None). Transparent pixels go on white.

    Only a regular file of at most MAX_IMAGE_BYTES is read, only the formats of IMAGE_FORMATS
    are decoded, and nothing over MAX_IMAGE_PIXELS is decoded. ``draft_side`` > 0 lets a JPEG
    decode at the smallest 1/2, 1/4 or 1/8 scale whose longer side stays at least that (the
    de-duplication hashes need no more)."""
    try:
        data = read_regular_file(path, MAX_IMAGE_BYTES)
    except InputFileError as exc:
        return None, 1.0, exc.reason
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette notes
            with Image.open(io.BytesIO(data), formats=_image_formats()) as im:
                full = max(im.size)
                if draft_side and im.format in ("JPEG", "MPO"):
                    im.draft(None, (draft_side, draft_side))
                _draft_to_fit(im)
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    return None, 1.0, TOO_LARGE
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    flat = Image.new("RGB", rgba.size, (255, 255, 255))
                    flat.paste(rgba, mask=rgba.getchannel("A"))
                    img = flat
                else:
                    img = im.convert("RGB")
    except UnidentifiedImageError:
        return None, 1.0, NOT_AN_IMAGE
    except Image.DecompressionBombError:  # Pillow's own limit, met before ours when a header claims far more
        return None, 1.0, TOO_LARGE
    except Exception:  # whatever a decoder raises on one damaged file, the build goes on without it
        return None, 1.0, CORRUPT
    del data
    scale = max(img.size) / full if max(img.size) != full else 1.0  # a JPEG decoded at reduced scale
    if max_side and max(img.size) > max_side:
        shrink = max_side / max(img.size)
        scale *= shrink
        img = img.resize((max(1, round(img.width * shrink)), max(1, round(img.height * shrink))), Image.LANCZOS)
    return img, scale, ""
