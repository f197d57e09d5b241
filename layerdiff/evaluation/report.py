"""``python -m layerdiff eval``: the report of how well a model draws toy-world scenes it never saw.

:func:`eval_command` checks the arguments, picks fresh scenes (:mod:`layerdiff.evaluation.scenes`),
runs the CFG-vs-SMG loop (:mod:`layerdiff.evaluation.run`), sums the judgements up
(:mod:`layerdiff.evaluation.metrics`) and prints the report as JSON; it also writes the JSON
(``--out``) and a contact sheet (``--grid``, :mod:`layerdiff.evaluation.sheets`), each atomically.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from layerdiff.data import toy
from layerdiff.errors import LayerDiffError
from layerdiff.evaluation.metrics import (
    MASK_THRESHOLD,
    OVERLAP_TOLERANCE,
    VARIANTS,
    breakdown,
    check_targets,
    compare_variants,
    summarise,
)
from layerdiff.evaluation.run import evaluate
from layerdiff.evaluation.scenes import (
    TRAIN_SIZE,
    EvalItem,
    data_signatures,
    fresh_items,
    parse_layers,
    spec_signature,
    training_signatures,
)
from layerdiff.evaluation.sheets import contact_sheet, png_bytes

__all__ = ["check_args", "eval_command"]


def _check_output(path: Path | None, flag: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise LayerDiffError(f"{flag} {path} is a folder: give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LayerDiffError(f"{flag} {path}: folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise LayerDiffError(f"{flag} {path}: folder {parent} is not writable; choose another path")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _details(items: Sequence[EvalItem], records: dict) -> list[dict]:
    return [{"index": it.index, "seed": it.seed, "global_prompt": it.spec.global_prompt, "spec": it.spec.to_dict(),
             **{v: records[v][n] for v in VARIANTS}} for n, it in enumerate(items)]


def check_args(args) -> None:
    """Every flag of ``eval`` checked before a model is loaded: ranges, layer counts, output paths."""
    for flag, value, low in (("--samples", args.samples, 1), ("--batch", args.batch, 1), ("--threads", args.threads, 1),
                             ("--grid-samples", args.grid_samples, 0), ("--steps", args.steps, 1)):
        if value is not None and value < low:
            raise LayerDiffError(f"{flag} {value} must be at least {low}")
    if args.mask_guidance is not None and args.mask_guidance <= 0:
        raise LayerDiffError(f"--mask-guidance {args.mask_guidance} must be above 0: the SMG run compares it with "
                             "plain CFG (mask guidance 0)")
    for flag, value in (("--layout-cleanup", args.layout_cleanup), ("--layout-cleanup-start", args.layout_cleanup_start)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise LayerDiffError(f"{flag} {value} must be within 0..1")
    if args.empty_layer_retries is not None and args.empty_layer_retries < 0:
        raise LayerDiffError(f"--empty-layer-retries {args.empty_layer_retries} must be 0 or more (0 disables it)")
    layers = parse_layers(args.layers)
    if args.samples < len(layers):
        raise LayerDiffError(f"--samples {args.samples} is fewer than the {len(layers)} layer counts in --layers "
                             f"{args.layers}: give at least {len(layers)} samples")
    _check_output(args.out, "--out")
    _check_output(args.grid, "--grid")
    if args.train_data is not None and not Path(args.train_data).is_dir():
        raise LayerDiffError(f"--train-data {str(args.train_data)!r} is not a folder: give the folder of toy shards")


def _scenes(args, layers: Sequence[int]) -> tuple[list[EvalItem], dict]:
    """The fresh evaluation scenes and the report's ``exclusion`` entry (what was left out, and why)."""
    if args.train_data is not None:
        exclude = data_signatures(args.train_data)
        exclusion = {"train_data": str(args.train_data)}
    else:
        exclude = training_signatures(args.exclude_train_seed, args.exclude_train_samples)
        exclusion = {"train_seed": args.exclude_train_seed, "train_samples": args.exclude_train_samples,
                     "train_size": TRAIN_SIZE}
    stats: dict = {}
    items = fresh_items(args.samples, args.seed, layers, exclude, stats=stats)
    exclusion.update(excluded_scenes=len(exclude), **stats,
                     distinct_eval_scenes=len({spec_signature(it.spec) for it in items}))
    return items, exclusion


def eval_command(args, settings=None) -> int:
    """Run ``eval`` with parsed arguments and the sampler settings of both runs: print the report as
    JSON (and write ``--out``, ``--grid``)."""
    t_start = time.perf_counter()
    check_args(args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise LayerDiffError(f"--device {args.device}: CUDA is not available here; use --device cpu")

    from layerdiff.io.checkpoint import DEFAULT_MODEL, load_model

    model = load_model(args.model, device=args.device)
    layers = parse_layers(args.layers, model.max_layers)

    t0 = time.perf_counter()
    items, exclusion = _scenes(args, layers)
    t_specs = time.perf_counter() - t0

    from tqdm.auto import tqdm

    keep = args.grid_samples if args.grid is not None else 0
    with tqdm(total=2 * len(items), desc="eval", unit="sample", file=sys.stderr, disable=None,
              mininterval=1.0) as bar:
        result = evaluate(model, items, batch=args.batch, settings=settings, keep=keep, progress=bar.update)
    records = result["records"]
    results = {v: summarise(records[v]) for v in VARIANTS}
    diff, stderr = compare_variants(records["cfg"], records["smg"])
    parts = {v: breakdown(records[v]) for v in VARIANTS}
    primary = "smg" if (model.config.sampling.mask_guidance or 0) > 0 else "cfg"  # what the model's defaults run
    report = {
        "model": model.source or str(args.model or DEFAULT_MODEL),
        "samples": len(items),
        "seed": args.seed,
        "settings": {
            **result["settings"], "layers": list(layers), "device": str(args.device),
            "threads": torch.get_num_threads(), "mask_threshold": MASK_THRESHOLD,
            "overlap_tolerance": OVERLAP_TOLERANCE, "generator": toy.GENERATOR_VERSION, "exclusion": exclusion,
            "torch": torch.__version__,
        },
        "cfg": results["cfg"],
        "smg": results["smg"],
        "smg_minus_cfg": diff,
        "smg_minus_cfg_stderr": stderr,
        "targets_met": check_targets(results, diff, stderr, len(items), parts, primary),
        "breakdown": parts,
        "timing": {"scenes_s": round(t_specs, 1), **result["timing"]},
    }
    if args.grid is not None and keep:
        _write_atomic(args.grid, png_bytes(contact_sheet(items[:keep], result["kept"])))
    if args.details:
        report["per_sample"] = _details(items, records)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(report, indent=2) + "\n"
    if args.out is not None:
        _write_atomic(args.out, text.encode("utf-8"))
    sys.stdout.write(text)
    return 0
