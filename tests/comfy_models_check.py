"""Run inside ComfyUI's Python: LayerDiff on a user's MODEL / CLIP / VAE against ComfyUI's own results.

    COMFY_VENV/bin/python tests/comfy_models_check.py COMFY_DIR OUT.json A.safetensors B.safetensors \
        LORA.safetensors LAYERDIFF.safetensors

Loads the SD 1.5 checkpoints A and B with ComfyUI's own loader, A again with the LoRA (ComfyUI's own
LoRA loader), and puts the untrained LayerDiff file on each through the Apply LayerDiff to Model node.
For each it records the largest differences between:
- the noise prediction of LayerDiff's layer 0 and ComfyUI's ``apply_model`` on the same latent, sigma
  and conditioning (ComfyUI's denoised output turned back into a noise prediction);
- LayerDiff's prompt encoding and ComfyUI's ``CLIP.encode_from_tokens`` (also with Set Last Layer -2);
- LayerDiff's VAE decode and ComfyUI's ``VAE.decode`` of the same latent.
It also records how much the LoRA moved ComfyUI's prediction, so a test can tell that the LoRA took
effect. A test module (tests/test_comfyui_models.py) runs it and checks the numbers.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    comfy_dir, out, a, b, lora, layerdiff = argv
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = True  # every comparison in fp32 on the CPU
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import folder_paths

    torch.set_num_threads(2)
    folder_paths.add_model_folder_path("layerdiff", str(Path(layerdiff).parent))
    spec = importlib.util.spec_from_file_location(
        "comfyui_layerdiff", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_layerdiff"] = pack
    spec.loader.exec_module(pack)
    apply_node = pack.NODE_CLASS_MAPPINGS["LayerDiffApplyModel"]()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    latent = torch.randn(1, 4, 8, 8, generator=g)
    prompt = "a red apple on a wooden table, a cat on the left"
    results = {}

    def check(name, model, clip, vae):
        comfy.model_management.load_models_gpu([model])
        sampling = model.get_model_object("model_sampling")
        sigma = sampling.sigma(torch.tensor([321.0]))
        with torch.no_grad():
            denoised = model.model.apply_model(x, sigma, c_crossattn=ctx)
            eps_comfy = (x - denoised) / sigma.view(-1, 1, 1, 1)
        (ld,) = apply_node.apply(model, clip, vae, Path(layerdiff).name, "model", "fp32", "cpu")
        t = sampling.timestep(sigma).float()
        x8 = torch.cat([x / (sigma**2 + 1) ** 0.5, torch.zeros_like(x)], dim=1)[:, None]
        with torch.no_grad():
            out = ld.unet(x8, t, ctx, ld.unet.enhance(ctx, ctx[:, None]))[:, 0, :4]
            text_comfy = clip.encode_from_tokens(clip.tokenize(prompt)).float()
            text_ours = ld.encode_text([prompt]).float()
            image_comfy = vae.decode(latent).float()  # (1, H, W, 3) in 0..1
            image_ours = ((ld.decode_images(latent * 0.18215) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        skip = clip.clone()
        skip.clip_layer(-2)
        (ld_skip,) = apply_node.apply(model, skip, vae, Path(layerdiff).name, "model", "fp32", "cpu")
        with torch.no_grad():
            skip_comfy = skip.encode_from_tokens(skip.tokenize(prompt)).float()
            skip_ours = ld_skip.encode_text([prompt]).float()
        results[name] = {
            "eps_max_abs": float((out - eps_comfy).abs().max()),
            "eps_scale": float(eps_comfy.abs().max()),
            "text_max_abs": float((text_ours - text_comfy[:, : text_ours.shape[1]]).abs().max()),
            "text_scale": float(text_comfy.abs().max()),
            "clip_skip_max_abs": float((skip_ours - skip_comfy[:, : skip_ours.shape[1]]).abs().max()),
            "clip_skip_vs_last": float((skip_comfy - text_comfy).abs().max()),
            "image_max_abs": float((image_ours - image_comfy).abs().max()),
            "eps_comfy": eps_comfy.flatten()[:64].tolist(),
            "text_comfy": text_comfy.flatten()[:64].tolist(),
        }
        if name == "a":
            results["generation"] = generation(model, clip, ld, sampling)
            results["managed"] = managed(ld, x8, t)
        del ld, ld_skip

    def generation(model, clip, ld, sampling, steps=10, cfg=7.5, seed=3):
        """One layer, 10 euler steps (normal schedule; 999/9 = 111: integer timesteps, the same
        noise levels in both), cfg 7.5, the same seed: ComfyUI's sampler against LayerDiff's. Both
        draw the same noise from the seed and start from it times sqrt(sigma_max^2 + 1)."""
        import comfy.sample

        from layerdiff.conditioning import LayerPrompts
        from layerdiff.pipeline import run
        from layerdiff.settings import PLAIN

        pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        theirs = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed)
        settings = PLAIN.replace(steps=steps, cfg=cfg, background_cfg=cfg, sampler="euler", scheduler="normal")
        ours = run(ld, LayerPrompts(prompt, (prompt,), ""), settings, seeds=[seed], width=64, height=64, decode=False)
        ours = ours[:, 0, :4].float() / 0.18215  # ComfyUI's sampler returns unscaled VAE latents
        return {"scale": float(theirs.abs().max()), "max_abs": float((ours - theirs).abs().max()),
                "mean_abs": float((ours - theirs).abs().mean()), "mean_scale": float(theirs.abs().mean())}

    def managed(ld, x8, t):
        """ComfyUI's model management holds the bundle: loaded by ready(), listed, unloaded with
        ComfyUI's models, and loaded partially (lowvram: layers cast per call) with the same output."""
        host = sys.modules["comfyui_layerdiff.nodes._host"]
        loaded = lambda: any(m.model is ld.host_patcher for m in comfy.model_management.current_loaded_models)  # noqa: E731
        out = {"before_ready": loaded()}
        host.ready(ld, 2**20)
        out["after_ready"] = loaded()
        with torch.no_grad():
            full = ld.unet(x8, t, ctx, ld.unet.enhance(ctx, ctx[:, None]))
        comfy.model_management.unload_all_models()
        out["after_unload"] = loaded()
        patcher = ld.host_patcher
        patcher.load(torch.device("cpu"), lowvram_model_memory=256 * 2**20)
        modules = list(patcher.model.modules())
        out["cast_layers"] = sum(bool(getattr(m, "comfy_cast_weights", False)) for m in modules)
        out["castable_layers"] = sum(hasattr(m, "comfy_cast_weights") for m in modules)
        with torch.no_grad():
            partial = ld.unet(x8, t, ctx, ld.unet.enhance(ctx, ctx[:, None]))
        out["lowvram_max_abs"] = float((partial - full).abs().max())
        patcher.detach()
        return out

    model_a, clip_a, vae_a, *_ = comfy.sd.load_checkpoint_guess_config(a, output_vae=True, output_clip=True)
    check("a", model_a, clip_a, vae_a)
    lora_sd = comfy.utils.load_torch_file(lora, safe_load=True)
    model_l, clip_l = comfy.sd.load_lora_for_models(model_a, clip_a, lora_sd, 1.0, 1.0)
    check("a_lora", model_l, clip_l, vae_a)
    del model_a, clip_a, vae_a, model_l, clip_l
    comfy.model_management.unload_all_models()
    model_b, clip_b, vae_b, *_ = comfy.sd.load_checkpoint_guess_config(b, output_vae=True, output_clip=True)
    check("b", model_b, clip_b, vae_b)
    Path(out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
