"""A trained toy model's background guidance, picked on a validation stream (the toy recipe's last stage).

The background layer is sampled with its own guidance scale (``SamplerSettings.background_cfg``).
How strong it should be depends on the trained model, not on the architecture: strong guidance
pushes a generated background's mean latent beyond its own class's mean, away from the mean of all
classes, and whether that overshoot still lands nearest the right class depends on how the VAE laid
the classes out. So the recipe measures it: it generates ``samples`` fresh toy scenes (2, 3 and 4
layers, prompts unseen in training) from a stream of its own (:data:`CALIBRATION_SEED`, never the
evaluation's :data:`layerdiff.evaluation.scenes.DEFAULT_SEED`), once per candidate scale with the
same prompts and noise, with plain CFG, and judges each background twice: its class
(:func:`layerdiff.evaluation.judge.classify_background`, right or wrong) and its texture
(:func:`layerdiff.evaluation.judge.texture_fidelity`, capped at 1: more detail than the toy world's
earns nothing). Each scene scores the mean of the two (:func:`background_score`), and the pick
follows the one-standard-error rule (:func:`pick_within_noise`), as the foregrounds' does: stronger
guidance can win one more class on a few dozen scenes while flattening every background's texture,
so class accuracy alone, maximised, picks noise and costs texture. The scale goes into the model
file's sampling defaults.

The foreground layers' guidance (``SamplerSettings.cfg``) is picked the same way, after the
background's and with it: plain CFG at each candidate scale on the same scenes and noise, every
foreground judged from its layer image and mask as ``eval`` judges it. Each foreground scores the
mean of its colour and shape judgements (right or wrong) and its mask IoU (:func:`foreground_score`
over all of them), and the pick follows the one-standard-error rule (:func:`pick_within_noise`):
the smallest scale whose score is within one paired standard error of the best one's: on a few dozen
scenes one foreground's judgement can move the score more than neighbouring scales differ, so a bare
maximum would pick noise. Strong guidance overshoots the object's outline in the layer image and in
its mask differently, so the two stop agreeing; the measurements behind these choices are in
docs/experiments.md.

:func:`calibrate_command` runs ``python -m layerdiff calibrate`` (its arguments:
:mod:`layerdiff.cli.calibrate`): the picks are written into a copy of the model file
(:func:`write_calibrated`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from layerdiff.errors import LayerDiffError
from layerdiff.evaluation.judge import classify_background, texture_fidelity
from layerdiff.evaluation.metrics import judge_stack, metric_values, paired_stderr, summarise
from layerdiff.evaluation.scenes import batches, fresh_items, training_signatures

logger = logging.getLogger("layerdiff.calibrate")

CALIBRATION_SEED = 31337  # scene and noise stream; evaluation uses DEFAULT_SEED (12345)
BACKGROUND_CFG_CANDIDATES = (7.5, 10.0, 14.0, 20.0)
FOREGROUND_CFG_CANDIDATES = (2.0, 3.0, 4.5, 7.5)
DEFAULT_SAMPLES = 48
# How the picks are made; a recipe's cached calibration made by other rules is redone.
RULES = "background: class + texture, one standard error; foreground: one standard error"

__all__ = [
    "BACKGROUND_CFG_CANDIDATES", "CALIBRATION_SEED", "DEFAULT_SAMPLES", "FOREGROUND_CFG_CANDIDATES", "RULES",
    "background_score", "calibrate_background_guidance", "calibrate_command", "calibrate_foreground_guidance",
    "calibrate_guidance", "foreground_score", "pick_within_noise", "write_calibrated",
]


def pick_within_noise(values: dict[float, Sequence[float]]) -> tuple[float, dict[float, float]]:
    """The one-standard-error rule: the smallest scale whose mean is within one standard error of the best's.

    ``values`` maps each scale to its per-item scores, the same items in the same order for every
    scale (so differences pair up item by item). Returns (the pick, {scale: the paired standard
    error of the best's mean minus this scale's}). Less guidance overshoots less, so a larger scale
    has to beat a smaller one by more than the noise of the measurement to be picked.
    """
    import numpy as np

    if not values:
        raise LayerDiffError("no guidance scales were measured: give at least one candidate")
    arrays = {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise LayerDiffError(f"per-item scores of {sorted(sizes)} items: every scale needs the same items, "
                             "at least one")
    means = {c: float(a.mean()) for c, a in arrays.items()}
    best = max(means, key=lambda c: (means[c], -c))
    stderr = {}
    for c, a in arrays.items():
        d = arrays[best] - a
        stderr[c] = paired_stderr(d) or 0.0
    pick = min(c for c in arrays if means[c] >= means[best] - stderr[c] - 1e-12)
    return pick, stderr


def _check(cands: Sequence[float], batch: int, what: str, example: str) -> list[float]:
    out = [float(c) for c in cands]
    if not out or any(not c > 0 for c in out):
        raise LayerDiffError(f"{what} guidance candidates {list(cands)} must be one or more scales above 0, "
                             f"e.g. {example}")
    if batch < 1:
        raise LayerDiffError(f"calibration batch {batch} must be at least 1")
    return out


def _sample_part(model, part, settings):
    """Latents of one batch of validation scenes (one layer count)."""
    from layerdiff.conditioning import LayerPrompts
    from layerdiff.pipeline import run

    prompts = [LayerPrompts(it.spec.global_prompt, tuple(it.spec.layer_prompts)) for it in part]
    return run(model, prompts, settings, seeds=[it.seed for it in part], decode=False)


def background_score(right, texture):
    """The mean of a background's class judgement (right = 1) and its texture fidelity capped at 1:
    one number per scene (arrays work element-wise)."""
    import numpy as np

    return (np.asarray(right, dtype=np.float64) + np.minimum(np.asarray(texture, dtype=np.float64), 1.0)) / 2


def calibrate_background_guidance(
    model,
    candidates: Sequence[float] = BACKGROUND_CFG_CANDIDATES,
    samples: int = DEFAULT_SAMPLES,
    seed: int = CALIBRATION_SEED,
    batch: int = 8,
    exclude=frozenset(),
    progress: Callable[[int], object] | None = None,
) -> dict:
    """Background class accuracy and texture of each candidate background guidance scale on fresh toy scenes.

    Returns {"background_cfg": the chosen scale (:func:`background_score` per scene,
    :func:`pick_within_noise`), "rule", "accuracy": {scale: class accuracy}, "texture": {scale: mean
    texture fidelity}, "score": {scale: mean background_score}, "stderr": {scale: paired standard
    error against the best scale}, "samples", "seed", "seconds"}. ``exclude``: scene signatures to
    leave out (the training set's). ``progress(n)`` is called with the number of scenes finished by
    each sampler call.
    """
    import numpy as np
    import torch

    from layerdiff.settings import SamplerSettings

    cands = _check(candidates, batch, "background", "7.5, 10, 14, 20")
    items = fresh_items(samples, seed=seed, exclude=exclude)  # checks samples >= 3 (one per layer count)
    t0 = time.perf_counter()
    accuracy, texture, scores = {}, {}, {}
    for scale in cands:
        settings = SamplerSettings(background_cfg=scale, mask_guidance=0.0)
        right, tex = [], []
        for part in batches(items, batch):  # one sampler call holds one layer count
            latents = _sample_part(model, part, settings)
            with torch.no_grad():
                images = (model.decode_images(latents[:, 0, :4]) + 1) / 2  # backgrounds only
            images = images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            for img, it in zip(images, part):
                right.append(float(classify_background(img)[0] == it.spec.background))
                tex.append(texture_fidelity(img, it.spec.background))
            if progress is not None:
                progress(len(part))
        accuracy[scale], texture[scale] = float(np.mean(right)), float(np.mean(tex))
        scores[scale] = background_score(right, tex)
        logger.info("background guidance %g: background accuracy %.3f, texture %.3f (%d scenes)", scale,
                    accuracy[scale], texture[scale], len(items))
    pick, stderr = pick_within_noise(scores)
    return {"background_cfg": pick, "rule": "class + texture, one standard error",
            "accuracy": {str(c): round(a, 4) for c, a in accuracy.items()},
            "texture": {str(c): round(t, 4) for c, t in texture.items()},
            "score": {str(c): round(float(v.mean()), 4) for c, v in scores.items()},
            "stderr": {str(c): round(v, 4) for c, v in stderr.items()},
            "samples": len(items), "seed": seed, "seconds": round(time.perf_counter() - t0, 1)}


def foreground_score(metrics: dict) -> float:
    """The mean of foreground colour accuracy, shape accuracy and mask IoU: one number per candidate, or
    one per foreground when given per-foreground arrays (:func:`layerdiff.evaluation.metrics.metric_values`)."""
    return (metrics["colour_accuracy"] + metrics["shape_accuracy"] + metrics["mask_iou"]) / 3


def calibrate_foreground_guidance(
    model,
    candidates: Sequence[float] = FOREGROUND_CFG_CANDIDATES,
    samples: int = DEFAULT_SAMPLES,
    seed: int = CALIBRATION_SEED,
    batch: int = 8,
    exclude=frozenset(),
    background_cfg: float | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict:
    """Foreground quality of each candidate foreground guidance scale (``cfg``) on fresh toy scenes.

    Plain CFG; the background layer keeps ``background_cfg`` (None: the model's default). Returns
    {"cfg": the chosen scale (:func:`pick_within_noise`), "rule", "score": {scale: foreground_score},
    "stderr": {scale: paired standard error against the best scale}, "metrics": {scale:
    {colour_accuracy, shape_accuracy, mask_iou}}, "samples", "seed", "seconds"}.
    """
    from layerdiff.pipeline import decode_stack
    from layerdiff.settings import SamplerSettings

    cands = _check(candidates, batch, "foreground", "2, 3, 4.5, 7.5")
    items = fresh_items(samples, seed=seed, exclude=exclude)
    t0 = time.perf_counter()
    metrics, score, items_score = {}, {}, {}
    for scale in cands:
        settings = SamplerSettings(cfg=scale, background_cfg=background_cfg, mask_guidance=0.0)
        records = []
        for part in batches(items, batch):
            stack = decode_stack(model, _sample_part(model, part, settings), binarize=False)  # as eval decodes them
            records += judge_stack(stack, [it.spec for it in part])
            if progress is not None:
                progress(len(part))
        every = summarise(records)["all"]
        metrics[scale] = {m: every[m] for m in ("colour_accuracy", "shape_accuracy", "mask_iou")}
        score[scale] = foreground_score(metrics[scale])
        items_score[scale] = foreground_score(metric_values(records))  # per foreground, paired across scales
        logger.info("foreground guidance %g: colour %.3f, shape %.3f, mask IoU %.3f (%d scenes)", scale,
                    *metrics[scale].values(), len(items))
    pick, stderr = pick_within_noise(items_score)
    return {"cfg": pick, "rule": "one standard error", "score": {str(c): round(v, 4) for c, v in score.items()},
            "stderr": {str(c): round(v, 4) for c, v in stderr.items()},
            "metrics": {str(c): m for c, m in metrics.items()},
            "samples": len(items), "seed": seed, "seconds": round(time.perf_counter() - t0, 1)}


def calibrate_guidance(model, background_candidates: Sequence[float], foreground_candidates: Sequence[float],
                       samples: int = DEFAULT_SAMPLES, exclude=frozenset()) -> dict:
    """The background guidance, then (with it) the foregrounds' guidance; either list may be empty.

    Returns {"samples", "seed"} plus {"background_cfg", "accuracy"} and/or {"cfg", "foreground":
    calibrate_foreground_guidance's tables}: what :func:`write_calibrated` and the recipe record.
    """
    if not background_candidates and not foreground_candidates:
        raise LayerDiffError("no background or foreground guidance candidates: nothing to calibrate")
    result: dict = {"samples": samples, "seed": CALIBRATION_SEED, "rules": RULES}
    if background_candidates:
        res = calibrate_background_guidance(model, candidates=background_candidates, samples=samples, exclude=exclude)
        result.update(background_cfg=res["background_cfg"], accuracy=res["accuracy"],
                      background={k: res[k] for k in ("rule", "texture", "score", "stderr")})
        logger.warning("background guidance %g (class + texture by scale: %s; class accuracy: %s)",
                       res["background_cfg"], res["score"], res["accuracy"])
    if foreground_candidates:
        res = calibrate_foreground_guidance(model, candidates=foreground_candidates, samples=samples, exclude=exclude,
                                            background_cfg=result.get("background_cfg"))
        result["cfg"] = res.pop("cfg")
        result["foreground"] = res
        logger.warning("foreground guidance %g (colour + shape + mask IoU by scale: %s)", result["cfg"], res["score"])
    return result


def write_calibrated(src, dst, calibration: dict, overwrite: bool = False):
    """Copy the LayerDiff file ``src`` to ``dst`` with the calibrated guidance in its sampling defaults.

    ``calibration`` holds "background_cfg" and/or "cfg" (and whatever else it measured: it goes into
    the file's metadata as ``calibration``). The weights are copied unchanged, bit for bit; ``dst``
    is written atomically and an existing one only with ``overwrite``.
    """
    import json

    from layerdiff.io.files import read_safetensors, save_safetensors_atomic

    tensors, meta = read_safetensors(src)
    if "config" not in meta:
        raise LayerDiffError(f"{src} has no LayerDiff config in its metadata: give a LayerDiff .safetensors file")
    config = json.loads(meta["config"])
    sampling = dict(config.get("sampling") or {})
    sampling.update({k: float(calibration[k]) for k in ("background_cfg", "cfg") if k in calibration})
    config["sampling"] = sampling
    meta = {**meta, "config": json.dumps(config), "calibration": json.dumps(calibration)}
    return save_safetensors_atomic(tensors, dst, metadata=meta, overwrite=overwrite)


def _scales(text: str, flag: str) -> list[float]:
    if text.strip().lower() == "none":
        return []
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LayerDiffError(f"{flag} {text!r} is not a list of numbers: give e.g. 2,3,4.5 (or none)") from None
    if not out or any(not c > 0 for c in out):
        raise LayerDiffError(f"{flag} {text!r} must list guidance scales above 0, e.g. 2,3,4.5 (or none)")
    return out


def calibrate_command(args) -> int:
    """Run ``calibrate`` with parsed arguments: print the calibration as JSON and write the calibrated copy."""
    import json
    import sys

    bg = _scales(args.background_candidates, "--background-candidates")
    fg = _scales(args.foreground_candidates, "--foreground-candidates")
    if not bg and not fg:
        raise LayerDiffError("--background-candidates and --foreground-candidates are both none: nothing to calibrate")
    if args.samples < 3:
        raise LayerDiffError(f"--samples {args.samples} must be at least 3 (one scene per layer count)")
    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".safetensors":
        raise LayerDiffError(f"--out {out} must be a .safetensors file")
    if out.exists() and not args.overwrite:
        raise LayerDiffError(f"--out {out} exists: give another path, or --overwrite to replace it")
    import torch

    from layerdiff.io.checkpoint import BUILTIN_FILES, WEIGHTS_DIR, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    src = WEIGHTS_DIR / BUILTIN_FILES[args.model] if args.model in BUILTIN_FILES else Path(args.model)
    if not src.is_file():
        raise LayerDiffError(f"--model {args.model!r} is neither a built-in model file nor a file: give a LayerDiff "
                             ".safetensors path")
    model = load_model(str(src))
    exclude = (training_signatures(seed=args.exclude_train_seed, samples=args.exclude_train_samples)
               if args.exclude_train_samples else frozenset())
    result = calibrate_guidance(model, bg, fg, samples=args.samples, exclude=exclude)
    write_calibrated(src, out, result, overwrite=args.overwrite)
    print(json.dumps(result, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0
