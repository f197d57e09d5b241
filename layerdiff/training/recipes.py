"""The one-command recipe of the built-in toy model (``python -m layerdiff train --preset toy``).

It chains: toy data (if --data has none) -> the toy VAE -> its decoder fine-tuned on noisy latents
-> LayerDiff (UNet, prompt enhancer and the small text encoder trained together) -> the layout prior
(where each layer prompt puts its object, :mod:`layerdiff.training.layout_stage`) -> the decoder
fine-tuned once more for texture (the whole-crop texture term, backgrounds' sharpness) -> the background
and foreground guidance picked on fresh validation scenes (:mod:`layerdiff.evaluation.calibrate`) ->
``OUT/layerdiff-toy.safetensors``, whose sampling defaults carry that guidance.
Every stage is resumable: rerunning the same command continues where a killed run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("layerdiff.train")

# The built-in toy model's recipe.
TOY_RECIPE = {
    "samples": 5000,
    # crops centred on objects, object pixels weighted x4, posterior means decoded, and 2x2- and
    # 4x4-pooled latents taught to decode to the pooled image (scale equivariance)
    "vae": {"steps": 4000, "batch_size": 8, "crop": 64, "lr": 1e-3, "lr_schedule": "cosine", "focus": 0.75,
            "object_weight": 4.0, "sample_posterior": False, "scale_equivariance": 1.0,
            "scale_equivariance_factors": [2, 4]},
    # then the decoder alone learns to decode noisy latents (the encoder, so the latents, stay fixed),
    # with the pixels on object outlines weighted x16 (sharp edges that agree with the masks), noise
    # up to 0.6, and the texture statistics loss (backgrounds decoded with their detail, not its blur)
    "decoder": {"steps": 3000, "batch_size": 8, "crop": 64, "lr": 3e-4, "lr_schedule": "cosine", "focus": 0.75,
                "object_weight": 4.0, "edge_weight": 16.0, "sample_posterior": False, "decoder_only": True,
                "latent_noise": 0.6, "texture_weight": 30.0},
    "train": {
        "steps": 8800,
        "batch_size": 8,
        "lr_base": 3e-4,
        "lr_new": 3e-4,
        "lr_text": 3e-4,
        "warmup_steps": 200,
        "lr_schedule": "cosine",
        "snr_gamma": 5.0,
        "intra_gate_init": 1.0,  # trained from scratch: no SD weights for a zero gate to protect
        "bucket_layers": True,
        "layer_weights": {"2": 1.0, "3": 1.5, "4": 2.0},
        "ema_decay": 0.998,
        "size": 128,
        "cache_latents": True,
        "checkpoint_every": 500,
        "log_every": 50,
        "sample_every": 4400,
    },
    # after LayerDiff, the decoder once more (encoder, latents and LayerDiff untouched), with the
    # texture loss matched over each whole crop too, so sparse textures (stars, snow flakes, wood
    # grain) are drawn rather than decoded to their blur, and backgrounds' sharpness matched (their
    # dots and lines one pixel wide, not soft blobs)
    "texture": {"steps": 800, "batch_size": 8, "crop": 64, "lr": 3e-4, "lr_schedule": "cosine", "focus": 0.75,
                "object_weight": 4.0, "edge_weight": 16.0, "sample_posterior": False, "decoder_only": True,
                "latent_noise": 0.6, "texture_weight": 30.0, "texture_crop_weight": 1.0,
                "texture_sharpness_weight": 10.0},
    # the layout prior, trained alone on the LayerDiff stage's cached latents (0 steps skips it)
    "layout": {"steps": 1500, "batch_size": 32, "lr": 1e-2},
    # the background guidance, then the foregrounds' guidance, written into the model file's sampling
    # defaults, picked on fresh validation scenes (layerdiff.evaluation.calibrate): by background
    # class and texture, then by foreground colour, shape and mask IoU; 0 samples keeps the preset's
    "calibration": {"samples": 48, "candidates": [7.5, 10.0, 14.0], "foreground_candidates": [2.0, 3.0, 4.5]},
}

MAX_TOY_SAMPLES = 10_000_000
RECIPE_KEYS = ("model", "samples", "train", "vae", "decoder", "texture", "unet", "scheduler", "layout", "calibration")  # --preset toy's --config
_LATENT_STATS = ("latents_mean", "latents_std")  # per-channel latent scaling (VaeTrainConfig.latent_stats)


def _unet_override(value) -> dict:
    """The recipe's ``"unet"`` setting: keys of diffusers' UNet2DConditionModel config."""
    import inspect

    from diffusers import UNet2DConditionModel

    from layerdiff.errors import LayerDiffError

    if not isinstance(value, dict):
        raise LayerDiffError(f"the recipe's \"unet\" setting is {value!r}: give an object of UNet config keys, "
                             'e.g. {"block_out_channels": [48, 96, 96]}')
    known = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise LayerDiffError(f"the recipe's \"unet\" setting has unknown key(s) {unknown}: use keys of diffusers' "
                             "UNet2DConditionModel config, e.g. block_out_channels, down_block_types")
    return dict(value)


def _scheduler_override(value) -> dict:
    """The recipe's ``"scheduler"`` setting: keys of the noise schedule (the model config's
    ``scheduler``, e.g. ``layerdiff.config.LOW_RES_SCHEDULER``), checked as a model file's are."""
    from layerdiff.config import get_preset
    from layerdiff.config_check import check_config_dict
    from layerdiff.errors import LayerDiffError

    if not isinstance(value, dict):
        raise LayerDiffError(f"the recipe's \"scheduler\" setting is {json.dumps(value)[:40]}: give an object of "
                             'noise schedule keys, e.g. {"beta_schedule": "linear", "prediction_type": "v_prediction"}')
    config = get_preset("toy").to_dict()
    config["scheduler"] = {**config["scheduler"], **value}
    try:
        check_config_dict(config)
    except LayerDiffError as exc:
        raise LayerDiffError(f"the recipe's \"scheduler\" setting: {exc}") from None
    return dict(value)


