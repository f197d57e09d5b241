"""Evaluation scenes: fresh toy-world prompts that the model never saw in training.

Sample ``i`` draws its scene with :func:`layerdiff.data.toy.sample_prompt_spec` from its own RNG
``(seed, i)``; a scene whose *signature* (background and the ordered list of (size, colour, shape,
position) of its objects) occurs in the training set is rejected and redrawn, as is one that the
toy renderer could not lay out. The training set's specs are rebuilt exactly from the toy
generator's ``(seed, index)`` streams without rendering pixels (:func:`training_signatures`), or
read from the shards' JSON (:func:`data_signatures`). Layer counts are balanced: sample ``i`` has
``layers[i % len(layers)]`` layers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from layerdiff.data import toy
from layerdiff.data.toy import DEFAULT_POSITION_PROB, ToySpec, sample_prompt_spec
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.eval")

DEFAULT_SEED = 12345
DEFAULT_SAMPLES = 240
TRAIN_SEED = 0  # the built-in toy model's data: `python -m layerdiff data toy` seed 0 ...
TRAIN_SAMPLES = 5000  # ... samples 0..4999 (layerdiff.training.recipes.TOY_RECIPE["samples"]) ...
TRAIN_SIZE = 128  # ... at 128 px (layouts, hence the rare redrawn scene, depend on the size)
MAX_DRAWS = 1000  # draws per sample before the fresh-combination search gives up
_SPEC_SALT = 0x5EED_E7A1  # keeps evaluation scene streams apart from toy dataset streams (seed, i)
_PLACE_RESTARTS = 30  # layout tries before an evaluation scene counts as impossible (as render_from_spec)

__all__ = [
    "DEFAULT_SAMPLES", "DEFAULT_SEED", "MAX_DRAWS", "TRAIN_SAMPLES", "TRAIN_SEED", "TRAIN_SIZE", "EvalItem",
    "batches", "data_signatures", "fresh_items", "parse_layers", "spec_signature", "training_signatures",
]


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


def batches(items: Sequence[EvalItem], batch: int) -> list[list[EvalItem]]:
    """Items grouped by layer count (one sampler call holds one count), in index order."""
    out = []
    for n in sorted({it.num_layers for it in items}):
        same = [it for it in items if it.num_layers == n]
        out.extend(same[s:s + batch] for s in range(0, len(same), batch))
    return out
