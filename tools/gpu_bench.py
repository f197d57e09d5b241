"""GPU benchmark of an SD 1.5-scale LayerDiff (random weights): training and sampling.

Training: one optimizer step of the real training module (UNet, prompt enhancer and text encoder
as `train --init` trains them: fp32 weights, AdamW, autocast in fp16 or bf16), on random latents of
``--layers`` layers at ``--size`` px, for each dtype x gradient checkpointing on/off x batch size:
median step time and peak GPU memory (torch.cuda.max_memory_allocated), or "out of memory".

Sampling: per denoising step, the bare diffusers UNet on the B x L layer images with CFG (what a
ComfyUI KSampler runs to draw L separate images with the same weights), LayerDiff with CFG and
LayerDiff with CFG + self-mask guidance (:func:`layerdiff.evaluation.bench.bench_one`), with the
peak GPU memory of each. ``--comfyui DIR`` adds ComfyUI's own KSampler on the same random SD 1.5
weights (a checkpoint file written for it), run through ComfyUI's ``comfy.sample.sample``.

Random weights: timing and memory do not depend on them. Prints Markdown tables and writes them
to ``--out``. Run it on a GPU machine in one go, e.g.:

    python tools/gpu_bench.py --out gpu_bench.md                      # defaults: 512 px, 4 layers
    python tools/gpu_bench.py --device cpu --preset tiny --size 64 --batches 1 --dtypes bf16 --out x.md

Nothing is downloaded: the SD 1.5 architecture comes from the configs shipped in layerdiff/.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerdiff.config import get_preset  # noqa: E402
from layerdiff.io.checkpoint import build_random_model  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def train_case(model, device, dtype, checkpointing: bool, batch: int, layers: int, size: int, steps: int,
               warmup: int) -> dict:
    """Median seconds per optimizer step and peak GPU memory of one training configuration."""
    from layerdiff.training.loop import enable_gradient_checkpointing
    from layerdiff.training.objective import LayerDiffTrainModule

    module = LayerDiffTrainModule(model).to(device).train()
    module.requires_grad_(True)
    if checkpointing:
        enable_gradient_checkpointing(model, text_encoder=True)
    else:
        model.unet.unet.disable_gradient_checkpointing()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")
    h = w = size // model.vae_scale_factor
    tokens = int(model.config.text_encoder.get("max_position_embeddings", 77))
    vocab = int(model.config.text_encoder.get("vocab_size", 49408))
    g = torch.Generator().manual_seed(0)
    data = {
        "noisy": torch.randn(batch, layers, 8, h, w, generator=g),
        "t": torch.randint(0, 1000, (batch,), generator=g),
        "ids_global": torch.randint(0, vocab, (batch, tokens), generator=g),
        "ids_layers": torch.randint(0, vocab, (batch, layers, tokens), generator=g),
        "valid": torch.ones(batch, layers, dtype=torch.bool),
        "target": torch.randn(batch, layers, 8, h, w, generator=g),
        "weight": torch.ones(batch, layers, 8, 1, 1),
    }
    data = {k: v.to(device) for k, v in data.items()}
    times = []
    _reset_peak(device)
    try:
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype):
                loss = module(**data)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        out = {"step_s": statistics.median(times), "peak_gib": _peak_gib(device)}
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        if not _is_oom(exc):
            raise
        out = {"step_s": None, "peak_gib": None, "oom": True}
    finally:
        opt.zero_grad(set_to_none=True)
        del opt, scaler, params, data
        module.requires_grad_(False)
        model.unet.unet.disable_gradient_checkpointing()
        _reset_peak(device)
    return out


def comfy_ksampler_case(comfy_dir: Path, checkpoint: Path, device, batch: int, layers: int, size: int,
                        steps: int, warmup: int, cfg: float = 7.5) -> dict:
    """Seconds per step and peak memory of ComfyUI's KSampler (euler, normal) drawing B x L images
    from the random SD 1.5 checkpoint, through ComfyUI's own loader and sampler."""
    sys.path.insert(0, str(comfy_dir))
    import comfy.sample  # noqa: E402  (ComfyUI's modules, from --comfyui)
    import comfy.sd  # noqa: E402

    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=True)
    tokens = clip.tokenize("a photo")
    cond = [[clip.encode_from_tokens(tokens), {}]]
    uncond = [[clip.encode_from_tokens(clip.tokenize("")), {}]]
    latent = torch.zeros(batch * layers, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(n):
        comfy.sample.sample(model, noise, n, cfg, "euler", "normal", cond, uncond, latent, denoise=1.0,
                            disable_pbar=True, seed=0)

    run(warmup)
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    run(steps)
    _sync(device)
    return {"step_s": (time.perf_counter() - t0) / steps, "peak_gib": _peak_gib(device)}


def _fmt(v, unit="") -> str:
    return "-" if v is None else f"{v:.3f}{unit}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="sd15", help="model preset (sd15: the real architecture)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-sample", action="store_true")
    ap.add_argument("--comfyui", type=Path, help="a ComfyUI checkout: adds its KSampler on the same weights")
    ap.add_argument("--out", type=Path, default=Path("gpu_bench.md"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        ap.error(f"--dtypes {unknown[0]!r} is not one of {sorted(DTYPES)}")
    lines = []
    if device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        lines.append(f"device: {device}, torch {torch.__version__}")
    config = get_preset(args.preset)
    model = build_random_model(config, seed=0)
    n_unet = sum(p.numel() for p in model.unet.parameters())
    n_text = sum(p.numel() for p in model.text_encoder.parameters())
    lines.append(f"model: preset {args.preset}, LayerDiff UNet + enhancer {n_unet / 1e6:.1f} M, text encoder "
                 f"{n_text / 1e6:.1f} M parameters; {args.layers} layers at {args.size} px")
    if not args.skip_train:
        model.vae.to("cpu")
        model.unet.to(device)
        model.text_encoder.to(device)
        lines += ["", "### Training step (fp32 weights, AdamW, autocast)", "",
                  "| dtype | checkpointing | batch | s / step | peak GiB |", "|---|---|---|---|---|"]
        for name in dtypes:
            for ckpt in (False, True):
                for b in batches:
                    r = train_case(model, device, DTYPES[name], ckpt, b, args.layers, args.size, args.steps, args.warmup)
                    row = f"| {name} | {'on' if ckpt else 'off'} | {b} | " + (
                        "out of memory | - |" if r.get("oom") else f"{_fmt(r['step_s'])} | {_fmt(r['peak_gib'])} |")
                    lines.append(row)
                    print(row, flush=True)
        model.unet.to("cpu")
        model.text_encoder.to("cpu")
    del model
    _reset_peak(device)
    if not args.skip_sample:
        from layerdiff.evaluation.bench import bench_one

        lines += ["", "### Sampling, per denoising step (CFG; random weights)", "",
                  "| dtype | batch | bare UNet, B x L images (ms) | LayerDiff CFG (ms) | LayerDiff CFG + SMG (ms) | "
                  "LayerDiff / bare | peak GiB above the weights, bare / LayerDiff |", "|---|---|---|---|---|---|---|"]
        for name in dtypes:
            for b in batches:
                try:
                    r = bench_one(args.preset, args.layers, b, args.size, args.sample_steps, 3, device, DTYPES[name])
                except (RuntimeError, torch.OutOfMemoryError) as exc:
                    if not _is_oom(exc):
                        raise
                    lines.append(f"| {name} | {b} | out of memory | | | | |")
                    continue
                row = (f"| {name} | {b} | {r['bare_ms_per_step']:.1f} | {r['cfg_ms_per_step']:.1f} | "
                       f"{r['smg_ms_per_step']:.1f} | {r['cfg_over_bare']:.2f} | "
                       f"{r['peak_mb_bare'] / 1024:.2f} / {r['peak_mb_cfg'] / 1024:.2f} |")
                lines.append(row)
                print(row, flush=True)
                _reset_peak(device)
    if args.comfyui:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from sd15_random_files import random_sd15_state_dict  # noqa: E402

        from layerdiff.io.files import save_safetensors_atomic

        ckpt = args.out.with_suffix(".sd15-random.safetensors")
        save_safetensors_atomic(random_sd15_state_dict(0), ckpt, overwrite=True)
        lines += ["", "### ComfyUI KSampler on the same random SD 1.5 weights (euler, B x L images)", "",
                  "| batch (x layers) | s / step | peak GiB |", "|---|---|---|"]
        for b in batches:
            r = comfy_ksampler_case(args.comfyui, ckpt, device, b, args.layers, args.size, args.sample_steps, 2)
            row = f"| {b} x {args.layers} | {_fmt(r['step_s'])} | {_fmt(r['peak_gib'])} |"
            lines.append(row)
            print(row, flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