def vae_stage(vae, data, file: Path, run_dir: Path, settings: dict, seed: int) -> None:
    """One VAE stage of the recipe: load its finished file, or train (resumably) and save it."""
    import torch

    from layerdiff.io.files import read_safetensors, save_safetensors_atomic
    from layerdiff.training.settings import VaeTrainConfig
    from layerdiff.training.vae import train_vae

    if file.is_file():
        tensors, meta = read_safetensors(file)
        vae.load_state_dict(tensors)
        stats = {k: json.loads(meta[k]) if k in meta else None for k in _LATENT_STATS}
        vae.register_to_config(scaling_factor=float(meta["scaling_factor"]), **stats)
        return
    torch.manual_seed(seed)
    train_vae(vae, data, run_dir, VaeTrainConfig(seed=seed, **settings))
    meta = {"scaling_factor": str(vae.config.scaling_factor)}
    meta.update({k: json.dumps(getattr(vae.config, k)) for k in _LATENT_STATS if getattr(vae.config, k, None)})
    save_safetensors_atomic(vae.state_dict(), file, metadata=meta, overwrite=True)


def _toy_recipe(args, settings: dict) -> tuple[dict, int]:
    """The toy recipe with ``settings`` (the --config file) and the command line's overrides
    applied, every stage's settings checked; (recipe, number of toy samples)."""
    from layerdiff.errors import LayerDiffError
    from layerdiff.training.layout_stage import layout_settings
    from layerdiff.training.settings import TrainConfig, VaeTrainConfig

    unknown = sorted((k for k in settings if k not in RECIPE_KEYS), key=str)
    if unknown:
        raise LayerDiffError(f"--config: key {unknown[0]!r} is unknown for --preset toy: use some of "
                             f"{list(RECIPE_KEYS)} (training settings go under \"train\", e.g. "
                             '{"train": {"steps": 1000}})')
    for key in ("train", "vae", "calibration", "unet", "scheduler", "decoder", "texture", "layout"):
        value = settings.get(key)
        if key in settings and not isinstance(value, dict) and not (key in ("decoder", "texture") and value is None):
            raise LayerDiffError(f"--config: the \"{key}\" setting is {json.dumps(value)[:40]}, not an object of settings")
    samples = settings.get("samples", TOY_RECIPE["samples"])
    if type(samples) is not int or not 1 <= samples <= MAX_TOY_SAMPLES:
        raise LayerDiffError(f"--config: samples {json.dumps(samples)[:40]} must be a whole number from 1 to "
                             f"{MAX_TOY_SAMPLES} (toy samples to generate)")
    recipe = json.loads(json.dumps(TOY_RECIPE))
    recipe["train"].update(settings.get("train", {}))
    recipe["vae"].update(settings.get("vae", {}))
    if "unet" in settings:
        recipe["unet"] = _unet_override(settings["unet"])
    if "scheduler" in settings:
        recipe["scheduler"] = _scheduler_override(settings["scheduler"])
    recipe["layout"] = layout_settings({**recipe["layout"], **settings.get("layout", {})})
    recipe["calibration"] = _calibration_settings({**recipe["calibration"], **settings.get("calibration", {})})
    for stage in ("decoder", "texture"):  # null or {} skips the stage
        if stage in settings:
            recipe[stage] = {**recipe.get(stage, {}), **settings[stage]} if settings[stage] else {}
    if args.steps is not None:
        recipe["train"]["steps"] = args.steps
    if args.batch_size is not None:
        recipe["train"]["batch_size"] = args.batch_size
    if args.vae_steps is not None:
        recipe["vae"]["steps"] = args.vae_steps
    TrainConfig.from_dict({**recipe["train"], "seed": args.seed}, where="train.")
    VaeTrainConfig.from_dict(recipe["vae"], "vae.", seed=args.seed)
    for stage in ("decoder", "texture"):
        if recipe.get(stage):
            VaeTrainConfig.from_dict(recipe[stage], f"{stage}.", seed=args.seed)
    return recipe, args.samples or samples


