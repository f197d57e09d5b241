"""``python -m layerdiff eval``: how well a model draws toy-world scenes it never saw in training.

The evaluation (METHOD.md sections 4 and 7, at toy scale):

1. **Fresh prompts.** Sample ``i`` draws its scene with :func:`layerdiff.data.toy.sample_prompt_spec`
   from its own RNG ``(seed, i)``; a scene whose *signature* (background and the ordered list of
   (size, colour, shape, position) of its objects) occurs in the training set is rejected and
   redrawn, as is one that the toy renderer could not lay out. The training set's specs are
   rebuilt exactly from the toy generator's ``(seed, index)`` streams without rendering pixels
   (:func:`training_signatures`), or read from the shards' JSON (:func:`data_signatures`).
   Layer counts are balanced: sample ``i`` has ``layers[i % len(layers)]`` layers.
2. **Generation.** The model's own sampler settings (steps, cfg, scheduler), at its image size,
   each sample with noise seed ``seed + i``, twice: plain classifier-free guidance (mask guidance
   0) and self-mask guidance (the model's default scale), on identical prompts and seeds.
3. **Judging** by :mod:`layerdiff.data.judge`, which knows only the toy renderer, never the model.
   A generated foreground mask is the decoded soft mask > 0.5, taken per layer (no front-first
   overlap resolution, so one layer's mask never depends on another's):

   - ``background_accuracy``: ``classify_background(layer 0)`` names the prompted background;
   - ``colour_accuracy``: the median colour of the layer image inside its generated mask is the
     prompted palette colour; ``shape_accuracy``: the generated mask's shape is the prompted one;
     ``size_accuracy`` and ``position_accuracy`` (objects with a named position only) likewise;
     this is what the composite shows: the layer's pixels through its mask;
   - ``mask_iou``: IoU of the generated mask with the object actually drawn in the layer image
     (``object_mask_from_layer``: the pixels away from the grey fill); an empty generated mask
     scores 0, not the 1.0 that two empty masks would give;
   - ``overlap_fraction``: composites in which two foreground masks overlap by more than
     :data:`OVERLAP_TOLERANCE` (1%) of the smaller mask's area (masks of the training data never
     touch); a 2-layer composite has one foreground and never overlaps;
   - ``empty_mask_rate``: foregrounds whose mask covers fewer than :func:`min_mask_area` pixels
     (these fail colour, shape, size and position);
   - ``scene_accuracy``: composites with the right background and every foreground's colour and
     shape right.

   Rates are means over composites (background, overlap, scene) or over foregrounds (the rest).
   ``smg_minus_cfg`` is SMG minus CFG per metric; ``smg_minus_cfg_stderr`` the standard error of
   that difference, paired over identical prompts and seeds.

The targets (for the trained built-in model, on >= 200 samples) are in :data:`TARGETS`;
``targets_met`` says which ones a run meets, per variant and layer count. "SMG at least as good as
CFG" is given both ``strict`` (no metric worse) and ``within_noise`` (no metric worse by more than
two paired standard errors); the overall ``all`` uses the SMG run, every layer count,
``within_noise`` and requires >= 200 samples.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from layerdiff.data import toy
from layerdiff.data.judge import (
    classify_background,
    classify_colour,
    classify_position,
    classify_shape,
    classify_size,
    mask_iou,
    object_mask_from_layer,
)
from layerdiff.data.toy import DEFAULT_POSITION_PROB, ToySpec, sample_prompt_spec
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.eval")

DEFAULT_SEED = 12345
DEFAULT_SAMPLES = 240
DEFAULT_BATCH = 8  # prompt sets per sampler call (8 x 3 layers is about the CPU's sweet spot)
DEFAULT_GRID_SAMPLES = 6
TRAIN_SEED = 0  # the built-in toy model's data: `python -m layerdiff data toy` seed 0 ...
TRAIN_SAMPLES = 5000  # ... samples 0..4999 (layerdiff.train_cli.TOY_RECIPE["samples"]) ...
TRAIN_SIZE = 128  # ... at 128 px (layouts, hence the rare redrawn scene, depend on the size)
MASK_THRESHOLD = 0.5
OVERLAP_TOLERANCE = 0.01  # overlap > 1% of the smaller mask's area = overlapping foregrounds
MAX_DRAWS = 1000  # draws per sample before the fresh-combination search gives up
_SPEC_SALT = 0x5EED_E7A1  # keeps evaluation scene streams apart from toy dataset streams (seed, i)
_PLACE_RESTARTS = 30  # layout tries before an evaluation scene counts as impossible (as render_from_spec)

# metric -> (direction, threshold); direction ">=" means higher is better
TARGETS: dict[str, tuple[str, float]] = {
    "background_accuracy": (">=", 0.90),
    "colour_accuracy": (">=", 0.90),
    "shape_accuracy": (">=", 0.80),
    "mask_iou": (">=", 0.85),
    "overlap_fraction": ("<=", 0.05),
}
TARGET_MIN_SAMPLES = 200
# every reported metric: (name, unit it averages over, higher is better)
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("background_accuracy", "composite", True),
    ("colour_accuracy", "foreground", True),
    ("shape_accuracy", "foreground", True),
    ("size_accuracy", "foreground", True),
    ("position_accuracy", "positioned foreground", True),
    ("mask_iou", "foreground", True),
    ("overlap_fraction", "composite", False),
    ("empty_mask_rate", "foreground", False),
    ("scene_accuracy", "composite", True),
)
VARIANTS = ("cfg", "smg")

__all__ = [
    "DEFAULT_SEED", "METRICS", "TARGETS", "EvalItem", "check_targets", "compare_variants", "data_signatures",
    "evaluate", "fresh_items", "judge_sample", "judge_stack", "mask_overlap", "min_mask_area", "parse_layers",
    "register", "run", "spec_signature", "summarise", "training_signatures",
]


# ---------------------------------------------------------------------------------------------
# fresh prompts


def spec_signature(spec: ToySpec) -> tuple:
    """(background, ((size, colour, shape, position), ...) back to front): what a scene's prompts say."""
    return spec.background, tuple((o.size, o.colour, o.shape, o.position) for o in spec.objects)


