"""On-disk format of layered training data: WebDataset-style ``.tar`` shards.

One sample is a group of tar members sharing a key (no dots in the key, so WebDataset's
"key = name up to the first dot" rule groups them):

    KEY.json                 global prompt, background prompt, foreground prompts (back to front),
                             source, width, height, num_layers, extra
    KEY.bg.png               background, RGB
    KEY.fg1.png, KEY.mask1.png   backmost foreground (RGB, grey 128 outside its mask) and its mask
    KEY.fg2.png, KEY.mask2.png   ... up to the frontmost; masks 8-bit "L", 255 = object

Shards are written atomically (:mod:`layerdiff.data.shard_writer`): members go to a hidden temporary
file in the same folder, which is fsynced and then renamed onto ``NAME.tar`` with :func:`os.replace`.
A reader therefore sees a shard complete or not at all; a killed writer leaves at most a hidden
``.NAME.tar.*.tmp`` file, which :func:`list_shards` never lists. Tar headers carry fixed owner and
time fields, so the same samples always give the same bytes. This module defines the sample type and
reads shards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from layerdiff.data.input_files import InputFileError, open_regular_file, parse_untrusted_json
from layerdiff.data.record_checks import (
    CUT,
    MAX_LAYER_PIXELS,
    MAX_LAYERS,
    MAX_MEMBERS,
    MAX_SIDE,
    META_DEPTH,
    TOO_MANY,
    Oversized,
    check_metadata,
    check_png_member,
    check_tar_end,
    json_depth,
    member_bytes,
    member_limit,
    member_name,
)
from layerdiff.data.remote import is_url, open_url
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data")

FORMAT_VERSION = "layerdiff-sample-v1"
GREY = (128, 128, 128)  # neutral fill of a foreground outside its mask (0.5 in 0..1)
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
SHARD_PATTERN = re.compile(r"^[A-Za-z0-9_-]+-\d{6}\.tar$")

__all__ = [
    "FORMAT_VERSION",
    "GREY",
    "DamageCount",
    "LayeredSample",
    "check_metadata",
    "check_record",
    "composite",
    "decode_record",
    "fill_outside_mask",
    "iter_readable_records",
    "iter_shard_records",
    "list_shards",
    "read_samples",
    "read_shard",
    "read_shard_meta",
    "record_meta",
    "sample_metadata",
]


@dataclass
class LayeredSample:
    """One composable image: background, foregrounds back to front, their masks and prompts."""

    key: str  # unique, [A-Za-z0-9_-]+ (no dots)
    global_prompt: str
    layer_prompts: list[str]  # [background, fg1 (backmost), ..., fgK (frontmost)]
    background: Image.Image  # RGB
    foregrounds: list[Image.Image]  # RGB, grey (128,128,128) outside the mask
    masks: list[Image.Image]  # mode "L", 255 = object, same size as background
    source: str = ""  # e.g. "toy" or the source image path
    extra: dict = field(default_factory=dict)  # any more JSON (toy labels, builder scores)

    @property
    def num_layers(self) -> int:
        return 1 + len(self.foregrounds)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every layer."""
        return self.background.size

    def validate(self) -> None:
        """Raise :class:`LayerDiffError` naming the field when the sample cannot be written."""
        where = f"sample {self.key!r}"
        if not isinstance(self.key, str) or not KEY_PATTERN.match(self.key):
            raise LayerDiffError(
                f"sample key {self.key!r} is not valid: use only letters, digits, '_' and '-' (no dots)"
            )
        k = len(self.foregrounds)
        if 1 + k > MAX_LAYERS:
            raise LayerDiffError(f"{where}: {1 + k} layers, more than the {MAX_LAYERS} a sample may have: keep fewer foregrounds")
        if len(self.masks) != k:
            raise LayerDiffError(f"{where}: {k} foregrounds but {len(self.masks)} masks: give one mask per foreground")
        if len(self.layer_prompts) != 1 + k:
            raise LayerDiffError(
                f"{where}: {len(self.layer_prompts)} layer prompts for {1 + k} layers: give the background "
                "prompt first, then one prompt per foreground, back to front"
            )
        if not all(isinstance(p, str) for p in [self.global_prompt, *self.layer_prompts]):
            raise LayerDiffError(f"{where}: prompts must be strings")
        if self.background.mode != "RGB":
            raise LayerDiffError(f"{where}: background has mode {self.background.mode!r}: convert it with .convert('RGB')")
        size = self.background.size
        if max(size) > MAX_SIDE or size[0] * size[1] > MAX_LAYER_PIXELS:
            raise LayerDiffError(f"{where}: layers of {size[0]}x{size[1]} pixels are larger than a shard may hold "
                                 f"(sides up to {MAX_SIDE}, {MAX_LAYER_PIXELS} pixels): downscale them")
        for i, (fg, mask) in enumerate(zip(self.foregrounds, self.masks), start=1):
            if fg.mode != "RGB":
                raise LayerDiffError(f"{where}: foreground {i} has mode {fg.mode!r}: convert it with .convert('RGB')")
            if mask.mode != "L":
                raise LayerDiffError(f"{where}: mask {i} has mode {mask.mode!r}: use an 8-bit 'L' mask, 255 = object")
            if fg.size != size or mask.size != size:
                raise LayerDiffError(
                    f"{where}: foreground {i} is {fg.size} and mask {i} is {mask.size}, background is {size}: "
                    "all layers and masks must have the background's size"
                )
        if not isinstance(self.extra, dict) or json_depth(self.extra) > META_DEPTH - 1:
            raise LayerDiffError(f"{where}: extra must be a dict nested at most {META_DEPTH - 1} levels deep")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise LayerDiffError(f"{where}: extra is not JSON-serialisable ({exc}): keep it to dicts, lists, str, "
                                 "finite numbers") from exc