def recipe_config(recipe: dict):
    """The toy preset's config with the recipe's "unet" and "scheduler" settings applied."""
    from layerdiff.config import get_preset

    config = get_preset("toy")
    if recipe.get("unet"):
        config = config.replace(unet={**config.unet, **recipe["unet"]})
    if recipe.get("scheduler"):
        config = config.replace(scheduler={**config.scheduler, **recipe["scheduler"]})
    return config


def run_toy_recipe(args, settings: dict) -> int:
    """data -> VAE -> decoder fine-tuning -> LayerDiff -> layout -> texture decoder -> calibration for the
    built-in toy model; every stage resumable."""
    import torch

    from layerdiff.conditioning import LayerPrompts
    from layerdiff.data.format import list_shards
    from layerdiff.errors import LayerDiffError
    from layerdiff.io.checkpoint import build_random_model
    from layerdiff.training.loop import train
    from layerdiff.training.settings import TrainConfig

    recipe, samples = _toy_recipe(args, settings)  # every setting checked before any work
    config = recipe_config(recipe)
    try:
        model = build_random_model(config, seed=args.seed)
    except LayerDiffError:
        raise
    except (TypeError, ValueError, KeyError) as exc:  # diffusers refusing the recipe's "unet" values
        raise LayerDiffError(f"the recipe's \"unet\" setting does not make a UNet ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:160]}): fix its values") from None
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.time()
    if not (data.is_dir() and list_shards(data)):
        from layerdiff.data.toy_dataset import generate_toy_dataset

        logger.warning("generating %d toy samples in %s", samples, data)
        generate_toy_dataset(data, samples, seed=args.seed, size=128, resume=data.is_dir())
    timings["data_s"] = round(time.time() - t, 1)
    t = time.time()
    vae_stage(model.vae, data, out / "vae.safetensors", out / "vae_run", recipe["vae"], args.seed)
    timings["vae_s"] = round(time.time() - t, 1)
    t = time.time()
    if recipe.get("decoder"):
        vae_stage(model.vae, data, out / "vae-decoder.safetensors", out / "decoder_run", recipe["decoder"], args.seed)
    timings["decoder_s"] = round(time.time() - t, 1)
    model.vae.eval().requires_grad_(False)
    # the LayerDiff config records the trained VAE's latent scaling
    scaling = {k: getattr(model.vae.config, k, None) for k in ("scaling_factor", *_LATENT_STATS)}
    model.config = model.unet.config = config.replace(vae={**config.vae, **scaling})
    prompts = [
        LayerPrompts("a red star in front of a brick wall", ("a brick wall", "a red star")),
        LayerPrompts("a large yellow circle and a small blue square in front of a blue sky",
                     ("a blue sky", "a large yellow circle", "a small blue square")),
        LayerPrompts("a green heart, a white cross and a purple triangle in front of a wooden floor",
                     ("a wooden floor", "a green heart", "a white cross", "a purple triangle")),
    ]
    t = time.time()
    cfg = TrainConfig.from_dict({**recipe["train"], "seed": args.seed})
    final = train(model, data, out / "layerdiff", cfg, sample_prompts=prompts)
    timings["layerdiff_s"] = round(time.time() - t, 1)
    from layerdiff.io.checkpoint import load_layerdiff, save_layerdiff

    trained = load_layerdiff(final)
    # the shipped sampler defaults are the preset's of this invocation (a checkpoint written by an
    # earlier invocation keeps the ones of its time), with the calibrated guidance scales
    trained.config = trained.config.replace(sampling=config.sampling)
    t = time.time()
    judged = [final]
    if trained.config.layout_prior and recipe["layout"]["steps"]:
        from layerdiff.training.layout_stage import layout_stage

        layout_file = out / "layout.safetensors"
        layout_stage(trained, data, out / "layerdiff" / f"latents-{cfg.size}.safetensors", cfg.size, layout_file,
                     recipe["layout"], args.seed)
        judged.append(layout_file)
    timings["layout_s"] = round(time.time() - t, 1)
    t = time.time()
    if recipe.get("texture"):
        texture_file = out / "vae-texture.safetensors"
        vae_stage(trained.vae, data, texture_file, out / "texture_run", recipe["texture"], args.seed)
        judged.append(texture_file)
    timings["texture_s"] = round(time.time() - t, 1)
    t = time.time()
    calibration = None
    if recipe["calibration"]["samples"]:
        calibration = calibrate(trained, judged, out / "calibration.json", args.seed, samples, recipe["calibration"])
        sampling = dataclasses.replace(trained.config.sampling, background_cfg=calibration["background_cfg"],
                                       **({"cfg": calibration["cfg"]} if "cfg" in calibration else {}))
        trained.config = trained.config.replace(sampling=sampling)
    timings["calibration_s"] = round(time.time() - t, 1)
    shipped = out / "layerdiff-toy.safetensors"
    save_layerdiff(trained, shipped, overwrite=True, dtype=torch.float16,
                   extra_metadata={"recipe": json.dumps(recipe), "timings": json.dumps(timings),
                                   **({"calibration": json.dumps(calibration)} if calibration else {})})
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    print(f"wrote {shipped} ({shipped.stat().st_size / 2**20:.1f} MB); timings {timings}", file=sys.stderr)
    return 0