def _labels_signature(extra: dict) -> tuple:
    return extra["background"], tuple((o["size"], o["colour"], o["shape"], o.get("position")) for o in extra["objects"])


@lru_cache(maxsize=4)
def training_signatures(seed: int = TRAIN_SEED, samples: int = TRAIN_SAMPLES, size: int = TRAIN_SIZE,
                        position_prob: float = DEFAULT_POSITION_PROB) -> frozenset:
    """Signatures of toy dataset samples ``(seed, 0..samples-1)`` (default layer weights), exactly.

    Replays :func:`layerdiff.data.toy.render_sample` without rendering pixels: the scene drawn
    first is kept unless its layout fails (3 tries), in which case the scene is redrawn from the
    same stream. A single object always fits on the first try, so 2-layer scenes skip the layout.
    About 2 ms per 3- or 4-layer sample.
    """
    if seed < 0 or samples < 0:
        raise LayerDiffError(f"--exclude-train-seed {seed} and --exclude-train-samples {samples} must be 0 or more")
    t0 = time.perf_counter()
    counts, p = toy._normalise_layer_probs(None)
    out = set()
    for index in range(samples):
        rng = np.random.default_rng([seed, index])
        n = int(rng.choice(counts, p=p))
        for _ in range(50):
            spec = sample_prompt_spec(rng, num_layers=n, position_prob=position_prob)
            if n == 2 or any(toy._place(spec, size, rng) is not None for _ in range(3)):
                out.add(spec_signature(spec))
                break
    logger.info("training set (seed %d, %d samples): %d distinct scenes rebuilt in %.1f s", seed, samples, len(out),
                time.perf_counter() - t0)
    return frozenset(out)


