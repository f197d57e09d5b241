"""The MLCID build loop: inputs, sharding, resume, bad files and the summary.

Inputs are a folder (searched recursively; hidden files and ``.txt``/``.json`` sidecars are not
inputs) or a ``.txt`` list of paths (relative to the list's folder), sorted by relative path. They
are cut into chunks of ``samples_per_shard`` images; chunk ``c`` is built by process ``i`` of
``N`` when ``c % N == i - 1`` and becomes exactly one shard,
``OUT/mlcid-{i:03d}of{N:03d}-{c:06d}.tar`` (each image gives at most one sample), so processes on
different machines never write the same file. Shards are written atomically by
:func:`layerdiff.data.shard_writer.write_shard`; a killed run leaves none half-written.

Before the chunks, whole-image screening (:mod:`layerdiff.data.mlcid.screening`) hashes every
input to find near-duplicates over the whole set; each image then goes through
:func:`prepare_input` (decode, size and sharpness checks, sidecar) and the pipeline.

Beside each shard a ``.stats.json`` (written after it) marks the chunk as finished and records its
counts, the hash of its input list (duplicates marked), the settings fingerprint and the screening
settings. A rerun skips finished chunks; a chunk finished with other inputs or settings is an
error unless ``overwrite``. The run ends with ``OUT/summary-{i}of{N}.json``, the counts over all
of this process's chunks and the seconds of each step. The Ray engine
(:mod:`layerdiff.data.mlcid.ray_engine`) shares the pieces marked as shared here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from layerdiff.data.format import LayeredSample, read_shard_meta
from layerdiff.data.input_files import InputFileError, parse_untrusted_json, read_regular_file
from layerdiff.data.mlcid import pipeline as P
from layerdiff.data.mlcid.inputs import BAD_SIDECAR, SIDECAR_DEPTH, list_inputs, load_image, read_sidecar
from layerdiff.data.mlcid.screening import (
    CACHE_NAME,
    DUPLICATE_IMAGE,
    OFF,
    ScreenConfig,
    duplicates_of,
    screen_image,
)
from layerdiff.data.mlcid.timing import StepClock
from layerdiff.data.record_checks import MAX_SIDE
from layerdiff.data.shard_writer import write_shard
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data.mlcid")

PREFIX = "mlcid"
SHARD_NAME = re.compile(r"^mlcid-(\d{3,})of(\d{3,})-(\d{6})\.tar$")  # the local layout
HASH_SHARD_NAME = re.compile(r"^mlcid-hashof(\d{3,})-(\d{6})\.tar$")  # the Ray engine's layout

MAX_PROCESSES = 100_000  # N of --shard i/N
MAX_STATS_BYTES = 2**20
IMAGE_TOO_SMALL = "image_too_small"  # counted under "rejected"


@dataclass(frozen=True)
class BuildConfig:
    images: Path  # folder or .txt list
    out: Path
    shard: tuple[int, int] = (1, 1)  # (i, N), 1-based
    samples_per_shard: int = 256  # input images per chunk; a shard holds at most this many samples
    batch_size: int = 8  # images per pipeline call (captioner batches)
    max_side: int = 1024  # larger images are downscaled to this longest side; 0 keeps them
    min_side: int = 32  # smaller images are rejected
    overwrite: bool = False
    screen: ScreenConfig = ScreenConfig()  # near-duplicate and sharpness filters over whole images

    def __post_init__(self):
        i, n = self.shard
        if n < 1 or not 1 <= i <= n:
            raise LayerDiffError(f"--shard {i}/{n} is not valid: use i/N with 1 <= i <= N, e.g. 1/4")
        if not 1 <= self.samples_per_shard <= 1_000_000:
            raise LayerDiffError(f"--samples-per-shard {self.samples_per_shard} must be from 1 to 1000000")
        if not 1 <= self.batch_size <= 1024:
            raise LayerDiffError(f"--batch-size {self.batch_size} must be from 1 to 1024")
        if not 1 <= self.min_side <= MAX_SIDE:
            raise LayerDiffError(f"--min-side {self.min_side} must be from 1 to {MAX_SIDE} pixels (default 32)")
        if not 0 <= self.max_side <= MAX_SIDE:
            raise LayerDiffError(f"--max-side {self.max_side} must be from 0 (keep sizes) to {MAX_SIDE} pixels")
        if self.max_side and self.max_side < self.min_side:
            raise LayerDiffError(f"--max-side {self.max_side} is below --min-side {self.min_side}: raise it, or 0 to keep sizes")


def parse_shard(text: str) -> tuple[int, int]:
    """"2/8" -> (2, 8)."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*/\s*(\d{1,9})\s*", str(text))
    if not m or not 1 <= int(m.group(2)) <= MAX_PROCESSES or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise LayerDiffError(f"--shard {text!r} is not valid: use i/N with 1 <= i <= N <= {MAX_PROCESSES}, e.g. 1/4 "
                             "(this is process 1 of 4)")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------------
