"""The work of ``python -m layerdiff data toy`` and ``python -m layerdiff data inspect`` (their flags:
:mod:`layerdiff.cli.data`)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from layerdiff.data.sheet import contact_sheet
from layerdiff.errors import LayerDiffError

if TYPE_CHECKING:
    import argparse

logger = logging.getLogger("layerdiff.data")

__all__ = ["parse_layer_counts", "run_inspect", "run_toy"]

MAX_SHEET_SAMPLES = 64  # rows of a contact sheet
SHEET_TILE = 128  # pixels per cell of the contact sheet
# bounds of `data toy` (one sample is a few layers of size x size pixels)
MAX_TOY_SAMPLES = 10_000_000
MAX_TOY_SIZE = 2048
MAX_WORKERS = 256


def parse_layer_counts(text: str) -> dict[int, float]:
    """'2,3,4' -> equal weights; '2:1,3:2' -> weighted."""
    weights: dict[int, float] = {}
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            count, _, weight = part.partition(":")
            weights[int(count)] = float(weight) if weight else 1.0
    except ValueError:
        weights = {}
    if not weights or any(k not in (2, 3, 4) for k in weights) \
            or not all(math.isfinite(w) and w >= 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise LayerDiffError(f"--layers {text!r} is not valid: list layer counts from 2, 3, 4 like '2,3,4' "
                             "or with weights like '2:1,3:2,4:3'")
    return weights


@contextlib.contextmanager
def _term_as_interrupt():
    """Treat SIGTERM (``kill``, a job scheduler) like Ctrl-C, so that workers and temporary files are cleaned up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_toy(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from layerdiff.data.toy import DEFAULT_POSITION_PROB
    from layerdiff.data.toy_dataset import check_output_dir, generate_toy_dataset

    layer_probs = parse_layer_counts(args.layers)
    if not 1 <= args.samples <= MAX_TOY_SAMPLES:
        raise LayerDiffError(f"--samples {args.samples} must be a number of samples from 1 to {MAX_TOY_SAMPLES}")
    if not 32 <= args.size <= MAX_TOY_SIZE or args.size % 8:
        raise LayerDiffError(f"--size {args.size} must be a multiple of 8 from 32 to {MAX_TOY_SIZE} (e.g. 64 or 128)")
    if not 1 <= args.samples_per_shard <= MAX_TOY_SAMPLES:
        raise LayerDiffError(f"--samples-per-shard {args.samples_per_shard} must be from 1 to {MAX_TOY_SAMPLES}")
    if not 1 <= args.workers <= MAX_WORKERS:
        raise LayerDiffError(f"--workers {args.workers} must be from 1 to {MAX_WORKERS}")
    if args.seed < 0 or args.seed >= 2**63:
        raise LayerDiffError(f"--seed {args.seed} must be from 0 to 2**63 - 1")
    if args.position_prob is not None and not (math.isfinite(args.position_prob) and 0 <= args.position_prob <= 1):
        raise LayerDiffError(f"--position-prob {args.position_prob} must be a probability from 0 to 1, e.g. 0.4")
    check_output_dir(args.out, overwrite=args.overwrite, resume=args.resume)  # before the progress bar shows
    position_prob = DEFAULT_POSITION_PROB if args.position_prob is None else args.position_prob
    t0 = time.perf_counter()
    with _term_as_interrupt(), tqdm(total=args.samples, unit="sample", file=sys.stderr, mininterval=0.5,
                                    desc="toy") as bar:
        paths = generate_toy_dataset(
            args.out, args.samples, seed=args.seed, size=args.size, samples_per_shard=args.samples_per_shard,
            workers=args.workers, overwrite=args.overwrite, resume=args.resume, layer_probs=layer_probs,
            position_prob=position_prob, progress=bar.update)
    dt = time.perf_counter() - t0
    if args.resume:
        print(f"completed the toy dataset of {args.samples} samples in {len(paths)} shards at {args.out} ({dt:.1f} s)")
    else:
        print(f"wrote {args.samples} toy samples in {len(paths)} shards to {args.out} "
              f"({dt:.1f} s, {args.samples / max(dt, 1e-9):.0f} samples/s)")
    return 0


def _check_sheet_path(sheet: Path, overwrite: bool) -> None:
    """Up front, before any shard is read: a .png path in an existing folder, new unless ``overwrite``."""
    if sheet.suffix.lower() != ".png":
        raise LayerDiffError(f"--sheet {str(sheet)!r} does not end in .png: the contact sheet is a PNG file")
    if sheet.is_dir():
        raise LayerDiffError(f"--sheet {str(sheet)!r} is a folder: give a file path such as {str(sheet / 'sheet.png')!r}")
    if not sheet.parent.is_dir():
        raise LayerDiffError(f"--sheet {str(sheet)!r}: folder {str(sheet.parent)!r} does not exist: create it or give another path")
    if (sheet.exists() or sheet.is_symlink()) and not overwrite:
        raise LayerDiffError(f"--sheet {str(sheet)!r} already exists: pass --overwrite to replace it, or give another --sheet")


def _save_sheet(sheet: Path, png: bytes, overwrite: bool) -> None:
    """Write ``png`` at ``sheet`` atomically; without ``overwrite`` never replace a file, even one
    that appeared while the sheet was drawn (a hard link is made only where no name exists)."""
    from layerdiff.io.writing import atomic_write

    if overwrite:
        atomic_write(sheet, png)
        return
    staged = sheet.with_name(f".{sheet.name}.{os.getpid()}.staged")
    atomic_write(staged, png)
    try:
        os.link(staged, sheet)
    except FileExistsError:
        raise LayerDiffError(f"--sheet {str(sheet)!r} appeared while the sheet was drawn and was left alone: pass "
                             "--overwrite to replace it, or give another --sheet") from None
    except OSError:  # a file system without hard links: the check is as late as it can be
        if sheet.exists() or sheet.is_symlink():
            raise LayerDiffError(f"--sheet {str(sheet)!r} already exists: pass --overwrite to replace it") from None
        os.replace(staged, sheet)
    finally:
        staged.unlink(missing_ok=True)


def run_inspect(args: argparse.Namespace) -> int:
    from layerdiff.data.format import check_record, iter_shard_records, list_shards

    if not args.dir.is_dir():
        what = "is not a folder" if args.dir.exists() else "does not exist"
        raise LayerDiffError(f"inspect: folder {str(args.dir)!r} {what}: give the folder holding the .tar shards")
    shards = list_shards(args.dir)
    if not shards:
        raise LayerDiffError(f"inspect: no .tar shards in {str(args.dir)!r}: generate data first "
                             "(python -m layerdiff data toy --out DIR --samples N)")
    if not 0 <= args.count <= MAX_SHEET_SAMPLES:
        raise LayerDiffError(f"--count {args.count} must be from 0 to {MAX_SHEET_SAMPLES} (0 = no contact sheet)")
    sheet = (args.sheet or args.dir / "contact_sheet.png") if args.count > 0 else None
    if sheet is not None:
        _check_sheet_path(sheet, args.overwrite)
    by_layers: Counter = Counter()
    sizes: Counter = Counter()
    sources: Counter = Counter()
    index: list[tuple[Path, str, int]] = []  # (shard, key, num_layers)
    damaged: list[str] = []  # one line each: the shard, the member and what is wrong
    for shard in shards:
        try:
            for key, members in iter_shard_records(shard):
                try:
                    meta = check_record(key, members, shard)  # the JSON and every PNG header, no pixels
                except LayerDiffError as exc:
                    damaged.append(str(exc))
                    continue
                n = meta["num_layers"]
                by_layers[n] += 1
                sizes[f"{meta['width']}x{meta['height']}"] += 1
                sources[(meta["source"] or "?").split("/")[0][:40]] += 1
                index.append((shard, key, n))
        except LayerDiffError as exc:  # the tar file itself: the records before the damage are counted
            damaged.append(str(exc))
    total = sum(by_layers.values())
    nbytes = sum(p.stat().st_size for p in shards)
    print(f"{args.dir}: {len(shards)} shards, {total} samples, {nbytes / 1e6:.1f} MB")
    print(f"{'layers':>6}  {'samples':>8}  {'share':>6}")
    for n in sorted(by_layers):
        print(f"{n:>6}  {by_layers[n]:>8}  {100 * by_layers[n] / max(total, 1):>5.1f}%")
    print(f"{'total':>6}  {total:>8}")
    summary = {"dir": str(args.dir), "shards": len(shards), "samples": total, "bytes": nbytes,
               "by_layers": {str(k): by_layers[k] for k in sorted(by_layers)},
               "sizes": dict(sizes.most_common(5)), "sources": dict(sources.most_common(5)),
               "damaged": len(damaged)}
    print(json.dumps(summary))
    if sheet is not None and total:
        samples = _load_for_sheet(index, args.count, damaged)
        if samples:
            buf = io.BytesIO()
            contact_sheet(samples, SHEET_TILE).save(buf, format="PNG")
            _save_sheet(sheet, buf.getvalue(), args.overwrite)
            print(f"contact sheet of {len(samples)} samples: {sheet}")
    if damaged:
        damaged = list(dict.fromkeys(damaged))
        for line in damaged:
            logger.info("damaged: %s", line)
        raise LayerDiffError(f"{len(damaged)} damaged samples or shards in {str(args.dir)!r} were skipped (-v lists "
                             f"them); the first: {damaged[0]}")
    return 0


def _thumbnails(sample, tile: int):
    """The sample with every layer and mask cut down to ``tile`` x ``tile`` (nearest pixel): the
    sheet's cells, so a sheet holds only small images however large the samples are. Compositing
    commutes with a nearest-pixel resize, so the composite cell is unchanged."""
    import dataclasses

    def small(img):
        return img.resize((tile, tile), Image.NEAREST)

    return dataclasses.replace(sample, background=small(sample.background),
                               foregrounds=[small(f) for f in sample.foregrounds], masks=[small(m) for m in sample.masks])


def _load_for_sheet(index: list[tuple[Path, str, int]], count: int, damaged: list[str]) -> list:
    """Decode ``count`` samples, taking layer counts in turn so that each count shows up; a sample
    that does not decode is left out and its line added to ``damaged``."""
    from layerdiff.data.format import decode_record, iter_shard_records

    queues: dict[int, list] = {}
    for shard, key, n in index:
        queues.setdefault(n, []).append((shard, key))
    chosen: list[tuple[Path, str]] = []
    while len(chosen) < count and any(queues.values()):
        for n in sorted(queues):
            if queues[n] and len(chosen) < count:
                chosen.append(queues[n].pop(0))
    order = {item: i for i, item in enumerate(chosen)}  # (shard, key): keys may repeat across shards
    found = {}
    for shard in dict.fromkeys(s for s, _ in chosen):
        wanted = {k for s, k in chosen if s == shard}
        try:
            for key, members in iter_shard_records(shard):
                if key in wanted and (shard, key) not in found:
                    try:
                        found[(shard, key)] = _thumbnails(decode_record(key, members, shard), SHEET_TILE)
                    except LayerDiffError as exc:
                        damaged.append(str(exc))
                        wanted.discard(key)
                    if all((shard, k) in found for k in wanted):
                        break
        except LayerDiffError as exc:
            damaged.append(str(exc))
    return [found[item] for item in sorted(found, key=order.get)]