def data_signatures(data_dir) -> frozenset:
    """Signatures of every toy sample in a folder of shards (reads only the samples' JSON)."""
    from layerdiff.data.format import list_shards, read_shard_meta

    shards = list_shards(data_dir)
    if not shards:
        raise LayerDiffError(f"--train-data {str(data_dir)!r} holds no .tar shards: give the folder the model trained on")
    out = set()
    for shard in shards:
        for meta in read_shard_meta(shard):
            extra = meta.get("extra") or {}
            if "background" not in extra or "objects" not in extra:
                raise LayerDiffError(f"--train-data: sample {meta.get('key')!r} in {shard.name} has no toy labels: "
                                     "give a folder of toy shards (`python -m layerdiff data toy`)")
            out.add(_labels_signature(extra))
    return frozenset(out)


@dataclass(frozen=True)
class EvalItem:
    """One evaluation sample: its index, noise seed (eval seed + index) and scene."""

    index: int
    seed: int
    spec: ToySpec

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers


def _placeable(spec: ToySpec, rng: np.random.Generator, size: int = TRAIN_SIZE) -> bool:
    return any(toy._place(spec, size, rng) is not None for _ in range(_PLACE_RESTARTS))


def fresh_items(samples: int, seed: int = DEFAULT_SEED, layers: Sequence[int] = (2, 3, 4),
                exclude: Iterable = frozenset(), position_prob: float = DEFAULT_POSITION_PROB,
                stats: dict | None = None) -> list[EvalItem]:
    """``samples`` scenes, none of whose signatures is in ``exclude``; item ``i`` depends only on
    ``(seed, i, layers)``: it has ``layers[i % len(layers)]`` layers and noise seed ``seed + i``.

    ``stats`` (a dict), if given, receives the number of draws rejected as seen in training and
    as impossible to lay out.
    """
    layers = list(layers)
    if not layers:
        raise LayerDiffError("no layer counts given: use --layers 2,3,4 (or a subset)")
    if samples < len(layers):
        raise LayerDiffError(
            f"--samples {samples} is fewer than the {len(layers)} layer counts in --layers "
            f"{','.join(map(str, layers))}: give at least {len(layers)} samples"
        )
    exclude = exclude if isinstance(exclude, (set, frozenset)) else frozenset(exclude)
    seen = unplaceable = 0
    items = []
    for i in range(samples):
        n = layers[i % len(layers)]
        rng = np.random.default_rng([seed, i, _SPEC_SALT])
        for _ in range(MAX_DRAWS):
            spec = sample_prompt_spec(rng, num_layers=n, position_prob=position_prob)
            if spec_signature(spec) in exclude:
                seen += 1
            elif not _placeable(spec, rng):
                unplaceable += 1
            else:
                break
        else:
            raise LayerDiffError(
                f"no fresh {n}-layer scene in {MAX_DRAWS} draws for sample {i}: the excluded training set covers "
                "nearly every combination; lower --exclude-train-samples or give fewer --layers"
            )
        items.append(EvalItem(i, seed + i, spec))
    if stats is not None:
        stats.update(rejected_seen_in_training=seen, rejected_unplaceable=unplaceable)
    return items


def parse_layers(text: str, max_layers: int = 4) -> tuple[int, ...]:
    """'2,3,4' -> (2, 3, 4): distinct layer counts of the toy world (2..4) that the model can make."""
    try:
        counts = [int(p) for p in (s.strip() for s in str(text).split(",")) if p]
    except ValueError:
        counts = []
    if not counts or len(set(counts)) != len(counts) or any(c not in (2, 3, 4) for c in counts):
        raise LayerDiffError(f"--layers {text!r} is not valid: list distinct layer counts from 2, 3, 4, like '2,3,4'")
    too_many = [c for c in counts if c > max_layers]
    if too_many:
        raise LayerDiffError(f"--layers {text!r}: this model generates at most {max_layers} layers; drop {too_many}")
    return tuple(counts)


