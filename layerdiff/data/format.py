"""On-disk format of layered training data: WebDataset-style ``.tar`` shards.

One sample is a group of tar members sharing a key (no dots in the key, so WebDataset's
"key = name up to the first dot" rule groups them):

    KEY.json                 global prompt, background prompt, foreground prompts (back to front),
                             source, width, height, num_layers, extra
    KEY.bg.png               background, RGB
    KEY.fg1.png, KEY.mask1.png   backmost foreground (RGB, grey 128 outside its mask) and its mask
    KEY.fg2.png, KEY.mask2.png   ... up to the frontmost; masks 8-bit "L", 255 = object

Shards are written atomically: members go to a hidden temporary file in the same folder, which is
fsynced and then renamed onto ``NAME.tar`` with :func:`os.replace`. A reader therefore sees a shard
complete or not at all; a killed writer leaves at most a hidden ``.NAME.tar.*.tmp`` file, which
:func:`list_shards` never lists. Tar headers carry fixed owner and time fields, so the same samples
always give the same bytes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data")

FORMAT_VERSION = "layerdiff-sample-v1"
GREY = (128, 128, 128)  # neutral fill of a foreground outside its mask (0.5 in 0..1)
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
SHARD_PATTERN = re.compile(r"^[A-Za-z0-9_-]+-\d{6}\.tar$")
PNG_COMPRESS_LEVEL = 4  # a fair size/speed trade-off; fixed so bytes are reproducible

__all__ = [
    "FORMAT_VERSION",
    "GREY",
    "LayeredSample",
    "ShardWriter",
    "composite",
    "decode_record",
    "fill_outside_mask",
    "iter_shard_records",
    "list_shards",
    "read_shard",
    "read_shard_meta",
    "record_meta",
    "shard_path",
    "write_shard",
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
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError) as exc:
            raise LayerDiffError(f"{where}: extra is not JSON-serialisable ({exc}): keep it to dicts, lists, str, numbers") from exc


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


# ---------------------------------------------------------------------------------------------
# encoding


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


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


def _encode_members(sample: LayeredSample) -> list[tuple[str, bytes]]:
    sample.validate()
    meta = json.dumps(sample_metadata(sample), ensure_ascii=False, sort_keys=True).encode("utf-8")
    members = [(f"{sample.key}.json", meta), (f"{sample.key}.bg.png", _png_bytes(sample.background))]
    for i, (fg, mask) in enumerate(zip(sample.foregrounds, sample.masks), start=1):
        members.append((f"{sample.key}.fg{i}.png", _png_bytes(fg)))
        members.append((f"{sample.key}.mask{i}.png", _png_bytes(mask)))
    return members


class _AtomicShard:
    """A tar file being written to a hidden temporary name; ``commit`` renames it into place."""

    def __init__(self, path: Path, overwrite: bool):
        self.path = path
        self.overwrite = overwrite
        if path.exists() and not overwrite:
            raise LayerDiffError(
                f"shard {str(path)!r} already exists: pass overwrite=True (--overwrite) to replace it, "
                "or write to an empty folder"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.keys: set[str] = set()
        self.count = 0

    def add(self, sample: LayeredSample) -> None:
        if sample.key in self.keys:
            raise LayerDiffError(f"sample key {sample.key!r} appears twice in shard {self.path.name}: keys must be unique")
        for name, data in _encode_members(sample):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0  # fixed header fields -> reproducible bytes
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.add(sample.key)
        self.count += 1

    def commit(self) -> Path:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self.tmp, 0o644)  # mkstemp makes 0600; shards are meant to be shared
        os.replace(self.tmp, self.path)
        logger.debug("wrote shard %s (%d samples)", self.path, self.count)
        return self.path

    def abort(self) -> None:
        for closer in (self._tar.close, self._file.close):
            try:
                closer()
            except Exception:  # best effort while discarding
                pass
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


def write_shard(path, samples: Iterable[LayeredSample], overwrite: bool = False) -> int:
    """Write ``samples`` into one shard at ``path`` atomically; return the number of samples.

    Refuses to replace an existing shard unless ``overwrite``. On any error (including a bad
    sample) nothing appears at ``path`` and the temporary file is removed.
    """
    shard = _AtomicShard(Path(path), overwrite)
    try:
        for sample in samples:
            shard.add(sample)
        shard.commit()
    except BaseException:
        shard.abort()
        raise
    return shard.count


def shard_path(out_dir, prefix: str, index: int) -> Path:
    """``out_dir/{prefix}-{index:06d}.tar``."""
    return Path(out_dir) / f"{prefix}-{index:06d}.tar"


class ShardWriter:
    """Write samples into ``out_dir/{prefix}-{index:06d}.tar``, ``samples_per_shard`` each.

    Every shard is atomic. Use as a context manager: on an exception inside the ``with`` block the
    shard being filled is discarded (completed shards stay, each complete); on a clean exit the
    last partial shard is committed. Members stream to disk, so memory stays at one sample.
    """

    def __init__(self, out_dir, prefix: str = "shard", samples_per_shard: int = 1000, start_index: int = 0,
                 overwrite: bool = False):
        if not KEY_PATTERN.match(prefix):
            raise LayerDiffError(f"shard prefix {prefix!r} is not valid: use only letters, digits, '_' and '-'")
        if samples_per_shard < 1:
            raise LayerDiffError(f"samples_per_shard {samples_per_shard} must be at least 1")
        if start_index < 0:
            raise LayerDiffError(f"start_index {start_index} must be 0 or more")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise LayerDiffError(f"output folder {str(self.out_dir)!r} is a file: give a folder path")
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.index = start_index
        self.overwrite = overwrite
        self.paths: list[Path] = []
        self._current: _AtomicShard | None = None
        self._closed = False
        first = shard_path(self.out_dir, prefix, start_index)
        if first.exists() and not overwrite:  # fail before any work is done
            raise LayerDiffError(
                f"shard {str(first)!r} already exists: pass overwrite=True (--overwrite) to replace it, "
                "or write to an empty folder"
            )

    def write(self, sample: LayeredSample) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter.write after close")
        if self._current is None:
            self._current = _AtomicShard(shard_path(self.out_dir, self.prefix, self.index), self.overwrite)
        try:
            self._current.add(sample)
        except BaseException:
            self.abort()
            raise
        if self._current.count >= self.samples_per_shard:
            self._commit()

    def _commit(self) -> None:
        assert self._current is not None
        self.paths.append(self._current.commit())
        self._current = None
        self.index += 1

    def abort(self) -> None:
        """Discard the shard being filled; completed shards stay."""
        if self._current is not None:
            self._current.abort()
            self._current = None
        self._closed = True

    def close(self) -> list[Path]:
        """Commit the last partial shard; return every shard path written, in order."""
        if not self._closed:
            if self._current is not None:
                self._commit()
            self._closed = True
        return list(self.paths)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
        return False

    def __del__(self):  # an abandoned writer never leaves a temporary file behind
        try:
            if self._current is not None:
                self._current.abort()
        except Exception:
            pass


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
    contiguous (as WebDataset requires).
    """
    path = Path(path)
    key, group = None, {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name.rsplit("/", 1)[-1]
                if "." not in name:
                    continue
                k, suffix = name.split(".", 1)
                data = tar.extractfile(info).read()
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                group[suffix] = data
    except tarfile.TarError as exc:
        raise LayerDiffError(f"shard {str(path)!r} is not a readable tar file ({exc}): rewrite or remove it") from exc
    if key is not None:
        yield key, group


def record_meta(key: str, members: dict[str, bytes], path="<shard>") -> dict:
    """The parsed ``KEY.json`` of one ``(key, members)`` group (checked for a valid ``num_layers``)."""
    if "json" not in members:
        raise LayerDiffError(f"shard {str(path)!r}: sample {key!r} has no {key}.json member: the shard is damaged, rewrite it")
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayerDiffError(f"shard {str(path)!r}: {key}.json is not valid JSON ({exc}): rewrite the shard") from exc
    if not isinstance(meta.get("num_layers"), int) or meta["num_layers"] < 1:
        raise LayerDiffError(f"shard {str(path)!r}: {key}.json has no valid num_layers: rewrite the shard")
    return meta


def read_shard_meta(path) -> Iterator[dict]:
    """Stream only the JSON metadata of each sample (cheap: no PNG decoding)."""
    for key, members in iter_shard_records(path):
        yield record_meta(key, members, path)


def _open_png(members: dict[str, bytes], suffix: str, key: str, path, mode: str) -> Image.Image:
    if suffix not in members:
        raise LayerDiffError(f"shard {str(path)!r}: sample {key!r} lacks member {key}.{suffix}: rewrite the shard")
    try:
        img = Image.open(io.BytesIO(members[suffix]))
        img.load()
    except OSError as exc:
        raise LayerDiffError(f"shard {str(path)!r}: {key}.{suffix} is not a readable PNG ({exc}): rewrite the shard") from exc
    return img if img.mode == mode else img.convert(mode)


def decode_record(key: str, members: dict[str, bytes], path="<shard>") -> LayeredSample:
    """Decode one ``(key, members)`` group from :func:`iter_shard_records` into a sample."""
    meta = record_meta(key, members, path)
    k = meta["num_layers"] - 1
    prompts = [meta.get("background_prompt", ""), *meta.get("foreground_prompts", [])]
    if len(prompts) != k + 1:
        raise LayerDiffError(
            f"shard {str(path)!r}: {key}.json lists {len(prompts) - 1} foreground prompts for {k} foregrounds: rewrite the shard"
        )
    return LayeredSample(
        key=key,
        global_prompt=meta.get("global_prompt", ""),
        layer_prompts=prompts,
        background=_open_png(members, "bg.png", key, path, "RGB"),
        foregrounds=[_open_png(members, f"fg{i}.png", key, path, "RGB") for i in range(1, k + 1)],
        masks=[_open_png(members, f"mask{i}.png", key, path, "L") for i in range(1, k + 1)],
        source=meta.get("source", ""),
        extra=meta.get("extra", {}) or {},
    )


def read_shard(path) -> Iterator[LayeredSample]:
    """Stream the samples of one shard, in stored order."""
    for key, members in iter_shard_records(path):
        yield decode_record(key, members, path)
