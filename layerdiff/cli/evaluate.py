"""``python -m layerdiff eval``: its arguments; :func:`layerdiff.evaluation.report.eval_command` runs it."""

from __future__ import annotations

from pathlib import Path

from layerdiff.evaluation.run import DEFAULT_BATCH
from layerdiff.evaluation.scenes import DEFAULT_SAMPLES, DEFAULT_SEED, TRAIN_SAMPLES, TRAIN_SEED
from layerdiff.evaluation.sheets import DEFAULT_GRID_SAMPLES

__all__ = ["register", "run"]


def register(sub) -> None:
    from layerdiff.cli import sampler_flags

    p = sub.add_parser(
        "eval",
        help="evaluate a model on fresh toy-world prompts (accuracies, mask IoU, overlaps; CFG vs SMG) as JSON",
        description="Generate toy-world scenes whose prompt combinations are not in the training set, with plain "
        "CFG and with self-mask guidance on identical prompts and seeds, judge every layer with a model-free "
        "classifier and print the metrics per layer count as JSON.",
    )
    p.add_argument("--model", default=None, help="built-in model name or LayerDiff .safetensors path (default: layerdiff-toy)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"evaluation scenes, split evenly over --layers (default {DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"evaluation seed: scene i is drawn from (seed, i), its noise seed is seed + i (default {DEFAULT_SEED})")
    p.add_argument("--layers", default="2,3,4", help="layer counts to evaluate (default 2,3,4)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"scenes per sampler call (default {DEFAULT_BATCH})")
    sampler_flags.add(p, ("steps", "cfg", "background_cfg", "mask_guidance", "layout_cleanup", "layout_cleanup_start",
                          "empty_layer_retries", "layout_prior"), {
        "cfg": "classifier-free guidance scale (default: the model's)",
        "mask_guidance": "self-mask guidance scale of the SMG run, above 0 (default: the model's)",
        "layout_cleanup": "layout cleanup strength 0..1 in both runs, 0 off (default: the model's)",
        "empty_layer_retries": "times a foreground still empty early in sampling gets new noise, in both runs; 0 off "
                               "(default: the model's)",
        "layout_prior": "strength of the layer prompts' layout in the starting noise, in both runs; 0 off "
                        "(default: the model's)"})
    p.add_argument("--exclude-train-seed", type=int, default=TRAIN_SEED,
                   help=f"seed of the toy training data whose scenes are excluded (default {TRAIN_SEED})")
    p.add_argument("--exclude-train-samples", type=int, default=TRAIN_SAMPLES,
                   help=f"number of toy training samples whose scenes are excluded; 0 excludes none (default {TRAIN_SAMPLES})")
    p.add_argument("--train-data", type=Path, default=None,
                   help="exclude the scenes of this folder of toy shards instead (read from the shards' JSON)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON to this file (atomically)")
    p.add_argument("--grid", type=Path, default=None,
                   help="write a contact sheet PNG of the first scenes (composite, layers, masks; CFG and SMG rows)")
    p.add_argument("--grid-samples", type=int, default=DEFAULT_GRID_SAMPLES,
                   help=f"scenes on the contact sheet (default {DEFAULT_GRID_SAMPLES})")
    p.add_argument("--details", action="store_true", help="add every scene's prompts and judgements to the JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from layerdiff.cli import sampler_flags
    from layerdiff.evaluation.report import check_args, eval_command

    check_args(args)  # flag by flag, with the flags' names, before the settings check them again
    return eval_command(args, sampler_flags.settings(args))