def _calibration_settings(value: dict) -> dict:
    """The recipe's ``"calibration"`` setting, checked before any work: {"samples", "candidates",
    "foreground_candidates"}."""
    from layerdiff.errors import LayerDiffError

    unknown = sorted(set(value) - {"samples", "candidates", "foreground_candidates"})
    if unknown:
        raise LayerDiffError(f"the recipe's \"calibration\" setting has unknown key(s) {unknown}: use "
                             '"samples" (0 skips it), "candidates" (background guidance scales) and '
                             '"foreground_candidates" (foreground guidance scales; [] keeps the preset\'s)')
    samples, cands = value["samples"], value["candidates"]
    fg = value.get("foreground_candidates", [])
    if not isinstance(samples, int) or isinstance(samples, bool) or not (samples == 0 or 3 <= samples <= 10_000):
        raise LayerDiffError(f"the recipe's calibration samples {samples!r} must be 0 (keep the preset's background "
                             "guidance) or from 3 (one scene per layer count) to 10000")

    def scales(c) -> bool:
        return isinstance(c, list) and len(c) <= 32 and all(
            type(x) in (int, float) and 0 < x <= 100 for x in c)  # NaN fails the comparison

    if not scales(cands) or not cands:
        raise LayerDiffError(f"the recipe's calibration candidates {cands!r} must be a list of up to 32 guidance "
                             "scales above 0 and at most 100, e.g. [7.5, 10, 14]")
    if not scales(fg):
        raise LayerDiffError(f"the recipe's calibration foreground_candidates {fg!r} must be a list of up to 32 "
                             "guidance scales above 0 and at most 100, e.g. [2, 3, 4.5] ([] keeps the preset's)")
    return {"samples": samples, "candidates": [float(c) for c in cands], "foreground_candidates": [float(c) for c in fg]}


def calibrate(model, weights: Path | list[Path], file: Path, seed: int, samples: int, settings: dict) -> dict:
    """The recipe's last stage: the background and foreground guidance picked on a validation stream
    (:mod:`layerdiff.evaluation.calibrate`); kept in ``file`` for the same weights (the files in
    ``weights``) and settings, so a rerun reuses it."""
    import hashlib
    import os

    from layerdiff.evaluation.calibrate import RULES, calibrate_guidance
    from layerdiff.evaluation.scenes import training_signatures

    sha = hashlib.sha256()
    for path in [weights] if isinstance(weights, Path) else weights:
        sha.update(path.read_bytes())
    digest = sha.hexdigest()
    # the sampler it judges with, less the two scales it picks and the self-mask guidance settings
    # (it judges plain CFG): a change to it redoes the stage
    def judged(sampling: dict) -> dict:
        return {k: v for k, v in sampling.items() if k not in ("cfg", "background_cfg") and not k.startswith("mask_guidance")}

    sampler = judged(json.loads(json.dumps(dataclasses.asdict(model.config.sampling))))
    if file.is_file():
        done = json.loads(file.read_text())
        if (done.get("weights_sha256") == digest and done.get("settings") == settings and done.get("rules") == RULES
                and isinstance(done.get("sampler"), dict) and judged(done["sampler"]) == sampler):
            return done
    result = calibrate_guidance(model, settings["candidates"], settings.get("foreground_candidates", []),
                                samples=settings["samples"], exclude=training_signatures(seed=seed, samples=samples))
    result["settings"] = settings
    result["sampler"] = sampler
    result["weights_sha256"] = digest
    tmp = file.with_name(file.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, file)
    return result
