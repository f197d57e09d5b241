"""``python -m layerdiff bench``: its arguments; :func:`layerdiff.evaluation.bench.bench_command` runs it."""

from __future__ import annotations

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("bench", help="time LayerDiff vs the bare UNet and CFG vs self-mask guidance (JSON)")
    p.add_argument("--preset", default="tiny,toy", help="comma-separated presets (tiny, toy, sd15)")
    p.add_argument("--layers", default="2,3,4", help="comma-separated layer counts")
    p.add_argument("--batch", type=int, default=1, help="composable images per batch")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the preset's)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per timed run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights/activations dtype")
    p.add_argument("--layout", default="preset",
                   help="layer-module layouts to time: preset (the preset's own), paper (full-width inter-layer "
                        "and separate intra-layer attention), or both as 'preset,paper'")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args) -> int:
    from layerdiff.evaluation.bench import bench_command

    return bench_command(args)