# keys


def sample_key(rel: str) -> str:
    """A readable, unique, dot-free key from the input's relative name."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(rel).stem).strip("_-")[:48] or "image"
    return f"{stem}-{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:10]}"


# ---------------------------------------------------------------------------------------------
# counting


class Counts:
    """The per-chunk and summary counters, JSON-ready."""

    def __init__(self, data: dict | None = None):
        data = data or {}
        self.images_seen = int(data.get("images_seen", 0))
        self.kept = int(data.get("kept", 0))
        self.unreadable = Counter(data.get("unreadable", {}))
        self.rejected = Counter(data.get("rejected", {}))
        self.dropped_detections = Counter(data.get("dropped_detections", {}))
        self.samples_by_layers = Counter(data.get("samples_by_layers", {}))

    def add(self, other: Counts) -> None:
        self.images_seen += other.images_seen
        self.kept += other.kept
        for name in ("unreadable", "rejected", "dropped_detections", "samples_by_layers"):
            getattr(self, name).update(getattr(other, name))

    def to_json(self) -> dict:
        return {
            "images_seen": self.images_seen,
            "kept": self.kept,
            "unreadable": dict(sorted(self.unreadable.items())),
            "unreadable_total": sum(self.unreadable.values()),
            "rejected": dict(sorted(self.rejected.items())),
            "rejected_total": sum(self.rejected.values()),
            "dropped_detections": dict(sorted(self.dropped_detections.items())),
            "samples_by_layers": dict(sorted(self.samples_by_layers.items())),
        }


def write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# the build


@dataclass
class _Chunk:
    index: int
    inputs: list[tuple[str, Path]]
    tar: Path
    stats: Path
    inputs_sha: str


def inputs_sha(part: list[tuple[str, Path]], duplicates: Mapping[str, str]) -> str:
    """Hash of a shard's input list (shared): its names, each duplicate marked as such (without
    duplicates, the hash builds made before screening wrote)."""
    lines = (f"{rel}\t{DUPLICATE_IMAGE}" if rel in duplicates else rel for rel, _ in part)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def _chunks(config: BuildConfig, inputs: list[tuple[str, Path]], duplicates: Mapping[str, str]) -> list[_Chunk]:
    i, n = config.shard
    s = config.samples_per_shard
    out = []
    for c in range(i - 1, (len(inputs) + s - 1) // s, n):
        part = inputs[c * s : (c + 1) * s]
        stem = f"{PREFIX}-{i:03d}of{n:03d}-{c:06d}"
        out.append(_Chunk(c, part, config.out / f"{stem}.tar", config.out / f"{stem}.stats.json",
                          inputs_sha(part, duplicates)))
    return out


def _valid_counts(data) -> bool:
    """True when ``data`` is the "counts" object this builder writes (so :class:`Counts` can read it)."""
    if not isinstance(data, dict):
        return False
    if any(type(data.get(k)) is not int or data[k] < 0 for k in ("images_seen", "kept")):
        return False
    tables = [data.get(k, {}) for k in ("unreadable", "rejected", "dropped_detections", "samples_by_layers")]
    return all(isinstance(t, dict) and all(type(v) is int and v >= 0 for v in t.values()) for t in tables)


def read_stats(path: Path) -> dict | None:
    """A chunk's ``.stats.json``; None when it is damaged or not one this builder wrote."""
    try:
        stats = parse_untrusted_json(read_regular_file(path, MAX_STATS_BYTES), SIDECAR_DEPTH)
    except (InputFileError, ValueError):
        return None
    if not isinstance(stats, dict) or not _valid_counts(stats.get("counts")):
        return None
    return stats