# ---------------------------------------------------------------------------------------------
# judging


def min_mask_area(height: int, width: int) -> int:
    """Masks with fewer pixels than this count as empty: 0.1% of the image, at least 4 pixels."""
    return max(4, math.ceil(0.001 * height * width))


def mask_overlap(masks: np.ndarray) -> float:
    """Largest pairwise overlap of hard masks (K, H, W), as a fraction of the smaller mask's area
    (0 when fewer than two masks are non-empty)."""
    masks = np.asarray(masks, dtype=bool)
    areas = masks.reshape(len(masks), -1).sum(1)
    worst = 0.0
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            smaller = min(areas[a], areas[b])
            if smaller:
                worst = max(worst, float(np.logical_and(masks[a], masks[b]).sum() / smaller))
    return worst


def judge_sample(images: np.ndarray, masks: np.ndarray, spec: ToySpec) -> dict:
    """Judge one generated stack: images (L, H, W, 3) in 0..1, soft masks (L-1, H, W) in 0..1."""
    images, masks = np.asarray(images, dtype=np.float32), np.asarray(masks, dtype=np.float32)
    L = spec.num_layers
    if images.shape[0] != L or masks.shape[0] != L - 1:
        raise LayerDiffError(f"a stack of {images.shape[0]} layers and {masks.shape[0]} masks for a {L}-layer scene")
    hard = masks > MASK_THRESHOLD
    min_area = min_mask_area(*hard.shape[1:])
    background = classify_background(images[0])[0]
    layers = []
    for k, obj in enumerate(spec.objects):
        img, m = images[k + 1], hard[k]
        area = int(m.sum())
        empty = area < min_area
        colour = None if empty else classify_colour(img, m)
        shape = None if empty else classify_shape(m)
        size = None if empty else classify_size(m)
        positions = set() if empty else classify_position(m)
        drawn = object_mask_from_layer(img)
        layers.append({
            "colour": colour, "colour_ok": colour == obj.colour,
            "shape": shape, "shape_ok": shape == obj.shape,
            "size": size, "size_ok": size == obj.size,
            "position_ok": None if obj.position is None else obj.position in positions,
            "mask_iou": 0.0 if empty else mask_iou(m, drawn),
            "mask_area": area, "empty": empty,
        })
    overlap = mask_overlap(hard)
    return {
        "layers_count": L,
        "background": background, "background_ok": background == spec.background,
        "foregrounds": layers,
        "max_overlap": round(overlap, 4), "overlap": overlap > OVERLAP_TOLERANCE,
        "scene_ok": background == spec.background and all(f["colour_ok"] and f["shape_ok"] for f in layers),
    }


def judge_stack(stack, specs: Sequence[ToySpec]) -> list[dict]:
    """Judge every sample of a LayerStack (soft or hard masks) against its scene."""
    if stack.batch_size != len(specs):
        raise LayerDiffError(f"a batch of {stack.batch_size} stacks for {len(specs)} scenes: give one scene each")
    images = stack.images.float().cpu().numpy()
    masks = stack.masks.float().cpu().numpy()
    return [judge_sample(images[b], masks[b], spec) for b, spec in enumerate(specs)]


