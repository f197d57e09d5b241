"""``python -m layerdiff generate``: its flags and their checks; :mod:`layerdiff.generate_files` runs it."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    from layerdiff.cli import sampler_flags

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
    sampler_flags.add(p, ("steps", "cfg", "mask_guidance", "mask_guidance_start", "background_cfg", "layout_cleanup",
                          "empty_layer_retries", "layout_prior"))
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: the model's)")
    p.add_argument("--model", default=None, help="built-in model name or LayerDiff .safetensors path "
                   "(default: layerdiff-toy; 'tiny' = random-weight test model)")
    p.add_argument("--base", default=None, help="SD 1.5 checkpoint supplying VAE/text encoder if the model file has none")
    p.add_argument("--batch", type=int, default=1, help="number of images (subfolders sample_000, ...)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weight precision (default fp32; bf16 halves the memory and is faster on many CPUs)")
    p.add_argument("--no-psd", action="store_true", help="do not write layers.psd")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    p.set_defaults(func=run)


# flags checked against limits.RANGES (None: the model's default)
NUMBER_FLAGS = ("seed", "steps", "cfg", "mask_guidance", "mask_guidance_start", "background_cfg", "layout_cleanup",
                "empty_layer_retries", "layout_prior", "batch")


def check_args(args):
    """Every flag checked before a file is read or written: ranges (limits.RANGES, under the flag's
    name), the device, and the --base file. Returns the prompts."""
    from layerdiff import limits
    from layerdiff.conditioning import LayerPrompts, check_prompts
    from layerdiff.errors import LayerDiffError

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


def torch_dtype(name: str):
    """--dtype -> the torch dtype (torch is imported only when a command runs)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_against_model(args, prompts) -> None:
    """From the model's header, before --out is made: the layer count and the size this model takes,
    and the memory of the run (weights + sampling + decoding) against what the device has free."""
    from layerdiff import limits
    from layerdiff.conditioning import check_prompts
    from layerdiff.config import get_preset
    from layerdiff.io.checkpoint import (
        DEFAULT_MODEL,
        RANDOM_PRESETS,
        check_layerdiff_file,
        load_memory_bytes,
        model_file,
    )

    path = model_file(args.model)
    if path is None:
        config, weights = get_preset(RANDOM_PRESETS[str(args.model or DEFAULT_MODEL)]), 0
    else:
        config, parts, shapes = check_layerdiff_file(path)
        weights = load_memory_bytes(parts, shapes, torch_dtype(args.dtype))
    check_prompts(prompts, config.max_layers)
    width = config.image_size if args.width is None else args.width
    height = config.image_size if args.height is None else args.height
    layers = len(prompts.layers)
    limits.check_size(width, height, config.vae_scale_factor, names=("--width", "--height"))
    limits.check_run_size(width, height, layers, args.batch, names=("--layer count", "--batch"))
    limits.check_run_memory(config, args.batch, layers, height, width, torch_dtype(args.dtype), args.device, extra=weights)


def run(args) -> int:
    from layerdiff.cli import sampler_flags
    from layerdiff.generate_files import generate_to_folder
    from layerdiff.io.checkpoint import check_model

    prompts = check_args(args)
    settings = sampler_flags.settings(args)
    check_model(args.model)  # headers only: a wrong --model is named before anything else is checked against it
    check_against_model(args, prompts)
    files = generate_to_folder(Path(args.out), prompts, settings, model_name=args.model, base=args.base,
                               device=args.device, width=args.width, height=args.height, seed=args.seed,
                               batch=args.batch, psd=not args.no_psd, overwrite=args.overwrite,
                               dtype=torch_dtype(args.dtype))
    print(f"wrote {len(files)} files to {args.out}", file=sys.stderr)
    return 0
