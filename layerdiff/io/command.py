"""The work of ``python -m layerdiff info FILE`` and ``python -m layerdiff convert --base SD15 --out FILE``
(their flags: :mod:`layerdiff.cli.models`)."""

from __future__ import annotations

import json
import sys


def run_info(args) -> int:
    from layerdiff.io.checkpoint import describe_file
    from layerdiff.limits import available_memory

    info = describe_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    line = f"{info['file']}: {info['architecture']}, {info['parameters']:,} parameters in {info['tensors']} tensors"
    if "layerdiff_config" in info:
        c = info["layerdiff_config"]
        line += (
            f"; LayerDiff config {c['name']!r}: max_layers {c['max_layers']}, image size {c['image_size']}, "
            f"{'an adapter (layer modules only: needs an SD 1.5 base), ' if c.get('kind') == 'adapter' else ''}"
            f"components {c['components']}; loading as fp32 needs about {info['load_memory_bytes'] / 2**30:,.2f} GiB"
        )
        available = available_memory()
        if available is not None and info["load_memory_bytes"] > available:
            line += f", more than the {available / 2**30:,.1f} GiB available here"
    elif info["architecture"] == "sd15":
        line += (
            "; an SD 1.5 checkpoint: use it as --base, or build a LayerDiff from it with "
            "python -m layerdiff convert --base FILE --out OUT.safetensors"
        )
    print(line)
    return 0


def run_convert(args) -> int:
    import torch

    from layerdiff.config import get_preset
    from layerdiff.errors import LayerDiffError
    from layerdiff.io.convert import convert_sd15, write_adapter

    dtype = torch.float16 if args.fp16 else None
    if args.layerdiff is not None:
        if not args.adapter:
            raise LayerDiffError("--layerdiff FILE takes the adapter of a LayerDiff file: add --adapter (or use --base)")
        out = write_adapter(args.layerdiff, args.out, overwrite=args.overwrite, dtype=dtype)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if args.adapter and args.full:
        raise LayerDiffError("--adapter holds the layer modules only; --full adds a VAE and text encoder: choose one")
    config = get_preset("sd15", max_layers=args.max_layers)
    out = convert_sd15(
        args.base,
        args.out,
        config=config,
        include_vae_and_text_encoder=args.full,
        overwrite=args.overwrite,
        dtype=dtype,
        adapter=args.adapter,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0