def _metric_values(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-item values of every metric, in record order (so two variants pair up item by item)."""
    fgs = [f for r in records for f in r["foregrounds"]]
    f = lambda key: np.array([float(x[key]) for x in fgs], dtype=np.float64)  # noqa: E731
    c = lambda key: np.array([float(r[key]) for r in records], dtype=np.float64)  # noqa: E731
    return {
        "background_accuracy": c("background_ok"),
        "colour_accuracy": f("colour_ok"),
        "shape_accuracy": f("shape_ok"),
        "size_accuracy": f("size_ok"),
        "position_accuracy": np.array([float(x["position_ok"]) for x in fgs if x["position_ok"] is not None]),
        "mask_iou": f("mask_iou"),
        "overlap_fraction": c("overlap"),
        "empty_mask_rate": f("empty"),
        "scene_accuracy": c("scene_ok"),
    }


def paired_stderr(d: np.ndarray) -> float | None:
    """Standard error of the mean of paired differences ``d`` (None for fewer than two pairs)."""
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None


def _groups(records: Sequence[dict]) -> dict[str, list[dict]]:
    counts = sorted({r["layers_count"] for r in records})
    out = {str(n): [r for r in records if r["layers_count"] == n] for n in counts}
    out["all"] = list(records)
    return out


def _mean(v: np.ndarray) -> float | None:
    return round(float(v.mean()), 4) if len(v) else None


def summarise(records: Sequence[dict]) -> dict[str, dict]:
    """{"2": {...}, "3": {...}, "4": {...}, "all": {...}}: every metric, plus sample counts."""
    out = {}
    for name, group in _groups(records).items():
        values = _metric_values(group)
        out[name] = {"samples": len(group), "foregrounds": sum(len(r["foregrounds"]) for r in group),
                     **{m: _mean(values[m]) for m, _, _ in METRICS}}
    return out


def compare_variants(cfg_records: Sequence[dict], smg_records: Sequence[dict]) -> tuple[dict, dict]:
    """(SMG minus CFG, its paired standard error) per layer count and metric; records pair by position."""
    if len(cfg_records) != len(smg_records):
        raise LayerDiffError(f"{len(cfg_records)} CFG and {len(smg_records)} SMG results: they must pair up")
    diff, stderr = {}, {}
    cfg_groups, smg_groups = _groups(cfg_records), _groups(smg_records)
    for name in cfg_groups:
        a, b = _metric_values(cfg_groups[name]), _metric_values(smg_groups[name])
        diff[name], stderr[name] = {}, {}
        for m, _, _ in METRICS:
            d = b[m] - a[m]
            diff[name][m] = _mean(d)
            se = paired_stderr(d)
            stderr[name][m] = round(se, 4) if se is not None else None
    return diff, stderr


def _meets(value: float | None, direction: str, threshold: float) -> bool:
    if value is None:
        return False
    return value >= threshold if direction == ">=" else value <= threshold


def check_targets(results: dict, diff: dict, stderr: dict, samples: int) -> dict:
    """Which targets a run meets: per variant and layer count, SMG vs CFG, and overall."""
    out: dict = {"targets": {m: f"{d} {t}" for m, (d, t) in TARGETS.items()}, "min_samples": TARGET_MIN_SAMPLES}
    for variant in VARIANTS:
        out[variant] = {}
        for group, summary in results[variant].items():
            met = {m: _meets(summary[m], d, t) for m, (d, t) in TARGETS.items()}
            out[variant][group] = {**met, "all": all(met.values())}
    strict, noise = {}, {}
    higher = {m: h for m, _, h in METRICS}
    for m in TARGETS:
        d, se = diff["all"][m], stderr["all"][m] or 0.0
        if d is None:
            strict[m] = noise[m] = True
            continue
        signed = d if higher[m] else -d  # > 0: SMG better
        strict[m] = signed >= 0
        noise[m] = signed >= -2 * se
    out["smg_at_least_as_good_as_cfg"] = {"strict": {**strict, "all": all(strict.values())},
                                          "within_noise": {**noise, "all": all(noise.values())}}
    out["enough_samples"] = samples >= TARGET_MIN_SAMPLES
    per_count = [v["all"] for g, v in out["smg"].items() if g != "all"]
    out["all"] = bool(all(per_count) and noise and all(noise.values()) and out["enough_samples"])
    return out


# ---------------------------------------------------------------------------------------------
# generation


def _batches(items: Sequence[EvalItem], batch: int) -> list[list[EvalItem]]:
    """Items grouped by layer count (one sampler call holds one count), in index order."""
    out = []
    for n in sorted({it.num_layers for it in items}):
        same = [it for it in items if it.num_layers == n]
        out.extend(same[s:s + batch] for s in range(0, len(same), batch))
    return out


def evaluate(model, items: Sequence[EvalItem], batch: int = DEFAULT_BATCH, steps: int | None = None,
             cfg: float | None = None, background_cfg: float | None = None, mask_guidance: float | None = None,
             scheduler: str | None = None, layout_cleanup: float | None = None,
             layout_cleanup_start: float | None = None, empty_layer_retries: int | None = None, keep: int = 0,
             progress: Callable[[int], object] | None = None) -> dict:
    """Generate every item with plain CFG and with SMG (same prompts and seeds) and judge them.

    Returns {"settings", "records": {"cfg": [...], "smg": [...]} (in item order), "kept": {"cfg":
    {index: LayerStack}, "smg": ...} for items with index < ``keep``, "timing"}. ``progress(n)`` is
    called with the number of samples finished by each sampler call.
    """
    import torch

    from layerdiff.config import SamplingDefaults
    from layerdiff.pipeline import LayerPrompts, check_size, decode_stack, encode_prompts, sampler_kwargs
    from layerdiff.sampling import sample

    if batch < 1:
        raise LayerDiffError(f"--batch {batch} must be at least 1")
    d = model.config.sampling
    smg_scale = d.mask_guidance if mask_guidance is None else float(mask_guidance)
    if mask_guidance is None and smg_scale <= 0:
        smg_scale = SamplingDefaults().mask_guidance
        logger.warning("the model's default mask guidance is 0: the SMG run uses %.2f", smg_scale)
    if smg_scale <= 0:
        raise LayerDiffError(f"--mask-guidance {mask_guidance} must be above 0: the SMG run compares it with plain CFG (0)")
    kwargs = {  # each variant's sampler arguments, resolved once
        v: sampler_kwargs(model, steps=steps, cfg=cfg, background_cfg=background_cfg, scheduler=scheduler,
                          mask_guidance=0.0 if v == "cfg" else smg_scale, layout_cleanup=layout_cleanup,
                          layout_cleanup_start=layout_cleanup_start, empty_layer_retries=empty_layer_retries)
        for v in VARIANTS
    }
    k = kwargs["smg"]
    settings = {
        "steps": int(k["steps"]),
        "cfg": float(k["cfg"]),
        "background_cfg": float(k["cfg"] if k["background_cfg"] is None else k["background_cfg"]),
        "scheduler": k["scheduler"],
        "eta": k["eta"],
        "mask_guidance": smg_scale,
        "mask_guidance_start": k["mask_guidance_start"],
        "mask_guidance_blur": k["mask_guidance_blur"],
        "mask_guidance_erode": k["mask_guidance_erode"],
        "layout_cleanup": float(k["layout_cleanup"]),
        "layout_cleanup_start": float(k["layout_cleanup_start"]),
        "empty_layer_retries": int(k["empty_layer_retries"]),
        "empty_layer_check": float(k["empty_layer_check"]),
        "image_size": model.config.image_size,
        "batch": batch,
    }
    size = model.config.image_size
    f = model.vae_scale_factor
    check_size(size, size, f)
    records: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    kept: dict[str, dict] = {v: {} for v in VARIANTS}
    timing = {"cfg_s": 0.0, "smg_s": 0.0, "judge_s": 0.0}
    for group in _batches(items, batch):
        prompts = [LayerPrompts(it.spec.global_prompt, tuple(it.spec.layer_prompts)) for it in group]
        cond = encode_prompts(model, prompts)
        seeds = [it.seed for it in group]
        for variant in VARIANTS:
            t0 = time.perf_counter()
            latents = sample(model.unet, cond, size // f, size // f, seeds, **kwargs[variant])
            stack = decode_stack(model, latents, binarize=False)  # soft masks: overlaps are measured on them
            t1 = time.perf_counter()
            timing[f"{variant}_s"] += t1 - t0
            for it, rec in zip(group, judge_stack(stack, [it.spec for it in group])):
                records[variant][it.index] = rec
            for b, it in enumerate(group):
                if it.index < keep:
                    kept[variant][it.index] = stack.select_batch([b])
            timing["judge_s"] += time.perf_counter() - t1
            if progress is not None:
                progress(len(group))
        logger.info("%d-layer batch of %d done (cfg %.0f s, smg %.0f s so far)", group[0].num_layers, len(group),
                    timing["cfg_s"], timing["smg_s"])
        del cond
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    order = [it.index for it in items]
    return {
        "settings": settings,
        "records": {v: [records[v][i] for i in order] for v in VARIANTS},
        "kept": kept,
        "timing": {k: round(v, 1) for k, v in timing.items()},
    }


def contact_sheet(items: Sequence[EvalItem], kept: dict) -> object:
    """PIL image: for each kept item, a CFG row and an SMG row (composite, layers, then masks)."""
    from PIL import Image

    from layerdiff.data.cli import contact_sheet as sheet
    from layerdiff.data.format import LayeredSample

    def pil(x, mode="RGB"):
        arr = np.clip(np.rint(x.numpy() * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode)

    rows = []
    for it in items:
        for variant in VARIANTS:
            stack = kept[variant].get(it.index)
            if stack is None:
                continue
            hard = stack.binarized()  # what the composite shows: front layer wins
            rows.append(LayeredSample(
                key=f"{variant}-{it.index:05d}", global_prompt=it.spec.global_prompt,
                layer_prompts=list(it.spec.layer_prompts), background=pil(hard.images[0, 0]),
                foregrounds=[pil(hard.images[0, k]) for k in range(1, hard.num_layers)],
                masks=[pil(hard.masks[0, k], "L") for k in range(hard.num_foregrounds)],
            ))
    return sheet(rows)


# ---------------------------------------------------------------------------------------------
# command line


def register(sub) -> None:
    from layerdiff.sampling import SCHEDULERS

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
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--background-cfg", type=float, default=None,
                   help="guidance scale of the background layer (default: the model's, else --cfg)")
    p.add_argument("--mask-guidance", type=float, default=None,
                   help="self-mask guidance scale of the SMG run, above 0 (default: the model's)")
    p.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="sampler (default: the model's)")
    p.add_argument("--layout-cleanup", type=float, default=None,
                   help="layout cleanup strength 0..1 in both runs, 0 off (default: the model's)")
    p.add_argument("--layout-cleanup-start", type=float, default=None,
                   help="fraction of steps before layout cleanup switches on (default: the model's)")
    p.add_argument("--empty-layer-retries", type=int, default=None,
                   help="times a foreground still empty early in sampling gets new noise, in both runs; 0 off "
                        "(default: the model's)")
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


def _check_output(path: Path | None, flag: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise LayerDiffError(f"{flag} {path} is a folder: give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LayerDiffError(f"{flag} {path}: folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise LayerDiffError(f"{flag} {path}: folder {parent} is not writable; choose another path")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _details(items: Sequence[EvalItem], records: dict) -> list[dict]:
    return [{"index": it.index, "seed": it.seed, "global_prompt": it.spec.global_prompt, "spec": it.spec.to_dict(),
             **{v: records[v][n] for v in VARIANTS}} for n, it in enumerate(items)]


def run(args) -> int:
    t_start = time.perf_counter()
    for flag, value, low in (("--samples", args.samples, 1), ("--batch", args.batch, 1), ("--threads", args.threads, 1),
                             ("--grid-samples", args.grid_samples, 0), ("--steps", args.steps, 1)):
        if value is not None and value < low:
            raise LayerDiffError(f"{flag} {value} must be at least {low}")
    if args.mask_guidance is not None and args.mask_guidance <= 0:
        raise LayerDiffError(f"--mask-guidance {args.mask_guidance} must be above 0: the SMG run compares it with "
                             "plain CFG (mask guidance 0)")
    for flag, value in (("--layout-cleanup", args.layout_cleanup), ("--layout-cleanup-start", args.layout_cleanup_start)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise LayerDiffError(f"{flag} {value} must be within 0..1")
    if args.empty_layer_retries is not None and args.empty_layer_retries < 0:
        raise LayerDiffError(f"--empty-layer-retries {args.empty_layer_retries} must be 0 or more (0 disables it)")
    layers = parse_layers(args.layers)
    if args.samples < len(layers):
        raise LayerDiffError(f"--samples {args.samples} is fewer than the {len(layers)} layer counts in --layers "
                             f"{args.layers}: give at least {len(layers)} samples")
    _check_output(args.out, "--out")
    _check_output(args.grid, "--grid")
    if args.train_data is not None and not Path(args.train_data).is_dir():
        raise LayerDiffError(f"--train-data {str(args.train_data)!r} is not a folder: give the folder of toy shards")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise LayerDiffError(f"--device {args.device}: CUDA is not available here; use --device cpu")

    from layerdiff.io.checkpoint import DEFAULT_MODEL, load_model

    model = load_model(args.model, device=args.device)
    layers = parse_layers(args.layers, model.max_layers)

    t0 = time.perf_counter()
    if args.train_data is not None:
        exclude = data_signatures(args.train_data)
        exclusion = {"train_data": str(args.train_data)}
    else:
        exclude = training_signatures(args.exclude_train_seed, args.exclude_train_samples)
        exclusion = {"train_seed": args.exclude_train_seed, "train_samples": args.exclude_train_samples,
                     "train_size": TRAIN_SIZE}
    stats: dict = {}
    items = fresh_items(args.samples, args.seed, layers, exclude, stats=stats)
    exclusion.update(excluded_scenes=len(exclude), **stats,
                     distinct_eval_scenes=len({spec_signature(it.spec) for it in items}))
    t_specs = time.perf_counter() - t0

    from tqdm.auto import tqdm

    keep = args.grid_samples if args.grid is not None else 0
    with tqdm(total=2 * len(items), desc="eval", unit="sample", file=sys.stderr, disable=None,
              mininterval=1.0) as bar:
        result = evaluate(model, items, batch=args.batch, steps=args.steps, cfg=args.cfg, background_cfg=args.background_cfg,
                          mask_guidance=args.mask_guidance, scheduler=args.scheduler,
                          layout_cleanup=args.layout_cleanup, layout_cleanup_start=args.layout_cleanup_start,
                          empty_layer_retries=args.empty_layer_retries, keep=keep, progress=bar.update)
    records = result["records"]
    results = {v: summarise(records[v]) for v in VARIANTS}
    diff, stderr = compare_variants(records["cfg"], records["smg"])
    report = {
        "model": model.source or str(args.model or DEFAULT_MODEL),
        "samples": len(items),
        "seed": args.seed,
        "settings": {
            **result["settings"], "layers": list(layers), "device": str(args.device),
            "threads": torch.get_num_threads(), "mask_threshold": MASK_THRESHOLD,
            "overlap_tolerance": OVERLAP_TOLERANCE, "generator": toy.GENERATOR_VERSION, "exclusion": exclusion,
            "torch": torch.__version__,
        },
        "cfg": results["cfg"],
        "smg": results["smg"],
        "smg_minus_cfg": diff,
        "smg_minus_cfg_stderr": stderr,
        "targets_met": check_targets(results, diff, stderr, len(items)),
        "timing": {"scenes_s": round(t_specs, 1), **result["timing"]},
    }
    if args.grid is not None and keep:
        _write_atomic(args.grid, _png_bytes(contact_sheet(items[:keep], result["kept"])))
    if args.details:
        report["per_sample"] = _details(items, records)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(report, indent=2) + "\n"
    if args.out is not None:
        _write_atomic(args.out, text.encode("utf-8"))
    sys.stdout.write(text)
    return 0


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