def _check_layout(config: BuildConfig, chunks: list[_Chunk], fingerprint: str) -> tuple[list[_Chunk], dict[int, Counts]]:
    """Refuse to touch shards of another split, inputs or settings unless ``overwrite``; return
    the chunks still to build and the counts of the finished ones."""
    i, n = config.shard
    hint = "pass --overwrite to rebuild them, or give another --out"
    if not config.overwrite:
        for p in sorted(config.out.glob(f"{PREFIX}-*.tar")):
            m = SHARD_NAME.match(p.name)
            if m and int(m.group(2)) != n:
                raise LayerDiffError(
                    f"--out {str(config.out)!r} already holds {p.name}, built with --shard x/{int(m.group(2))}, "
                    f"not x/{n}: use the same N as before, or {hint}"
                )
    todo, finished = [], {}
    for ch in chunks:
        if ch.stats.is_file() and ch.tar.is_file():
            stats = read_stats(ch.stats)
            if stats is None and not config.overwrite:
                raise LayerDiffError(f"--out {str(config.out)!r}: {ch.stats.name} is damaged or was not written by "
                                     f"this builder, so shard {ch.tar.name} cannot be trusted: {hint}")
            stats = stats or {}
            check_screening(stats, config, ch.tar.name)  # first: other screening also changes the inputs' hash
            same = stats.get("inputs_sha") == ch.inputs_sha and stats.get("settings_sha") == fingerprint
            if same and not config.overwrite:
                finished[ch.index] = Counts(stats["counts"])
                continue
            if not same and not config.overwrite:
                what = "inputs" if stats.get("inputs_sha") != ch.inputs_sha else "settings (models or thresholds)"
                raise LayerDiffError(f"--out {str(config.out)!r}: shard {ch.tar.name} was built from other {what}: {hint}")
        elif ch.tar.is_file() and not config.overwrite and not is_own_unfinished(ch, fingerprint):
            raise LayerDiffError(f"--out {str(config.out)!r} already holds {ch.tar.name}, not from this build: {hint}")
        todo.append(ch)
    return todo, finished


def refuse_other_engine(out: Path, pattern: re.Pattern, engine: str) -> None:
    """Shared: one --out holds the shards of one engine (train would read both layouts' samples)."""
    for p in sorted(out.glob(f"{PREFIX}-*.tar")):
        if pattern.match(p.name):
            raise LayerDiffError(f"--out {str(out)!r} already holds {p.name}, built with --engine {engine}: rerun with "
                                 f"--engine {engine}, or give another --out (one folder holds one engine's shards)")


def check_screening(stats: dict, config: BuildConfig, name: str) -> None:
    """Shared: a finished shard screened with other --dedup-distance / --min-sharpness is refused
    unless ``overwrite`` (stats from before screening existed count as screening off)."""
    then, now = stats.get("screening", OFF.to_json()), config.screen.to_json()
    if then != now and not config.overwrite:
        raise LayerDiffError(
            f"--out {str(config.out)!r}: shard {name} was built with --dedup-distance {then.get('dedup_distance')} "
            f"--min-sharpness {then.get('min_sharpness')}, now {now['dedup_distance']} / {now['min_sharpness']}: "
            "pass those values to resume, --overwrite to rebuild, or give another --out")


def is_own_unfinished(ch, fingerprint: str) -> bool:
    """A shard without its stats file (killed between the two writes) whose samples all come from
    this chunk's (``.inputs``) inputs with these settings: safe to rebuild (shared)."""
    sources = {rel for rel, _ in ch.inputs}
    try:
        for meta in read_shard_meta(ch.tar):
            mlcid = meta["extra"].get("mlcid")
            if meta["source"] not in sources or not isinstance(mlcid, dict) or mlcid.get("settings") != fingerprint:
                return False
    except LayerDiffError:
        return False
    return True


UNREADABLE_TABLE, REJECTED_TABLE = "unreadable", "rejected"  # the Counts table a reason goes to


def prepare_input(rel: str, path: Path, config: BuildConfig, duplicates: Mapping[str, str]):
    """Shared per-image work before the stages: ``(pipeline item, "", "")`` or ``(None, table,
    reason)`` with table "unreadable" or "rejected". Logs what it skips."""
    if rel in duplicates:
        logger.info("MLCID: skipped %s, a near-duplicate of %s", rel, duplicates[rel])
        return None, REJECTED_TABLE, DUPLICATE_IMAGE
    image, scale, reason = load_image(path, config.max_side)
    if image is None:
        logger.warning("MLCID: skipped %s (%s)", rel, reason.replace("_", " "))
        return None, UNREADABLE_TABLE, reason
    if min(image.size) < config.min_side:
        return None, REJECTED_TABLE, IMAGE_TOO_SMALL
    reason = screen_image(image, config.screen)
    if reason:
        return None, REJECTED_TABLE, reason
    try:
        sidecar = read_sidecar(path, scale)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("MLCID: skipped %s: its sidecar file is not valid (%s)", rel, exc)
        return None, UNREADABLE_TABLE, BAD_SIDECAR
    return (sample_key(rel), rel, image, sidecar), "", ""


def count_outcome(counts: Counts, outcome: P.Outcome) -> None:
    """Shared: add one pipeline outcome to ``counts``."""
    counts.dropped_detections.update(outcome.dropped)
    if outcome.status == P.KEPT:
        counts.kept += 1
        counts.samples_by_layers[str(outcome.sample.num_layers)] += 1
    else:
        counts.rejected[outcome.status] += 1