def fill_outside_mask(foreground: Image.Image, mask: Image.Image, grey: tuple[int, int, int] = GREY) -> Image.Image:
    """Return ``foreground`` with every pixel outside ``mask`` (< 128) set to neutral grey."""
    fg = np.asarray(foreground.convert("RGB")).copy()  # (H, W, 3)
    fg[np.asarray(mask.convert("L")) < 128] = grey
    return Image.fromarray(fg, "RGB")


def composite(sample: LayeredSample) -> Image.Image:
    """Flatten back to front: C_0 = B, C_k = M_k F_k + (1 - M_k) C_{k-1} (METHOD.md section 1)."""
    out = np.asarray(sample.background, dtype=np.float32).copy()  # (H, W, 3)
    for fg, mask in zip(sample.foregrounds, sample.masks):
        m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0  # (H, W, 1)
        out = m * np.asarray(fg, dtype=np.float32) + (1.0 - m) * out
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def sample_metadata(sample: LayeredSample) -> dict:
    """The ``KEY.json`` member of a sample."""
    width, height = sample.size
    return {
        "format": FORMAT_VERSION,
        "key": sample.key,
        "global_prompt": sample.global_prompt,
        "background_prompt": sample.layer_prompts[0],
        "foreground_prompts": list(sample.layer_prompts[1:]),
        "source": sample.source,
        "width": width,
        "height": height,
        "num_layers": sample.num_layers,
        "extra": sample.extra,
    }


# ---------------------------------------------------------------------------------------------
# reading


def list_shards(dir) -> list[Path]:
    """Sorted shard files (``NAME-000123.tar``) directly inside ``dir``; temporary files excluded."""
    d = Path(dir)
    if not d.is_dir():
        raise LayerDiffError(f"data folder {str(d)!r} does not exist or is not a folder: give the folder holding the .tar shards")
    return sorted(p for p in d.iterdir() if p.is_file() and SHARD_PATTERN.match(p.name))


