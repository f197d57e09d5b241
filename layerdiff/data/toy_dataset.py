"""Toy-world datasets on disk: ``out_dir/toy-NNNNNN.tar`` shards written by worker processes.

Sample ``i`` depends only on ``(seed, i)`` (:func:`layerdiff.data.toy.render_sample`), so shards can be
written in any order and in parallel, and an interrupted run resumes with the shards it lacks; a
``toy_manifest.json`` beside the shards records the settings a resume must match.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from layerdiff.data import toy
from layerdiff.data.format import list_shards
from layerdiff.data.shard_writer import shard_path, write_shard
from layerdiff.data.toy import DEFAULT_POSITION_PROB, GENERATOR_VERSION, _normalise_layer_probs
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data")

SHARD_PREFIX = "toy"
MANIFEST_NAME = "toy_manifest.json"

_counter = None  # shared sample counter in pool workers (for the progress bar)


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def _tick_shared_counter() -> None:
    with _counter.get_lock():
        _counter.value += 1


def _write_toy_shard(job: tuple, tick: Callable[[], None] | None = None) -> str:
    out_dir, shard, start, stop, seed, size, layer_probs, position_prob, overwrite = job

    def samples():
        for i in range(start, stop):
            yield toy.render_sample(seed, i, size, layer_probs=layer_probs, position_prob=position_prob)
            if tick is not None:
                tick()

    path = shard_path(out_dir, SHARD_PREFIX, shard)
    write_shard(path, samples(), overwrite=overwrite)
    return str(path)


def _pool_job(job: tuple) -> str:
    return _write_toy_shard(job, _tick_shared_counter if _counter is not None else None)


def _remove_temp_files(out_dir: Path, shard_ids) -> None:
    for i in shard_ids:
        for tmp in out_dir.glob(f".{shard_path(out_dir, SHARD_PREFIX, i).name}.*.tmp"):
            logger.info("removing leftover temporary file %s", tmp)
            tmp.unlink(missing_ok=True)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def check_output_dir(out_dir, overwrite: bool = False, resume: bool = False) -> list[Path]:
    """Refuse a folder that already holds shards unless ``overwrite`` or ``resume``; return its shards."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LayerDiffError(f"--out {str(out)!r} is a file: give a folder for the shards")
    existing = list_shards(out) if out.is_dir() else []
    if existing and not (overwrite or resume):
        raise LayerDiffError(
            f"--out {str(out)!r} already holds {len(existing)} shards ({existing[0].name}, ...): pass --overwrite "
            "to replace them, --resume to finish an interrupted run, or choose an empty folder"
        )
    return existing


def generate_toy_dataset(out_dir, samples: int, seed: int = 0, size: int = 128, samples_per_shard: int = 1000,
                         workers: int = 2, overwrite: bool = False, layer_probs: Mapping[int, float] | None = None,
                         position_prob: float = DEFAULT_POSITION_PROB, resume: bool = False,
                         progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write ``samples`` toy samples into ``out_dir/toy-NNNNNN.tar`` shards, one process per shard.

    An ``out_dir`` that already holds shards is refused unless ``overwrite`` (regenerate; shards of
    an older run that are not rewritten are removed) or ``resume`` (keep the complete shards of an
    interrupted run with the same settings, write the missing ones). ``progress(n)`` is called with
    each batch of newly finished samples. Returns every shard path of the dataset.
    """
    if not isinstance(samples, int) or samples < 1:
        raise LayerDiffError(f"--samples {samples!r} must be a positive number of samples")
    if not isinstance(size, int) or size < 32 or size % 8:
        raise LayerDiffError(f"--size {size!r} must be a multiple of 8 and at least 32 (e.g. 64 or 128)")
    if samples_per_shard < 1:
        raise LayerDiffError(f"--samples-per-shard {samples_per_shard} must be at least 1")
    if seed < 0:
        raise LayerDiffError(f"--seed {seed} must be 0 or more")
    if not 0.0 <= position_prob <= 1.0:
        raise LayerDiffError(f"position_prob {position_prob} must lie in 0..1")
    if overwrite and resume:
        raise LayerDiffError("--overwrite and --resume contradict each other: pass only one")
    counts, probs = _normalise_layer_probs(layer_probs)
    layer_probs = {int(c): float(p) for c, p in zip(counts, probs)}
    out = Path(out_dir)
    existing = check_output_dir(out, overwrite=overwrite, resume=resume)
    out.mkdir(parents=True, exist_ok=True)

    n_shards = -(-samples // samples_per_shard)
    manifest = {"generator": GENERATOR_VERSION, "samples": samples, "seed": seed, "size": size,
                "samples_per_shard": samples_per_shard, "shards": n_shards,
                "layer_probs": {str(k): v for k, v in layer_probs.items()}, "position_prob": position_prob}
    todo = list(range(n_shards))
    if resume and existing:
        try:
            old = json.loads((out / MANIFEST_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != manifest:
            diff = "no readable manifest" if old is None else ", ".join(
                f"{k} {old.get(k)!r} -> {v!r}" for k, v in manifest.items() if old.get(k) != v)
            raise LayerDiffError(
                f"--resume: {str(out)!r} was generated with other settings ({diff}): rerun with the same settings "
                "or pass --overwrite"
            )
        todo = [i for i in todo if not shard_path(out, SHARD_PREFIX, i).exists()]
        if progress is not None:
            progress(sum(min(samples_per_shard, samples - i * samples_per_shard) for i in range(n_shards) if i not in todo))
    _remove_temp_files(out, todo)
    _write_json_atomic(out / MANIFEST_NAME, manifest)

    jobs = [(str(out), i, i * samples_per_shard, min(samples, (i + 1) * samples_per_shard), seed, size,
             layer_probs, position_prob, overwrite) for i in todo]
    t0 = time.perf_counter()
    workers = max(1, min(workers, len(jobs)))
    try:
        if workers == 1:
            _run_inline(jobs, progress)
        else:
            _run_pool(jobs, workers, progress)
    except BaseException:
        _remove_temp_files(out, todo)  # workers killed mid-shard leave only temporary files
        raise
    paths = [shard_path(out, SHARD_PREFIX, i) for i in range(n_shards)]
    if overwrite:
        for stale in set(existing) - set(paths):
            logger.info("removing shard %s of an earlier run", stale)
            stale.unlink(missing_ok=True)
    dt = time.perf_counter() - t0
    done = sum(j[3] - j[2] for j in jobs)
    logger.info("toy: %d samples in %d shards in %.1f s (%.0f samples/s)", done, len(jobs), dt, done / max(dt, 1e-9))
    return paths


def _run_inline(jobs, progress) -> None:
    for job in jobs:
        _write_toy_shard(job, (lambda: progress(1)) if progress is not None else None)


# Workers only run numpy and PIL, so fork is safe even when the parent has loaded torch, and unlike
# spawn it does not re-import the caller's __main__ (a stdin script would make a spawn pool respawn
# failing workers forever). Elsewhere spawn is the only sound choice.
_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def _run_pool(jobs, workers: int, progress) -> None:
    ctx = mp.get_context(_START_METHOD)
    counter = ctx.Value("q", 0)
    reported = 0
    with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
        result = pool.map_async(_pool_job, jobs, chunksize=1)
        while not result.ready():
            result.wait(0.25)
            if progress is not None and counter.value > reported:
                now = counter.value
                progress(now - reported)
                reported = now
        result.get()  # re-raises a worker's exception
    if progress is not None and counter.value > reported:
        progress(counter.value - reported)
