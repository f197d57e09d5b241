"""``python -m layerdiff calibrate``: its arguments; :func:`layerdiff.evaluation.calibrate.calibrate_command` runs it."""

from __future__ import annotations

from pathlib import Path

from layerdiff.evaluation.calibrate import (
    BACKGROUND_CFG_CANDIDATES,
    DEFAULT_SAMPLES,
    FOREGROUND_CFG_CANDIDATES,
)
from layerdiff.evaluation.scenes import TRAIN_SAMPLES, TRAIN_SEED

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="pick a toy-world model's background and foreground guidance on validation scenes; write a new file",
        description="Generate fresh toy-world validation scenes (their own stream, never eval's) at each candidate "
        "guidance scale, judge them, and write a copy of the model file whose sampling defaults hold the best "
        "scales (the toy recipe's last stage, for a file that has one already).",
    )
    p.add_argument("--model", required=True, help="built-in model name or LayerDiff .safetensors path")
    p.add_argument("--out", required=True, type=Path, help="the calibrated copy (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (it may be --model itself)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"validation scenes (default {DEFAULT_SAMPLES})")
    p.add_argument("--background-candidates", default=",".join(f"{c:g}" for c in BACKGROUND_CFG_CANDIDATES),
                   help="background guidance scales to try, or none to keep the file's (default %(default)s)")
    p.add_argument("--foreground-candidates", default=",".join(f"{c:g}" for c in FOREGROUND_CFG_CANDIDATES),
                   help="foreground guidance (cfg) scales to try, or none to keep the file's (default %(default)s)")
    p.add_argument("--exclude-train-seed", type=int, default=TRAIN_SEED,
                   help=f"seed of the toy training data (default {TRAIN_SEED})")
    p.add_argument("--exclude-train-samples", type=int, default=TRAIN_SAMPLES,
                   help=f"toy training samples whose scenes are left out; 0 none (default {TRAIN_SAMPLES})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.set_defaults(func=run)


def run(args) -> int:
    from layerdiff.evaluation.calibrate import calibrate_command

    return calibrate_command(args)