def iter_shard_records(path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {suffix: bytes})`` groups from a shard without decoding images.

    Suffixes are ``json``, ``bg.png``, ``fg1.png``, ``mask1.png``, ... Members of one sample are
    contiguous (as WebDataset requires). Only a regular file is read; a member larger than the
    format allows is not read (the record's reader names it); a damaged or truncated tar file
    raises :class:`LayerDiffError` naming the shard, after the records read before the damage.
    """
    if is_url(path):  # a shard at a URL (fsspec), streamed the same way
        stream = open_url(path)
    else:
        path = Path(path)
        try:
            fd = open_regular_file(path)
        except InputFileError as exc:
            raise LayerDiffError(f"shard {exc}: give .tar shard files") from None
        stream = os.fdopen(fd, "rb")
    key, group, error = None, {}, None
    with stream as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    name = info.name.rsplit("/", 1)[-1]
                    if "." not in name:
                        continue
                    k, suffix = name.split(".", 1)
                    if k != key:
                        if key is not None:
                            yield key, group
                        key, group = k, {}
                    if len(group) >= MAX_MEMBERS:
                        group[TOO_MANY] = b""
                    elif info.size > member_limit(suffix):
                        group[suffix] = Oversized(info.size)
                    else:
                        group[suffix] = tar.extractfile(info).read()
                end = tar.offset
            check_tar_end(f, end, path)
        except LayerDiffError as exc:
            error = exc
        except tarfile.TarError as exc:
            error = LayerDiffError(f"shard {str(path)!r} is not a readable tar file ({exc}): rewrite or remove it")
        except MemoryError:  # a tar header claiming gigabytes of extended attributes
            error = LayerDiffError(f"shard {str(path)!r} holds a tar header too large to read: rewrite or remove it")
        except OSError as exc:
            error = LayerDiffError(f"shard {str(path)!r} cannot be read ({exc.strerror or exc}): check the file")
    if key is not None:  # its members were read whole; one missing is blamed on the damage that cut it off
        if error is not None:
            group[CUT] = error
        yield key, group
    if error is not None:
        raise error


def record_meta(key: str, members: dict[str, bytes], path="<shard>") -> dict:
    """The parsed and checked ``KEY.json`` of one ``(key, members)`` group (:func:`check_metadata`)."""
    raw = member_bytes(members, "json", key, path)
    try:
        meta = parse_untrusted_json(raw, META_DEPTH)
    except ValueError as exc:
        raise LayerDiffError(f"shard {str(path)!r}: {member_name(key, 'json')} is {exc}: rewrite the shard") from None
    check_metadata(meta, key, path)
    meta.setdefault("extra", {})
    meta["extra"] = meta["extra"] or {}
    meta.setdefault("source", "")
    return meta


def check_record(key: str, members: dict[str, bytes], path="<shard>") -> dict:
    """:func:`record_meta`, and every layer and mask member present, within its size limit and a whole
    PNG of the size the JSON says; no pixel is decoded (cheap: what ``data inspect`` checks)."""
    meta = record_meta(key, members, path)
    size = (meta["width"], meta["height"])
    for suffix in ["bg.png", *(f"{kind}{i}.png" for i in range(1, meta["num_layers"]) for kind in ("fg", "mask"))]:
        check_png_member(member_bytes(members, suffix, key, path), size, key, suffix, path)
    return meta


def read_shard_meta(path) -> Iterator[dict]:
    """Stream only the JSON metadata of each sample (cheap: no PNG decoding)."""
    for key, members in iter_shard_records(path):
        yield record_meta(key, members, path)


def _open_png(members: dict[str, bytes], suffix: str, key: str, path, mode: str, size: tuple[int, int]) -> Image.Image:
    """One layer or mask, checked to be a PNG of ``size`` before a pixel of it is decoded (a small
    file may claim any size: its header is read first, and decoding follows only if it matches)."""
    data = member_bytes(members, suffix, key, path)
    where = f"shard {str(path)!r}: {member_name(key, suffix)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below decides
            img = Image.open(io.BytesIO(data), formats=["PNG"])
    except UnidentifiedImageError:
        raise LayerDiffError(f"{where} is not a PNG image: rewrite the shard") from None
    except Image.DecompressionBombError as exc:
        raise LayerDiffError(f"{where} is too large to decode ({exc}): rewrite the shard") from None
    except Exception as exc:  # any decoder failure of one member is one damaged sample
        raise LayerDiffError(f"{where} is not a readable PNG ({type(exc).__name__}: {exc}): rewrite the shard") from None
    if img.size != tuple(size):
        raise LayerDiffError(f"{where} is {img.width}x{img.height} pixels but {member_name(key, 'json')} says "
                             f"{size[0]}x{size[1]}: rewrite the shard")
    try:
        img.load()
        return img if img.mode == mode else img.convert(mode)
    except Exception as exc:
        raise LayerDiffError(f"{where} is not a readable PNG ({type(exc).__name__}: {exc}): rewrite the shard") from None


def decode_record(key: str, members: dict[str, bytes], path="<shard>") -> LayeredSample:
    """Decode one ``(key, members)`` group from :func:`iter_shard_records` into a sample."""
    meta = record_meta(key, members, path)
    k = meta["num_layers"] - 1
    size = (meta["width"], meta["height"])
    return LayeredSample(
        key=key,
        global_prompt=meta.get("global_prompt", ""),
        layer_prompts=[meta.get("background_prompt", ""), *meta.get("foreground_prompts", [])],
        background=_open_png(members, "bg.png", key, path, "RGB", size),
        foregrounds=[_open_png(members, f"fg{i}.png", key, path, "RGB", size) for i in range(1, k + 1)],
        masks=[_open_png(members, f"mask{i}.png", key, path, "L", size) for i in range(1, k + 1)],
        source=meta["source"],
        extra=meta["extra"],
    )


def read_shard(path) -> Iterator[LayeredSample]:
    """Stream the samples of one shard, in stored order; the first damaged sample raises."""
    for key, members in iter_shard_records(path):
        yield decode_record(key, members, path)


@dataclass
class DamageCount:
    """Damaged samples and shards that a streaming reader skipped; ``first`` says what the first was."""

    samples: int = 0
    shards: int = 0
    first: str = ""

    def add(self, exc: LayerDiffError, shard: bool = False) -> None:
        if shard:
            self.shards += 1
        else:
            self.samples += 1
        self.first = self.first or str(exc)
        logger.warning("skipped a damaged %s: %s", "shard" if shard else "sample", exc)

    def __bool__(self) -> bool:
        return bool(self.samples or self.shards)

    def describe(self) -> str:
        return f"{self.samples} damaged samples and {self.shards} damaged shards skipped (first: {self.first})"


def iter_readable_records(shards, damage: DamageCount) -> Iterator[tuple[str, dict, dict, Path]]:
    """``(key, members, checked metadata, shard)`` of every record whose JSON is readable; damaged
    records and the unreadable rest of a damaged shard are skipped and counted in ``damage``."""
    for shard in shards:
        try:
            for key, members in iter_shard_records(shard):
                try:
                    meta = record_meta(key, members, shard)
                except LayerDiffError as exc:
                    damage.add(exc)
                    continue
                yield key, members, meta, shard if is_url(shard) else Path(shard)
        except LayerDiffError as exc:
            damage.add(exc, shard=True)


def read_samples(shards, damage: DamageCount) -> Iterator[LayeredSample]:
    """Every readable sample of ``shards`` in order; damaged ones are skipped and counted in ``damage``."""
    for key, members, _, shard in iter_readable_records(shards, damage):
        try:
            yield decode_record(key, members, shard)
        except LayerDiffError as exc:
            damage.add(exc)
