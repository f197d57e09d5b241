"""Whole-image screening before the MLCID stages: near-duplicate photos and flat or blurred ones.

Both engines of ``data build`` (local and Ray) call these functions on the same pixels, so they
reject the same images.

- **Duplicates.** Every decodable input gets a 64-bit difference hash (dHash: Krawetz, "Kind of
  Like That", 2013): the grey image shrunk to 9x8, one bit per horizontally adjacent pair, set when
  the right pixel is brighter. Two images whose hashes differ in at most ``dedup_distance`` bits
  are duplicates; over the whole input set, sorted by relative path, an image is dropped when it is
  within that distance of an earlier image that was kept (greedy, so the first by path stays). 0
  keeps only one of each set of identical hashes; -1 turns the check off. Candidate pairs are found
  by the pigeonhole rule (two hashes within ``d`` bits agree exactly on one of ``d + 1`` bit
  blocks), so the check stays near linear in the number of images.
- **Sharpness.** The variance of the 4-neighbour Laplacian of the grey image, shrunk (never grown)
  to 256 pixels on its longer side, in 8-bit grey units squared. Photos measure about 100-10000, a
  plain colour 0, a 128-pixel photo blurred with a 4-pixel Gaussian about 2-5.

The hashes are kept in ``OUT/dhash-cache.json`` (:func:`duplicates_of`'s ``cache``), keyed by each
input's relative name, file size and modification time, so a rerun (or another process of the
same build) decodes only the inputs that are new or changed.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data.mlcid")

# why a whole image is rejected (counted under "rejected", beside image_too_small)
DUPLICATE_IMAGE = "duplicate"
TOO_BLURRY = "too_blurry"

HASH_BITS = 64
MAX_DEDUP_DISTANCE = 16  # past this, unrelated photos start to match and the block index degrades
SHARPNESS_SIDE = 256  # the longer side the sharpness is measured at
HASH_DRAFT_SIDE = 64  # a JPEG is decoded at the smallest 1/2, 1/4, 1/8 scale that keeps this side


@dataclass(frozen=True)
class ScreenConfig:
    """Whole-image filters: ``dedup_distance`` bits (-1 = off, 0 = identical hashes only) and
    ``min_sharpness`` (0 = off)."""

    dedup_distance: int = 4
    min_sharpness: float = 0.5

    def __post_init__(self):
        if type(self.dedup_distance) is not int or not -1 <= self.dedup_distance <= MAX_DEDUP_DISTANCE:
            raise LayerDiffError(f"--dedup-distance {self.dedup_distance!r} must be an integer from -1 (off) through 0 "
                                 f"(identical hashes only) to {MAX_DEDUP_DISTANCE} bits of {HASH_BITS}, e.g. 4")
        if not isinstance(self.min_sharpness, (int, float)) or not 0.0 <= self.min_sharpness <= 1e6:
            raise LayerDiffError(f"--min-sharpness {self.min_sharpness!r} must be a number from 0 (off) to 1000000, "
                                 "e.g. 0.5 (flat images only) or 5 (strongly blurred ones too)")

    def to_json(self) -> dict:
        return {"dedup_distance": self.dedup_distance, "min_sharpness": float(self.min_sharpness)}


OFF = ScreenConfig(dedup_distance=-1, min_sharpness=0.0)  # what builds made before screening existed did


def dhash(image: Image.Image) -> int:
    """64-bit difference hash of ``image`` (bit k = pixel right of k is brighter, row-major)."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.LANCZOS), dtype=np.int16)  # (8, 9)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()  # (64,)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of the grey image at <= SHARPNESS_SIDE pixels (see the module doc)."""
    grey = image.convert("L")
    s = SHARPNESS_SIDE / max(grey.size)
    if s < 1:
        grey = grey.resize((max(1, round(grey.width * s)), max(1, round(grey.height * s))), Image.BOX)
    a = np.asarray(grey, dtype=np.float32)  # (H, W)
    if min(a.shape) < 3:
        return 0.0
    lap = 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]  # (H-2, W-2)
    return float(lap.var())


def image_hash(path: Path) -> int | None:
    """dHash of the image at ``path``, decoded at reduced scale; None when it cannot be decoded (the
    build then counts it as unreadable and it takes no part in de-duplication)."""
    from layerdiff.data.mlcid.inputs import load_image

    image, _, _ = load_image(path, max_side=0, draft_side=HASH_DRAFT_SIDE)
    return None if image is None else dhash(image)


def hash_inputs(inputs: Iterable[tuple[str, Path]]) -> dict[str, int]:
    """{relative name: dHash} of every decodable input (one process; the Ray engine spreads this)."""
    return {rel: h for rel, path in inputs if (h := image_hash(path)) is not None}


