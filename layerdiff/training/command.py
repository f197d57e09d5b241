"""The ``train`` command's work: its flags and ``--config`` file checked before anything loads, then
the toy recipe (:mod:`layerdiff.training.recipes`) or one :func:`layerdiff.training.loop.train` run
of a preset or a LayerDiff file.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from layerdiff.training.recipes import MAX_TOY_SAMPLES, RECIPE_KEYS, run_toy_recipe

_CONFIG_DEPTH = 8  # {"train": {"layer_weights": {...}}} is 3 deep


def _check_args(args) -> None:
    """Every number on the command line in its range, before anything loads or is written."""
    from layerdiff.errors import LayerDiffError
    from layerdiff.training.settings import MAX_SEED, MAX_STEPS

    for flag, value, lo, hi in (("--steps", args.steps, 1, MAX_STEPS), ("--vae-steps", args.vae_steps, 1, MAX_STEPS),
                                ("--samples", args.samples, 1, MAX_TOY_SAMPLES), ("--batch-size", args.batch_size, 1, 1024),
                                ("--seed", args.seed, 0, MAX_SEED), ("--threads", args.threads, 1, 1024)):
        if value is not None and not lo <= value <= hi:
            raise LayerDiffError(f"{flag} {value} is out of range: use a whole number from {lo} to {hi}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LayerDiffError(f"--out {str(out)!r} is a file: give a folder for checkpoints, logs and the model")


def read_config(path) -> dict:
    """The ``--config`` JSON object: a regular file of at most 1 MiB, valid JSON, an object."""
    from layerdiff.data.input_files import InputFileError, parse_untrusted_json, read_regular_file
    from layerdiff.errors import LayerDiffError

    try:
        raw = read_regular_file(Path(path), 2**20)
    except InputFileError as exc:
        raise LayerDiffError(f"--config {exc}: give a JSON file of training settings") from None
    try:
        settings = parse_untrusted_json(raw, _CONFIG_DEPTH)
    except ValueError as exc:
        raise LayerDiffError(f"--config {str(path)!r} is {exc}: fix the file") from None
    if not isinstance(settings, dict):
        raise LayerDiffError(f"--config {str(path)!r} holds {type(settings).__name__ if settings is not None else 'null'}, "
                             'not a JSON object of settings such as {"steps": 1000, "batch_size": 8}')
    model = settings.get("model")
    if model is not None and not isinstance(model, str):
        raise LayerDiffError(f"--config {str(path)!r}: \"model\" is {json.dumps(model)[:40]}, not a preset name "
                             "such as \"tiny\" or \"sd15\"")
    return settings


def run(args) -> int:
    import torch

    from layerdiff.errors import LayerDiffError
    from layerdiff.training.settings import TrainConfig

    _check_args(args)
    settings = read_config(args.config) if args.config else {}
    model_name = settings.pop("model", None)
    preset = args.preset or model_name
    if preset == "toy" and not args.init:
        return run_toy_recipe(args, settings)
    if not preset and not args.init:
        raise LayerDiffError("say what to train: --preset toy|tiny|sd15, or --init LAYERDIFF_FILE")
    from layerdiff.config import get_preset
    from layerdiff.data.reader import resolve_shards
    from layerdiff.io.checkpoint import build_random_model, load_layerdiff
    from layerdiff.training.loop import train

    sections = sorted((k for k in settings if k in RECIPE_KEYS), key=str)
    if sections:
        raise LayerDiffError(f"--config: {sections[0]!r} is a section of --preset toy's recipe; for --preset "
                             f"{preset or '(from --init)'} give the training settings at the top level, e.g. "
                             '{"steps": 1000, "batch_size": 8}')
    cfg = TrainConfig.from_dict({**settings, **_overrides(args)})  # bad settings fail before any loading
    preset_config = get_preset(preset) if not args.init else None  # an unknown preset too
    resolve_shards(args.data)  # a missing or empty data folder too
    if cfg.validation_data is not None:
        try:
            resolve_shards(cfg.validation_data)
        except LayerDiffError as exc:
            raise LayerDiffError(f"validation_data: {exc}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.init:
        model = load_layerdiff(args.init, base=args.base)
    else:
        model = build_random_model(preset_config, seed=args.seed)
    if "size" not in settings:  # train at the model's own resolution unless the settings say otherwise
        cfg = dataclasses.replace(cfg, size=model.config.image_size)
    final = train(model, args.data, args.out, cfg)
    print(f"wrote {final}", file=sys.stderr)
    return 0


def _overrides(args) -> dict:
    out = {"seed": args.seed}
    if args.steps is not None:
        out["steps"] = args.steps
    if args.batch_size is not None:
        out["batch_size"] = args.batch_size
    return out
