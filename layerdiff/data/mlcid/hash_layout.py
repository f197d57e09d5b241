"""The Ray engine's shard layout: content-addressed buckets that stay put while the inputs grow.

**Rule.** Input ``rel`` (its path relative to ``--images``, as in the sample's ``source``) goes to
bucket ``int(sha1(rel)[:8], 16) % B``; bucket ``b`` is ``OUT/mlcid-hashof{B:03d}-{b:06d}.tar``
with a ``.stats.json`` beside it. ``B`` is fixed by the first build, ``ceil(inputs /
samples_per_shard)``, and read back from the shard names by every later build (also with
``overwrite``), so adding images changes only the buckets their names hash into: shards grow past
``samples_per_shard`` as the inputs grow (build into a new ``--out`` to re-balance).

**Resume.** A bucket whose tar and stats are there, with the same input list (names, duplicates
marked), settings and screening, is finished and skipped. A bucket whose input list changed is
rebuilt, not refused: growth is the point (an image added, removed, or newly found to duplicate an
earlier one). Other settings or screening are refused unless ``overwrite``, as in the local
layout. A bucket left without inputs but with a shard is rebuilt, as an empty shard.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from layerdiff.data.mlcid import builder as B
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data.mlcid")

MAX_BUCKETS = 999_999  # the six digits of the bucket in the shard name
HASH_HEX = 8  # hex digits of sha1(rel) read as the bucket number


@dataclass
class Bucket:
    index: int
    inputs: list[tuple[str, Path]]  # sorted by name
    tar: Path
    stats: Path
    inputs_sha: str


def bucket_of(rel: str, buckets: int) -> int:
    """The bucket of input ``rel``: the first HASH_HEX hex digits of sha1(rel), modulo ``buckets``."""
    return int(hashlib.sha1(rel.encode("utf-8")).hexdigest()[:HASH_HEX], 16) % buckets


def bucket_count(out: Path, inputs: int, samples_per_shard: int) -> int:
    """``B`` read back from the shards in ``out``, else ``ceil(inputs / samples_per_shard)``."""
    found = {int(m.group(1)) for p in out.glob(f"{B.PREFIX}-hashof*.tar") if (m := B.HASH_SHARD_NAME.match(p.name))}
    if len(found) > 1:
        raise LayerDiffError(f"--out {str(out)!r} holds shards of {len(found)} layouts ({sorted(found)} buckets): "
                             "keep one layout per folder; give another --out")
    if found:
        return found.pop()
    return min(MAX_BUCKETS, max(1, math.ceil(inputs / samples_per_shard)))


def plan(out: Path, inputs: list[tuple[str, Path]], buckets: int, duplicates: Mapping[str, str]) -> list[Bucket]:
    """Every bucket that has inputs or already has a shard, in bucket order."""
    parts: dict[int, list[tuple[str, Path]]] = {}
    for rel, path in inputs:
        parts.setdefault(bucket_of(rel, buckets), []).append((rel, path))
    for p in out.glob(f"{B.PREFIX}-hashof{buckets:03d}-*.tar"):
        if m := B.HASH_SHARD_NAME.match(p.name):
            parts.setdefault(int(m.group(2)), [])
    out_buckets = []
    for b in sorted(parts):
        stem = f"{B.PREFIX}-hashof{buckets:03d}-{b:06d}"
        part = sorted(parts[b])
        out_buckets.append(Bucket(b, part, out / f"{stem}.tar", out / f"{stem}.stats.json", B.inputs_sha(part, duplicates)))
    return out_buckets


def check(config: B.BuildConfig, buckets: list[Bucket], fingerprint: str) -> tuple[list[Bucket], dict[int, B.Counts]]:
    """The buckets still to build (new, grown, unfinished) and the counts of the finished ones;
    other settings or screening refused unless ``config.overwrite``."""
    hint = "pass --overwrite to rebuild them, or give another --out"
    todo, finished = [], {}
    for bk in buckets:
        if bk.stats.is_file() and bk.tar.is_file():
            stats = B.read_stats(bk.stats)
            if stats is None and not config.overwrite:
                raise LayerDiffError(f"--out {str(config.out)!r}: {bk.stats.name} is damaged or was not written by "
                                     f"this builder, so shard {bk.tar.name} cannot be trusted: {hint}")
            stats = stats or {}
            if stats.get("settings_sha") != fingerprint and not config.overwrite:
                raise LayerDiffError(f"--out {str(config.out)!r}: shard {bk.tar.name} was built from other settings "
                                     f"(models or thresholds): {hint}")
            B.check_screening(stats, config, bk.tar.name)
            if stats.get("inputs_sha") == bk.inputs_sha and not config.overwrite:
                finished[bk.index] = B.Counts(stats["counts"])
                continue
            if stats.get("inputs_sha") != bk.inputs_sha:
                logger.info("MLCID: %s has new or removed inputs; rebuilt", bk.tar.name)
        elif bk.tar.is_file() and not config.overwrite and not B.is_own_unfinished(bk, fingerprint):
            raise LayerDiffError(f"--out {str(config.out)!r} already holds {bk.tar.name}, not from this build: {hint}")
        todo.append(bk)
    return todo, finished

