"""Self-mask guidance variants against plain CFG, paired over identical prompts and seeds.

    OMP_NUM_THREADS=1 python tools/smg_sweep.py [--samples 96] [--seed 777001] [--out sweep.json]

One plain-CFG run of fresh toy scenes (none from the training set, drawn from a seed that `eval`
does not use), then one run per self-mask guidance variant (scale, start, erosion, blur) on the
same scenes and seeds; every stack is judged by the model-free judge and each variant's metrics are
compared with CFG's (mean difference and its paired standard error). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {  # name -> SamplerSettings fields on top of the model's own (SMG on in every one)
    "model default": {},
    "erode 0": {"mask_guidance_erode": 0},
    "scale 2": {"mask_guidance": 2.0},
    "scale 2, erode 0": {"mask_guidance": 2.0, "mask_guidance_erode": 0},
    "scale 2, start 0": {"mask_guidance": 2.0, "mask_guidance_start": 0.0},
    "scale 2, start 0.5": {"mask_guidance": 2.0, "mask_guidance_start": 0.5},
    "scale 2, blur 2": {"mask_guidance": 2.0, "mask_guidance_blur": 2.0},
    "scale 5, erode 0": {"mask_guidance": 5.0, "mask_guidance_erode": 0},
}
SHOWN = ("mask_iou", "colour_accuracy", "shape_accuracy", "size_accuracy", "position_accuracy",
         "background_accuracy", "overlap_fraction", "empty_mask_rate")


def records_of(model, items, settings, batch: int) -> list[dict]:
    from layerdiff.conditioning import LayerPrompts
    from layerdiff.evaluation.metrics import judge_stack
    from layerdiff.evaluation.scenes import batches
    from layerdiff.pipeline import decode_stack, run

    out = {}
    for group in batches(items, batch):
        prompts = [LayerPrompts(it.spec.global_prompt, tuple(it.spec.layer_prompts)) for it in group]
        latents = run(model, prompts, settings, seeds=[it.seed for it in group], decode=False)
        stack = decode_stack(model, latents, binarize=False)
        for it, rec in zip(group, judge_stack(stack, [it.spec for it in group])):
            out[it.index] = rec
    return [out[it.index] for it in items]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="layerdiff-toy")
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--seed", type=int, default=777001)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import torch

    from layerdiff.evaluation.metrics import compare_variants
    from layerdiff.evaluation.scenes import fresh_items, training_signatures
    from layerdiff.io.checkpoint import load_model
    from layerdiff.settings import SamplerSettings

    torch.set_num_threads(1)
    model = load_model(args.model)
    items = fresh_items(args.samples, seed=args.seed, exclude=training_signatures())
    names = list(VARIANTS) if args.only is None else args.only.split(",")
    t0 = time.time()
    cfg = records_of(model, items, SamplerSettings(mask_guidance=0.0), args.batch)
    print(f"cfg: {time.time() - t0:.0f}s", file=sys.stderr)
    result = {"samples": len(items), "seed": args.seed, "model": args.model, "variants": {}}
    for name in names:
        t0 = time.time()
        settings = SamplerSettings(**VARIANTS[name]).resolve(model)
        if settings.mask_guidance <= 0:
            settings = settings.replace(mask_guidance=0.75)
        smg = records_of(model, items, settings, args.batch)
        diff, se = compare_variants(cfg, smg)
        result["variants"][name] = {"settings": settings.to_dict(), "diff": diff["all"], "stderr": se["all"]}
        print(f"{name}: {time.time() - t0:.0f}s", file=sys.stderr)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    print(f"| variant | {' | '.join(SHOWN)} |\n|---|{'---|' * len(SHOWN)}")
    for name, v in result["variants"].items():
        cells = [f"{v['diff'][m]:+.4f} ± {v['stderr'][m]:.4f}" if v["diff"][m] is not None else "-" for m in SHOWN]
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
