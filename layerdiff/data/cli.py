"""``python -m layerdiff data toy`` and ``python -m layerdiff data inspect``."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from PIL import Image

from layerdiff.errors import LayerDiffError

__all__ = ["contact_sheet", "parse_layer_counts", "register", "run_inspect", "run_toy"]


def register(subparsers) -> None:
    toy = subparsers.add_parser(
        "toy", help="generate the procedural toy world (shapes in front of textured backgrounds)",
        description="Write toy-world samples (exact layers, masks and prompts) as .tar shards.")
    toy.add_argument("--out", required=True, type=Path, help="output folder for the shards")
    toy.add_argument("--samples", required=True, type=int, help="number of samples")
    toy.add_argument("--seed", type=int, default=0, help="dataset seed; sample i depends only on (seed, i)")
    toy.add_argument("--size", type=int, default=128, help="image side in pixels, a multiple of 8 (default 128)")
    toy.add_argument("--samples-per-shard", type=int, default=1000, help="samples per .tar shard (default 1000)")
    toy.add_argument("--workers", type=int, default=2, help="processes, one shard each at a time (default 2)")
    toy.add_argument("--layers", default="2,3,4",
                     help="layer counts to draw, equally likely ('2,3,4') or weighted ('2:1,3:2,4:3')")
    toy.add_argument("--position-prob", type=float, default=None,
                     help="chance that an object's position is constrained and named in its prompt (default 0.4)")
    group = toy.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    group.add_argument("--resume", action="store_true",
                       help="keep the complete shards of an interrupted run with the same settings; write the rest")
    toy.set_defaults(func=run_toy)

    inspect = subparsers.add_parser(
        "inspect", help="count samples per layer count and draw a contact sheet",
        description="Summarise a folder of layered .tar shards and write a contact sheet PNG.")
    inspect.add_argument("dir", type=Path, help="folder holding the .tar shards")
    inspect.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG path (default DIR/contact_sheet.png)")
    inspect.add_argument("--count", type=int, default=6, help="samples on the contact sheet (default 6; 0 = no sheet)")
    inspect.set_defaults(func=run_inspect)


def parse_layer_counts(text: str) -> dict[int, float]:
    """'2,3,4' -> equal weights; '2:1,3:2' -> weighted."""
    weights: dict[int, float] = {}
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            count, _, weight = part.partition(":")
            weights[int(count)] = float(weight) if weight else 1.0
    except ValueError:
        weights = {}
    if not weights or any(k not in (2, 3, 4) for k in weights) or any(w < 0 for w in weights.values()) \
            or sum(weights.values()) <= 0:
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

    from layerdiff.data.toy import DEFAULT_POSITION_PROB, check_output_dir, generate_toy_dataset

    layer_probs = parse_layer_counts(args.layers)
    if args.samples < 1:
        raise LayerDiffError(f"--samples {args.samples} must be a positive number of samples")
    if args.size < 32 or args.size % 8:
        raise LayerDiffError(f"--size {args.size} must be a multiple of 8 and at least 32 (e.g. 64 or 128)")
    if args.workers < 1:
        raise LayerDiffError(f"--workers {args.workers} must be at least 1")
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


def run_inspect(args: argparse.Namespace) -> int:
    from layerdiff.data.format import list_shards, read_shard_meta

    if not args.dir.is_dir():
        raise LayerDiffError(f"inspect: folder {str(args.dir)!r} does not exist: give the folder holding the .tar shards")
    shards = list_shards(args.dir)
    if not shards:
        raise LayerDiffError(f"inspect: no .tar shards in {str(args.dir)!r}: generate data first "
                             "(python -m layerdiff data toy --out DIR --samples N)")
    if args.count < 0:
        raise LayerDiffError(f"--count {args.count} must be 0 or more")
    by_layers: Counter = Counter()
    sizes: Counter = Counter()
    sources: Counter = Counter()
    index: list[tuple[Path, str, int]] = []  # (shard, key, num_layers)
    for shard in shards:
        for meta in read_shard_meta(shard):
            n = meta["num_layers"]
            by_layers[n] += 1
            sizes[f"{meta.get('width')}x{meta.get('height')}"] += 1
            sources[(meta.get("source") or "?").split("/")[0][:40]] += 1
            index.append((shard, meta["key"], n))
    total = sum(by_layers.values())
    nbytes = sum(p.stat().st_size for p in shards)
    print(f"{args.dir}: {len(shards)} shards, {total} samples, {nbytes / 1e6:.1f} MB")
    print(f"{'layers':>6}  {'samples':>8}  {'share':>6}")
    for n in sorted(by_layers):
        print(f"{n:>6}  {by_layers[n]:>8}  {100 * by_layers[n] / max(total, 1):>5.1f}%")
    print(f"{'total':>6}  {total:>8}")
    summary = {"dir": str(args.dir), "shards": len(shards), "samples": total, "bytes": nbytes,
               "by_layers": {str(k): by_layers[k] for k in sorted(by_layers)},
               "sizes": dict(sizes.most_common(5)), "sources": dict(sources.most_common(5))}
    print(json.dumps(summary))
    if args.count > 0 and total:
        sheet = args.sheet or args.dir / "contact_sheet.png"
        samples = _load_for_sheet(index, args.count)
        try:
            contact_sheet(samples).save(sheet)
        except OSError as exc:
            raise LayerDiffError(f"--sheet {str(sheet)!r} cannot be written ({exc}): give a writable path") from exc
        print(f"contact sheet of {len(samples)} samples: {sheet}")
    return 0


def _load_for_sheet(index: list[tuple[Path, str, int]], count: int) -> list:
    """Decode ``count`` samples, taking layer counts in turn so that each count shows up."""
    from layerdiff.data.format import decode_record, iter_shard_records

    queues: dict[int, list] = {}
    for shard, key, n in index:
        queues.setdefault(n, []).append((shard, key))
    chosen: list[tuple[Path, str]] = []
    while len(chosen) < count and any(queues.values()):
        for n in sorted(queues):
            if queues[n] and len(chosen) < count:
                chosen.append(queues[n].pop(0))
    order = {key: i for i, (_, key) in enumerate(chosen)}
    found = {}
    for shard in dict.fromkeys(s for s, _ in chosen):
        wanted = {k for s, k in chosen if s == shard}
        for key, members in iter_shard_records(shard):
            if key in wanted:
                found[key] = decode_record(key, members, shard)
                if len(wanted & found.keys()) == len(wanted):
                    break
    return sorted(found.values(), key=lambda s: order[s.key])


def contact_sheet(samples: list, tile: int = 128) -> Image.Image:
    """One row per sample: composite, background, foregrounds (back to front), then their masks."""
    from PIL import ImageDraw

    from layerdiff.data.format import composite

    kmax = max((s.num_layers - 1 for s in samples), default=0)
    cols = 2 + 2 * kmax
    head, caption = 14, 14
    sheet = Image.new("RGB", (cols * tile, head + len(samples) * (tile + caption)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    labels = ["composite", "background", *(f"fg{k}" for k in range(1, kmax + 1)), *(f"mask{k}" for k in range(1, kmax + 1))]
    for c, label in enumerate(labels):
        draw.text((c * tile + 3, 1), label, fill=(200, 200, 200))
    for r, s in enumerate(samples):
        y = head + r * (tile + caption)
        cells = {0: composite(s), 1: s.background}
        for k, (fg, mask) in enumerate(zip(s.foregrounds, s.masks)):
            cells[2 + k] = fg
            cells[2 + kmax + k] = mask.convert("RGB")
        for c, img in cells.items():
            sheet.paste(img.resize((tile, tile), Image.NEAREST), (c * tile, y))
        text = f"{s.key}: {s.global_prompt}"
        max_chars = cols * tile // 6
        draw.text((3, y + tile + 1), text if len(text) <= max_chars else text[: max_chars - 3] + "...", fill=(230, 230, 230))
    return sheet