def find_duplicates(hashes: dict[str, int], distance: int) -> dict[str, str]:
    """{duplicate: the earlier kept image it matches}: greedy over the names in sorted order, an
    image is a duplicate when an earlier kept image is within ``distance`` bits (-1: none)."""
    if distance < 0:
        return {}
    blocks = _blocks(distance + 1)
    index: list[dict[int, list[str]]] = [defaultdict(list) for _ in blocks]
    kept: dict[str, int] = {}
    out: dict[str, str] = {}
    for rel in sorted(hashes):
        h = hashes[rel]
        keys = [(h >> shift) & mask for shift, mask in blocks]
        match = _first_match(h, keys, index, kept, distance)
        if match is not None:
            out[rel] = match
            continue
        kept[rel] = h
        for table, key in zip(index, keys):
            table[key].append(rel)
    return out


def _blocks(n: int) -> list[tuple[int, int]]:
    """(shift, mask) of ``n`` contiguous bit blocks covering the 64 bits."""
    edges = [round(k * HASH_BITS / n) for k in range(n + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]


def _first_match(h: int, keys: list[int], index, kept: dict[str, int], distance: int) -> str | None:
    """The earliest (by name) kept image within ``distance`` bits of ``h``, or None."""
    candidates = {rel for table, key in zip(index, keys) for rel in table.get(key, ())}
    close = [rel for rel in candidates if hamming(h, kept[rel]) <= distance]
    return min(close) if close else None


def screen_image(image: Image.Image, config: ScreenConfig) -> str:
    """The whole-image reason to reject ``image`` ("" = keep); duplicates are decided beforehand."""
    if config.min_sharpness > 0 and sharpness(image) < config.min_sharpness:
        return TOO_BLURRY
    return ""


CACHE_NAME = "dhash-cache.json"
CACHE_VERSION = 1
UNDECODABLE = -1  # a cached input that could not be decoded (no hash; not decoded again)


def _stamp(path: Path) -> list[int] | None:
    """[size, modification time in ns] of ``path``; None when it cannot be read."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def read_hash_cache(cache: Path) -> dict[str, list[int]]:
    """{relative name: [size, mtime_ns, hash or UNDECODABLE]} from ``cache``; empty when it is missing, damaged or
    of another version (the hashes are then computed again)."""
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("hashes"), dict):
        return {}
    return {rel: v for rel, v in data["hashes"].items()
            if isinstance(v, list) and len(v) == 3 and all(type(x) is int and x >= 0 for x in v[:2])
            and type(v[2]) is int and v[2] >= UNDECODABLE}


def write_hash_cache(cache: Path, entries: dict[str, list[int]]) -> None:
    """Write ``entries`` to ``cache`` atomically (a concurrent writer's complete file may win)."""
    from layerdiff.data.mlcid.builder import write_json_atomic  # builder imports this module

    write_json_atomic(cache, {"version": CACHE_VERSION, "hashes": entries})


def cached_hashes(inputs: list[tuple[str, Path]], cache: Path | None,
                  hasher: Callable[[list[tuple[str, Path]]], dict[str, int]]) -> dict[str, int]:
    """{relative name: dHash} of ``inputs``: from ``cache`` where an input's size and modification
    time are unchanged, from ``hasher`` for the rest; the cache is then rewritten."""
    if cache is None:
        return hasher(inputs)
    known = read_hash_cache(cache)
    stamps = {rel: _stamp(path) for rel, path in inputs}
    out, todo = {}, []
    for rel, path in inputs:
        entry, stamp = known.get(rel), stamps[rel]
        if entry is None or stamp is None or entry[:2] != stamp:
            todo.append((rel, path))
        elif entry[2] != UNDECODABLE:
            out[rel] = entry[2]
    fresh = hasher(todo) if todo else {}
    out.update(fresh)
    if todo:
        write_hash_cache(cache, {rel: [*stamps[rel], out.get(rel, UNDECODABLE)] for rel, _ in inputs
                                 if stamps[rel] is not None})
    logger.info("MLCID: %d image hashes from the cache, %d inputs decoded", len(inputs) - len(todo), len(todo))
    return out


def duplicates_of(inputs: list[tuple[str, Path]], config: ScreenConfig,
                  hasher: Callable[[list[tuple[str, Path]]], dict[str, int]] = hash_inputs,
                  cache: Path | None = None) -> dict[str, str]:
    """{duplicate: kept image} over ``inputs`` (hashed by ``hasher``, or read from ``cache``: see
    :func:`cached_hashes`); empty when dedup is off."""
    if config.dedup_distance < 0:
        return {}
    found = find_duplicates(cached_hashes(inputs, cache, hasher), config.dedup_distance)
    if found:
        logger.info("MLCID: %d of %d inputs are near-duplicates (within %d bits) of earlier ones; dropped",
                    len(found), len(inputs), config.dedup_distance)
    return found
