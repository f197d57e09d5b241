"""``python -m layerdiff info FILE`` and ``python -m layerdiff convert --base SD15 --out FILE`` (the work is
:mod:`layerdiff.io.command`)."""

from __future__ import annotations

from layerdiff.io.command import run_convert, run_info


def register(sub) -> None:
    """Add the ``info`` and ``convert`` sub-commands to the sub-parsers ``sub``."""
    info = sub.add_parser("info", help="say what a .safetensors model file is (architecture, parameters, config)")
    info.add_argument("file", help="a .safetensors file")
    info.add_argument("--json", action="store_true", help="print the whole description as JSON")
    info.set_defaults(func=run_info)

    conv = sub.add_parser("convert", help=(
        "build an untrained LayerDiff checkpoint from an SD 1.5 checkpoint, or the adapter of a LayerDiff file"))
    src = conv.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", help="SD 1.5 single-file .safetensors (original layout) or diffusers folder")
    src.add_argument("--layerdiff", help="a full LayerDiff .safetensors file to take the adapter of (with --adapter)")
    conv.add_argument("--adapter", action="store_true", help=(
        "write only the layer modules (an adapter: applies to any SD 1.5-architecture checkpoint)"))
    conv.add_argument("--out", required=True, help="LayerDiff .safetensors file to write")
    conv.add_argument("--max-layers", type=int, default=4, help="layer slots (background + foregrounds), default 4")
    conv.add_argument("--full", action="store_true", help="also store the VAE and text encoder in the file")
    conv.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")
    conv.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    conv.set_defaults(func=run_convert)
