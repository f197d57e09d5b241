"""Layer edits with the built-in model at several foreground guidance scales (README, *Edits with the
built-in model*).

    python tools/measure_edit_guidance.py [SCENES] [SCALES]      # e.g. 64 3,4.5,7.5

Three-layer toy scenes from a stream of their own (never eval's or calibration's, none in the
built-in model's training set), generated with the
model's defaults; then layer 1 regenerated ('image and mask') as an object of another colour and shape,
once per scale on the same noise; the edited layer is judged as ``eval`` judges layers (colour, shape,
mask IoU, empty mask), plus whether it overlaps the untouched layer. Prints one line per scale.
"""
import dataclasses
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    import torch

    from layerdiff.conditioning import LayerPrompts
    from layerdiff.data.toy import COLOURS, SHAPES
    from layerdiff.edit import edit_layer
    from layerdiff.evaluation.metrics import MASK_THRESHOLD, judge_stack, mask_overlap
    from layerdiff.evaluation.scenes import fresh_items, training_signatures
    from layerdiff.io.checkpoint import load_layerdiff
    from layerdiff.pipeline import generate
    from layerdiff.settings import SamplerSettings

    torch.set_num_threads(2)
    model = load_layerdiff(str(ROOT / "layerdiff" / "weights" / "layerdiff-toy.safetensors"))
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    cfgs = [float(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "3,4.5,7.5").split(",")]
    items = fresh_items(N, seed=424242, layers=(3,), exclude=training_signatures())  # none from training
    rng = random.Random(0)
    res = {c: [] for c in cfgs}
    t0 = time.time()
    for it in items:
        spec = it.spec
        st = generate(model, LayerPrompts(spec.global_prompt, tuple(spec.layer_prompts)), seed=it.seed)
        old = spec.objects[0]
        new = dataclasses.replace(old, colour=rng.choice([c for c in COLOURS if c != old.colour]),
                                  shape=rng.choice([s for s in SHAPES if s != old.shape]))
        spec2 = dataclasses.replace(spec, objects=(new,) + tuple(spec.objects[1:]))
        for c in cfgs:
            ed = edit_layer(model, st, 1, spec2.layer_prompts[1], seed=it.seed + 1000, global_prompt=spec2.global_prompt,
                            settings=SamplerSettings(cfg=c))
            rec = judge_stack(ed, [spec2])[0]
            f = rec["foregrounds"][0]
            hard = (ed.masks[0].float().numpy() > MASK_THRESHOLD)
            res[c].append({"colour": f["colour_ok"], "shape": f["shape_ok"], "iou": f["mask_iou"], "empty": f["empty"],
                           "overlap": mask_overlap(hard) > 0.01})
    for c in cfgs:
        r = res[c]
        print(f"cfg {c}: n={len(r)} colour {np.mean([x['colour'] for x in r]):.3f} shape {np.mean([x['shape'] for x in r]):.3f} "
              f"mask IoU {np.mean([x['iou'] for x in r]):.3f} empty {np.mean([x['empty'] for x in r]):.3f} overlap {np.mean([x['overlap'] for x in r]):.3f}")
    print(f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
