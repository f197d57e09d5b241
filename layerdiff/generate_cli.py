"""``python -m layerdiff generate``: prompts -> a folder of layered outputs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

logger = logging.getLogger("layerdiff.cli")


def register(sub) -> None:
    from layerdiff.sampling import SCHEDULERS

    p = sub.add_parser(
        "generate",
        help="generate a layered image (background, foregrounds, masks, composite, PSD)",
        description="Generate composable images: --prompt is the whole scene, each --layer one layer "
        "(the first is the background, then foregrounds back to front).",
    )
    p.add_argument("--prompt", required=True, help="global prompt describing the whole scene")
    p.add_argument("--layer", action="append", default=[], metavar="PROMPT",
                   help="a layer prompt; repeat: background first, then foregrounds back to front")
    p.add_argument("--negative", default="", help="negative prompt (global and every layer)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed (sample b of a batch uses seed + b)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale of the foreground layers (default: the model's; the built-in "
                   "model: 3, picked on validation scenes by `calibrate`)")
    p.add_argument("--mask-guidance", type=float, default=None,
                   help="self-mask guidance scale; 0 disables it (default: the model's)")
    p.add_argument("--mask-guidance-start", type=float, default=None,
                   help="fraction of steps before self-mask guidance starts (default 0.25)")
    p.add_argument("--background-cfg", type=float, default=None,
                   help="guidance scale of the background layer (default: the model's; the built-in model: 7.5)")
    p.add_argument("--layout-cleanup", type=float, default=None,
                   help="0..1: keep one object per foreground layer and keep foregrounds apart; 0 disables it "
                        "(default: the model's)")
    p.add_argument("--empty-layer-retries", type=int, default=None,
                   help="times a foreground still empty early in sampling gets new noise; 0 disables it "
                        "(default: the model's, 2)")
    p.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="sampler (default ddim)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: the model's)")
    p.add_argument("--model", default=None, help="built-in model name or LayerDiff .safetensors path "
                   "(default: layerdiff-toy; 'tiny' = random-weight test model)")
    p.add_argument("--base", default=None, help="SD 1.5 checkpoint supplying VAE/text encoder if the model file has none")
    p.add_argument("--batch", type=int, default=1, help="number of images (subfolders sample_000, ...)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--no-psd", action="store_true", help="do not write layers.psd")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    p.set_defaults(func=run)


# flags checked against limits.RANGES (None: the model's default)
NUMBER_FLAGS = ("seed", "steps", "cfg", "mask_guidance", "mask_guidance_start", "background_cfg", "layout_cleanup",
                "empty_layer_retries", "batch")


def check_args(args):
    """Every flag checked before a file is read or written: ranges (limits.RANGES, under the flag's
    name), the device, and the --base file. Returns the prompts."""
    from layerdiff import limits
    from layerdiff.errors import LayerDiffError
    from layerdiff.pipeline import LayerPrompts, check_prompts

    prompts = LayerPrompts(args.prompt, tuple(args.layer), args.negative)
    if not args.layer:
        raise LayerDiffError("no --layer given: add --layer \"background prompt\" and one --layer per foreground")
    check_prompts(prompts, max_layers=limits.LAYERS_MAX)  # the model's own limit is checked once it is loaded
    for key in NUMBER_FLAGS:
        limits.check_number(getattr(args, key), limits.cli_name(key), key, optional=True)
    if args.width is not None or args.height is not None:
        limits.check_size(limits.SIZE_MULTIPLE if args.width is None else args.width,
                          limits.SIZE_MULTIPLE if args.height is None else args.height, names=("--width", "--height"))
    limits.check_device(args.device, "--device")
    if args.base is not None and not Path(args.base).exists():
        raise LayerDiffError(f"--base {args.base}: no such file: give an SD 1.5 checkpoint (.safetensors) or "
                             "diffusers folder, or leave --base out")
    return prompts


def check_against_model(args, prompts) -> None:
    """From the model's header, before --out is made: the layer count and the size this model takes,
    and the memory of the run (weights + sampling + decoding) against what the device has free."""
    import torch

    from layerdiff import limits
    from layerdiff.config import get_preset
    from layerdiff.io.checkpoint import (
        DEFAULT_MODEL,
        RANDOM_PRESETS,
        check_layerdiff_file,
        load_memory_bytes,
        model_file,
    )
    from layerdiff.pipeline import check_prompts

    path = model_file(args.model)
    if path is None:
        config, weights = get_preset(RANDOM_PRESETS[str(args.model or DEFAULT_MODEL)]), 0
    else:
        config, parts, shapes = check_layerdiff_file(path)
        weights = load_memory_bytes(parts, shapes, torch.float32)
    check_prompts(prompts, config.max_layers)
    width = config.image_size if args.width is None else args.width
    height = config.image_size if args.height is None else args.height
    layers = len(prompts.layers)
    limits.check_size(width, height, config.vae_scale_factor, names=("--width", "--height"))
    limits.check_run_size(width, height, layers, args.batch, names=("--layer count", "--batch"))
    limits.check_run_memory(config, args.batch, layers, height, width, torch.float32, args.device, extra=weights)


def run(args) -> int:
    from layerdiff.errors import LayerDiffError
    from layerdiff.io.export import layer_set_files, sample_dir, write_layer_sets

    prompts = check_args(args)
    from layerdiff.io.checkpoint import check_model

    check_model(args.model)  # headers only: a wrong --model fails before --out is made and the load starts
    check_against_model(args, prompts)
    out = Path(args.out)
    _check_writable(out)
    from layerdiff.io.resultset import clean_stale

    clean_stale(out)  # what a killed or failed earlier run left in --out (never a live run's)
    if not args.overwrite:  # refuse before the (slow) generation, not after
        dirs = [out] if args.batch == 1 else [sample_dir(out, b) for b in range(args.batch)]
        taken = [str(f) for d in dirs for f in _expected_files(d, len(args.layer), not args.no_psd, layer_set_files)
                 if f.exists()]
        if taken:
            raise LayerDiffError(f"{taken[0]} already exists: pass --overwrite or choose another --out")

    import torch

    from layerdiff.io.checkpoint import load_model
    from layerdiff.pipeline import generate

    model = load_model(args.model, base=args.base, device=args.device)
    stack = generate(
        model, prompts, width=args.width, height=args.height, seed=args.seed, batch=args.batch,
        steps=args.steps, cfg=args.cfg, mask_guidance=args.mask_guidance,
        mask_guidance_start=args.mask_guidance_start, scheduler=args.scheduler, background_cfg=args.background_cfg,
        layout_cleanup=args.layout_cleanup, empty_layer_retries=args.empty_layer_retries,
        callback=_progress_bar(),
    )
    d = model.config.sampling
    meta = {  # sizes and the global prompt are added by the writer from the stack itself
        "layer_prompts": list(args.layer),
        "negative_prompt": args.negative,
        "seed": args.seed,
        "steps": d.steps if args.steps is None else args.steps,
        "scheduler": args.scheduler or d.scheduler,
        "cfg": d.cfg if args.cfg is None else args.cfg,
        "background_cfg": next(v for v in (args.background_cfg, d.background_cfg, args.cfg, d.cfg) if v is not None),
        "mask_guidance": d.mask_guidance if args.mask_guidance is None else args.mask_guidance,
        "mask_guidance_start": d.mask_guidance_start if args.mask_guidance_start is None else args.mask_guidance_start,
        "mask_guidance_erode": d.mask_guidance_erode,  # the model's (SMG on each mask's interior; no flag)
        "layout_cleanup": d.layout_cleanup if args.layout_cleanup is None else args.layout_cleanup,
        "empty_layer_retries": d.empty_layer_retries if args.empty_layer_retries is None else args.empty_layer_retries,
        "model": model.source,
        "batch": args.batch,
        "torch": torch.__version__,
    }
    files = write_layer_sets(stack, out, meta, overwrite=args.overwrite, psd=not args.no_psd)
    print(f"wrote {len(files)} files to {out}", file=sys.stderr)
    return 0


def _expected_files(folder, n_layers, psd, layer_set_files):
    import torch

    from layerdiff.stack import LayerStack

    dummy = LayerStack(torch.zeros(1, n_layers, 1, 1, 3), torch.zeros(1, n_layers - 1, 1, 1))
    return layer_set_files(dummy, folder, psd)


def _check_writable(out: Path) -> None:
    """Create --out now and prove it writable, so a bad folder fails before the generation."""
    import tempfile

    from layerdiff.errors import LayerDiffError

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise LayerDiffError(f"--out {out} is not a writable folder ({exc.strerror}): choose another --out") from None


def _progress_bar():
    from tqdm.auto import tqdm

    state = {}

    def callback(step: int, total: int, preview) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc="sampling", unit="step", file=sys.stderr, leave=False)
        bar.update(step - bar.n)
        if step >= total:
            bar.close()

    return callback
