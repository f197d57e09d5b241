"""``python -m layerdiff data toy`` and ``python -m layerdiff data inspect`` (the work is
:mod:`layerdiff.data.command`)."""

from __future__ import annotations

from pathlib import Path

from layerdiff.data.command import MAX_SHEET_SAMPLES, run_inspect, run_toy


def register(subparsers) -> None:
    """Add the ``toy`` and ``inspect`` sub-commands to the ``data`` sub-parsers ``subparsers``."""
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
    inspect.add_argument("--count", type=int, default=6,
                         help=f"samples on the contact sheet (default 6, at most {MAX_SHEET_SAMPLES}; 0 = no sheet)")
    inspect.add_argument("--overwrite", action="store_true", help="replace the contact sheet if the file exists")
    inspect.set_defaults(func=run_inspect)