def _run_chunk(ch: _Chunk, config: BuildConfig, pipe: P.MLCIDPipeline, counts: Counts, duplicates: Mapping[str, str],
               clock: StepClock) -> Iterator[LayeredSample]:
    batch: list[tuple[str, str, Image.Image, P.Sidecar]] = []

    def flush():
        with clock.step("pipeline", len(batch)):
            outcomes = pipe.process(batch)
        for outcome in outcomes:
            count_outcome(counts, outcome)
            if outcome.status == P.KEPT:
                yield outcome.sample
        batch.clear()

    for rel, path in ch.inputs:
        counts.images_seen += 1
        with clock.step("load", 1):
            item, table, reason = prepare_input(rel, path, config, duplicates)
        if item is None:
            getattr(counts, table)[reason] += 1
            continue
        batch.append(item)
        if len(batch) >= config.batch_size:
            yield from flush()
    if batch:
        yield from flush()


def build(config: BuildConfig, pipe: P.MLCIDPipeline) -> dict:
    """Build this process's shards; return (and write) the summary."""
    if config.out.exists() and not config.out.is_dir():
        raise LayerDiffError(f"--out {str(config.out)!r} is a file: give a folder")
    inputs = list_inputs(config.images)
    config.out.mkdir(parents=True, exist_ok=True)
    refuse_other_engine(config.out, HASH_SHARD_NAME, "ray")  # before minutes of hashing
    clock = StepClock()
    duplicates = {}
    if config.screen.dedup_distance >= 0:
        with clock.step("hash", len(inputs)):
            duplicates = duplicates_of(inputs, config.screen, cache=config.out / CACHE_NAME)
    fingerprint, settings = pipe.fingerprint()
    chunks = _chunks(config, inputs, duplicates)
    todo, finished = _check_layout(config, chunks, fingerprint)
    todo_ids = {ch.index for ch in todo}
    i, n = config.shard
    logger.info("MLCID: %d inputs, %d chunks for shard %d/%d, %d to build", len(inputs), len(chunks), i, n, len(todo))

    total, built = Counts(), Counts()
    t0 = time.perf_counter()
    with clock.timing_stages(pipe):
        for ch in chunks:
            if ch.index not in todo_ids:
                total.add(finished[ch.index])
                logger.info("MLCID: %s is finished; skipped", ch.tar.name)
                continue
            counts = Counts()
            start = time.perf_counter()
            busy = clock.seconds["load"] + clock.seconds["pipeline"]
            ch.stats.unlink(missing_ok=True)  # the chunk is unfinished until its stats are rewritten
            write_shard(ch.tar, _run_chunk(ch, config, pipe, counts, duplicates, clock), overwrite=True)
            elapsed = time.perf_counter() - start
            clock.add("write", elapsed - (clock.seconds["load"] + clock.seconds["pipeline"] - busy), counts.kept)
            write_json_atomic(ch.stats, {
                "chunk": ch.index,
                "shard": f"{i}/{n}",
                "inputs_sha": ch.inputs_sha,
                "settings_sha": fingerprint,
                "screening": config.screen.to_json(),
                "elapsed_s": round(elapsed, 3),
                "counts": counts.to_json(),
            })
            logger.info("MLCID: wrote %s (%d of %d images kept)", ch.tar.name, counts.kept, counts.images_seen)
            total.add(counts)
            built.add(counts)
    elapsed = time.perf_counter() - t0
    summary = {
        "engine": "local",
        "shard": f"{i}/{n}",
        "images": str(config.images),
        "inputs_total": len(inputs),
        "chunks": {"planned": len(chunks), "built": len(todo), "skipped": len(chunks) - len(todo)},
        **total.to_json(),
        **run_report(built, elapsed, clock, config, fingerprint, settings),
    }
    write_json_atomic(config.out / f"summary-{i}of{n}.json", summary)
    return summary


def run_report(built: Counts, elapsed: float, clock, config: BuildConfig, fingerprint: str, settings: dict,
               **this_run) -> dict:
    """The part of a build summary both engines write: this run's counts and speed (``this_run``:
    extra entries first), the step times, the screening and the settings."""
    return {
        "this_run": {
            "images_seen": built.images_seen,
            **this_run,
            "elapsed_s": round(elapsed, 3),
            "images_per_s": round(built.images_seen / elapsed, 3) if elapsed > 0 and built.images_seen else None,
        },
        "steps": clock.to_json(),
        "screening": config.screen.to_json(),
        "settings_sha": fingerprint,
        "settings": settings,
    }
