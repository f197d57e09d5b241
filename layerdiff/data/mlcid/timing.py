"""Seconds and items per step of an MLCID build, for the summary's throughput table.

Steps are the build's own (``hash``, ``load``, ``pipeline``, ``write``) and, inside ``pipeline``,
the model stages, timed by wrapping each stage object of a pipeline while it runs (the stage
classes stay as they are). Items are images, except for the captioner, which counts every image
it captions (photos, backgrounds and, with ``--layer-prompts caption``, object crops).

Seconds are busy time summed over every process that did the step: with several Ray workers a
step's items per second is per worker, and the build's wall-clock rate is reported beside it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

# stage slot of :class:`layerdiff.data.mlcid.pipeline.Stages` -> the method the pipeline calls on it
TIMED_METHODS = {
    "captioner": "caption",
    "detector": "detect",
    "segmenter": "segment",
    "depth": "object_depths",
    "inpainter": "inpaint",
}
STEP_ORDER = ("hash", "load", "pipeline", *TIMED_METHODS, "write")


class StepClock:
    """Accumulated ``seconds`` and ``items`` per step name."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.items: Counter = Counter()

    def add(self, step: str, seconds: float, items: int = 0) -> None:
        self.seconds[step] += seconds
        self.items[step] += items

    def merge(self, seconds: dict, items: dict) -> None:
        self.seconds.update({k: float(v) for k, v in seconds.items()})
        self.items.update({k: int(v) for k, v in items.items()})

    @contextmanager
    def step(self, name: str, items: int = 0) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start, items)

    @contextmanager
    def timing_stages(self, pipe) -> Iterator[StepClock]:
        """Time every model stage of ``pipe`` (an MLCIDPipeline) while inside the block."""
        saved = {slot: getattr(pipe.stages, slot) for slot in TIMED_METHODS}
        try:
            for slot, stage in saved.items():
                if stage is not None:
                    setattr(pipe.stages, slot, _TimedStage(stage, slot, TIMED_METHODS[slot], self))
            yield self
        finally:
            for slot, stage in saved.items():
                setattr(pipe.stages, slot, stage)

    def to_json(self) -> dict:
        """{step: {"items", "seconds", "items_per_s"}} in build order, steps never timed left out."""
        steps = set(self.seconds) | set(self.items)
        out = {}
        for step in [s for s in STEP_ORDER if s in steps] + sorted(steps - set(STEP_ORDER)):
            s, n = self.seconds[step], self.items[step]
            out[step] = {"items": n, "seconds": round(s, 3), "items_per_s": round(n / s, 3) if s > 0 and n else None}
        return out


class _TimedStage:
    """A stage whose pipeline-facing method adds its seconds to a clock; everything else (name,
    model_id, other methods) is the wrapped stage's."""

    def __init__(self, stage, slot: str, method: str, clock: StepClock):
        self._stage = stage
        inner = getattr(stage, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                images = args[0] if args else None
                count = len(images) if slot == "captioner" and hasattr(images, "__len__") else 1
                clock.add(slot, time.perf_counter() - start, count)

        setattr(self, method, timed)

    def __getattr__(self, name):
        return getattr(self._stage, name)
