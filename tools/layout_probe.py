"""Two probes of how a toy model decides where objects go, for a model file or a training checkpoint.

    OMP_NUM_THREADS=1 python tools/layout_probe.py [--model FILE | --run RUN_DIR --step N [--config RECIPE]]
        [--steps 999,900,800]

1. *Is the layout visible in the noisy input?* 32 fresh one-object toy scenes are noised to each
   timestep; the mask of the model's clean-latent prediction is compared (IoU) with the scene's own
   mask and, as chance, with another scene's. A model that finds its scene's object at its noisiest
   training step reads layouts off the starting noise instead of choosing them from the prompt.
2. *Do position words move the prediction?* From the same pure noise (16 draws), the soft mask of the
   clean-latent prediction for "a large red circle [on the left / ... / in the centre]" in front of a
   blue sky: its centroid (x, y as fractions of the image side) and covered area per position word.
   The same prompts with "small" instead of "large" are the control (a word the model does follow).

A training checkpoint (``RUN_DIR/layerdiff/checkpoints/step-N``) is read with its EMA weights, the
toy preset's config with the run's recipe settings (``--config``: the file the run was trained with,
whose "unet" and "scheduler" settings shape the model) and the run's ``vae-decoder.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load(args):
    import torch

    from layerdiff.io.checkpoint import build_random_model, load_model
    from layerdiff.io.files import read_safetensors

    if args.run is None:
        return load_model(args.model).eval()
    import json

    from layerdiff.training.recipes import recipe_config

    recipe = json.loads(args.config.read_text()) if args.config else {}
    config = recipe_config({k: recipe[k] for k in ("unet", "scheduler") if k in recipe})
    vae, meta = read_safetensors(args.run / "vae-decoder.safetensors")
    model = build_random_model(config, seed=0)
    model.vae.load_state_dict(vae)
    model.vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    model.config = model.unet.config = config.replace(vae={**config.vae, "scaling_factor": float(meta["scaling_factor"])})
    state, _ = read_safetensors(args.run / "layerdiff" / "checkpoints" / f"step-{args.step:06d}" / "state.safetensors")
    for part in ("unet", "text_encoder"):
        prefix = f"ema.{part}."
        getattr(model, part).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                            strict=False)
    return model.eval().to(dtype=torch.float32)


def clean_prediction(model, schedule, out, x, t):
    a = schedule.alphas_cumprod[t]
    if schedule.v_prediction:
        return a.sqrt() * x - (1 - a).sqrt() * out
    return (x - (1 - a).sqrt() * out) / a.sqrt()


def encode(model, global_prompts, layer_prompts, n):
    from layerdiff.model.text import tokenize

    glob = model.text_encoder(tokenize(model.tokenizer, global_prompts))[0]
    ids = tokenize(model.tokenizer, layer_prompts)[:, : model.config.layer_prompt_tokens]
    lay = model.text_encoder(ids)[0].unflatten(0, (n, 2))
    return glob, model.unet.enhance(glob, lay)


def visible_layout(model, schedule, steps) -> None:
    import numpy as np
    import torch

    from layerdiff.data.toy import render_sample

    n = 32
    samples = [render_sample(777, i, 128, num_layers=2) for i in range(n)]
    images = torch.stack([torch.stack([torch.from_numpy(np.array(s.background)), torch.from_numpy(np.array(s.foregrounds[0]))])
                          for s in samples]).float() / 255
    masks = torch.stack([torch.from_numpy(np.array(s.masks[0])).float()[None] / 255 for s in samples])
    latents = model.encode_layers(images, masks)
    glob, enhanced = encode(model, [s.global_prompt for s in samples], [p for s in samples for p in s.layer_prompts], n)
    true = masks[:, 0] > 0.5
    g = torch.Generator().manual_seed(0)

    def iou(a, b):
        return ((a & b).sum((1, 2)).float() / (a | b).sum((1, 2)).clamp(min=1).float()).mean().item()

    print("| t | signal-to-noise | IoU with its own scene | IoU with another scene |\n|---|---|---|---|")
    for t in steps:
        a = schedule.alphas_cumprod[t]
        x = a.sqrt() * latents + (1 - a).sqrt() * torch.randn(latents.shape, generator=g)
        out = model.unet(x, torch.full((n,), t), glob, enhanced, valid=torch.ones(n, 2, dtype=torch.bool))
        _, pred = model.decode_layers(clean_prediction(model, schedule, out, x, t))
        pred = pred[:, 0] > 0.5
        print(f"| {t} | {float(a / (1 - a)):.5f} | {iou(pred, true):.3f} | {iou(pred, true.roll(1, 0)):.3f} |")


def position_response(model, schedule, steps) -> None:
    import torch

    from layerdiff.data.toy import POSITIONS
    from layerdiff.sampling.masks import read_masks

    n = 16
    noise = torch.randn(n, 2, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    white, black = model.mask_axis()
    print("\n| prompt | " + " | ".join(f"t={t}: centroid, area" for t in steps) + " |\n|---|" + "---|" * len(steps))
    for size in ("large", "small"):
        for pos in (None, *POSITIONS):
            phrase = f"a {size} red circle" + (f" {POSITIONS[pos]}" if pos else "")
            glob, enhanced = encode(model, [f"{phrase} in front of a blue sky"] * n, ["a blue sky", phrase] * n, n)
            cells = []
            for t in steps:
                out = model.unet(noise, torch.full((n,), t), glob, enhanced, valid=torch.ones(n, 2, dtype=torch.bool))
                m = read_masks(clean_prediction(model, schedule, out, noise, t), white, black)[:, 0].clamp(0, 1)
                w = m.sum((1, 2)).clamp(min=1e-6)
                pos_x = (torch.arange(m.shape[2]).float() + 0.5) / m.shape[2]
                cx = ((m.sum(1) * pos_x).sum(1) / w).mean().item()
                cy = ((m.sum(2) * pos_x).sum(1) / w).mean().item()
                cells.append(f"({cx:.2f}, {cy:.2f}), {m.mean().item():.3f}")
            print(f"| {phrase} | " + " | ".join(cells) + " |")


def main() -> int:
    import torch

    from layerdiff.training.objective import NoiseSchedule

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model file or built-in name (default: layerdiff-toy)")
    p.add_argument("--run", type=Path, default=None, help="a toy recipe's output folder (with --step)")
    p.add_argument("--step", type=int, default=None, help="the training checkpoint's step")
    p.add_argument("--config", type=Path, default=None, help="the recipe file the run was trained with (--run)")
    p.add_argument("--steps", default="999,900,800,700,600,400", help="timesteps to probe")
    args = p.parse_args()
    if (args.run is None) != (args.step is None):
        p.error("--run and --step go together")
    torch.set_grad_enabled(False)
    model = load(args)
    schedule = NoiseSchedule(model.config.scheduler)
    steps = [int(s) for s in args.steps.split(",")]
    visible_layout(model, schedule, steps)
    position_response(model, schedule, steps[:3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
