"""One source image -> one layered sample (METHOD.md section 6), with the stages of ``stages.py``.

caption -> phrases -> detection -> box-prompted masks (clipped to their boxes) -> filters ->
depth order (back to front) -> front layer wins any small overlap -> background = image with the
dilated foregrounds inpainted -> prompts.

Where prompts and phrases come from (**choice**, documented in the README of the builder CLI):

- global prompt: the sidecar's ``caption``, else the captioner's caption, else
  "a photo of A, B and C" from the kept layers' phrases;
- phrases to detect: the sidecar's ``phrases`` (or its ``.txt``), else ``--phrases``, else the
  phrases of the caption (``RulePhraseExtractor``);
- boxes: the sidecar's ``objects`` (phrase + box) when given, which wins over the detector;
- layer prompts: the phrase, or with ``layer_prompts="caption"`` a caption of the object's crop;
- background prompt: the sidecar's ``background_prompt``, else a caption of the inpainted
  background, else "background".
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from layerdiff.data.format import GREY, LayeredSample
from layerdiff.data.mlcid import filters as F
from layerdiff.data.mlcid.classical import dilate
from layerdiff.data.mlcid.phrases import RulePhraseExtractor
from layerdiff.data.mlcid.stages import (
    Captioner,
    DepthEstimator,
    Detection,
    Detector,
    Inpainter,
    PhraseExtractor,
    Segmenter,
)
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data.mlcid")

PIPELINE_VERSION = "mlcid-v1"

# why an image gives no sample (the summary counts them by these names)
NO_PHRASES = "no_phrases"
NO_DETECTIONS = "no_detections"
NO_FOREGROUNDS = "no_foregrounds"  # every detection was filtered out
ERROR = "error"  # a stage raised on this image (logged with its traceback)
KEPT = "kept"

MAX_DETECTIONS = 20  # boxes segmented per image at most (sidecar boxes: all of them)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything but the stages that changes the output (part of the resume fingerprint)."""

    filters: F.FilterConfig = field(default_factory=F.FilterConfig)
    phrases: tuple[str, ...] = ()  # fixed phrases to detect, instead of the caption's
    layer_prompts: str = "phrase"  # "phrase" | "caption" (a caption of the object's crop)
    dilate: float = 0.02  # grow the foregrounds by this fraction of the longer side before inpainting
    nms_iou: float = 0.5  # box IoU above which detections of any phrase are merged

    def __post_init__(self):
        if self.layer_prompts not in ("phrase", "caption"):
            raise LayerDiffError(f"--layer-prompts {self.layer_prompts!r} is unknown: use 'phrase' or 'caption'")
        if not 0.0 <= self.dilate <= 0.5:
            raise LayerDiffError(f"--dilate {self.dilate} must be a fraction of the image side in 0..0.5, e.g. 0.02")


@dataclass
class Sidecar:
    """Per-image annotations read from ``IMAGE.json`` / ``IMAGE.txt`` beside the image."""

    caption: str | None = None
    phrases: list[str] = field(default_factory=list)
    objects: list[Detection] = field(default_factory=list)  # boxes given by the user: no detector
    background_prompt: str | None = None


@dataclass
class Stages:
    """The swappable parts; ``captioner`` and ``detector`` may be None (see the module doc)."""

    segmenter: Segmenter
    depth: DepthEstimator
    inpainter: Inpainter
    captioner: Captioner | None = None
    detector: Detector | None = None
    phrase_extractor: PhraseExtractor = field(default_factory=RulePhraseExtractor)

    def describe(self) -> dict[str, str]:
        """Name, model and output-changing settings (``fingerprint_params``) of each stage: what
        the resume fingerprint compares."""
        out = {}
        for slot in ("captioner", "phrase_extractor", "detector", "segmenter", "depth", "inpainter"):
            stage = getattr(self, slot)
            if stage is None:
                out[slot] = "none"
                continue
            text = f"{stage.name}:{getattr(stage, 'model_id', '')}".rstrip(":")
            params = {k: getattr(stage, k, None) for k in getattr(stage, "fingerprint_params", ())}
            out[slot] = f"{text} {json.dumps(params, sort_keys=True, default=str)}" if params else text
        return out


@dataclass
class Outcome:
    """What became of one image: ``status`` is KEPT (with ``sample``) or the reason it was dropped."""

    status: str
    sample: LayeredSample | None = None
    dropped: Counter = field(default_factory=Counter)  # detection-level filter reasons


@dataclass
class _Layers:
    """Intermediate result of one image before the prompts (captions run batched across images)."""

    key: str
    source: str
    image: Image.Image
    caption: str | None
    phrases_from: str
    detections: list[Detection]  # back to front
    masks: list[np.ndarray]  # back to front, non-overlapping, (H, W) bool
    depths: list[float]
    background: Image.Image
    background_prompt: str | None
    dropped: Counter


def join_phrases(phrases: Sequence[str]) -> str:
    """["cat", "dog", "ball"] -> "cat, dog and ball"."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


class MLCIDPipeline:
    """Runs the stages on batches of images; never raises for one bad image (it is counted)."""

    def __init__(self, stages: Stages, config: PipelineConfig | None = None):
        self.stages = stages
        self.config = config or PipelineConfig()
        settings = {"version": PIPELINE_VERSION, "stages": stages.describe(), "config": asdict(self.config)}
        blob = json.dumps(settings, sort_keys=True, default=str).encode()
        self._fingerprint = (hashlib.sha256(blob).hexdigest()[:16], settings)

    def fingerprint(self) -> tuple[str, dict]:
        """(short hash, settings) of everything that changes the output; devices and batch sizes excluded."""
        return self._fingerprint

    def process(self, items: Sequence[tuple[str, str, Image.Image, Sidecar]]) -> list[Outcome]:
        """``items`` = (key, source, RGB image, sidecar) -> one :class:`Outcome` each, in order."""
        captions = self._captions(items)
        partial: list[_Layers | Outcome] = []
        for (key, source, image, sidecar), caption in zip(items, captions):
            try:
                partial.append(self._layers(key, source, image, sidecar, caption))
            except LayerDiffError:  # a setup problem (missing package, bad setting): stop the run
                raise
            except Exception:  # one image's failure must not stop the run
                logger.exception("MLCID: image %s failed; skipped", source)
                partial.append(Outcome(ERROR))
        return self._finish(partial)

    # -- stages ---------------------------------------------------------------------------------

    def _captions(self, items) -> list[str | None]:
        out: list[str | None] = [sc.caption for _, _, _, sc in items]
        todo = [i for i, c in enumerate(out) if c is None]
        if self.stages.captioner is not None and todo:
            for i, cap in zip(todo, self._caption_images([items[i][2] for i in todo])):
                out[i] = cap
        return out

    def _caption_images(self, images: list[Image.Image]) -> list[str | None]:
        """Batched; if the batch fails, image by image, so one bad image costs only its caption."""
        try:
            return list(self.stages.captioner.caption(images))
        except LayerDiffError:
            raise
        except Exception:
            if len(images) == 1:
                logger.exception("MLCID: captioner failed on one image")
                return [None]
            return [c for img in images for c in self._caption_images([img])]

    def _layers(self, key: str, source: str, image: Image.Image, sidecar: Sidecar, caption: str | None):
        cfg, st = self.config, self.stages
        w, h = image.size
        if sidecar.objects:
            detections, phrases_from = list(sidecar.objects), "sidecar_boxes"
        else:
            if sidecar.phrases:
                phrases, phrases_from = sidecar.phrases, "sidecar"
            elif cfg.phrases:
                phrases, phrases_from = list(cfg.phrases), "fixed"
            elif caption:
                phrases, phrases_from = st.phrase_extractor.phrases(caption), "caption"
            else:
                phrases, phrases_from = [], "none"
            if not phrases:
                return Outcome(NO_PHRASES)
            if st.detector is None:
                return Outcome(NO_DETECTIONS)  # no detector and no sidecar boxes
            detections = st.detector.detect(image, phrases)
        detections = [Detection(F.clip_box(d.box, w, h), float(d.score), d.phrase) for d in detections]
        detections = F.box_nms(detections, cfg.nms_iou, max_detections=max(MAX_DETECTIONS, len(sidecar.objects)))
        if not detections:
            return Outcome(NO_DETECTIONS)
        # a mask lies inside its box: boxes under min_area can never pass, so skip segmenting them
        min_pixels = cfg.filters.min_area * w * h
        big_enough = [(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) >= min_pixels for d in detections]
        dropped = Counter({F.TOO_SMALL: big_enough.count(False)}) if not all(big_enough) else Counter()
        detections = [d for d, ok in zip(detections, big_enough) if ok]
        if not detections:
            return Outcome(NO_FOREGROUNDS, dropped=dropped)

        boxes = [d.box for d in detections]
        masks = F.clip_masks_to_boxes(st.segmenter.segment(image, boxes), boxes)  # (H, W) bool each
        result = F.filter_detections(masks, [d.score for d in detections], cfg.filters)
        dropped.update(result.rejected.values())
        if not result.kept:
            return Outcome(NO_FOREGROUNDS, dropped=dropped)

        kept = result.kept
        depths = st.depth.object_depths(image, [masks[i] for i in kept], [boxes[i] for i in kept])
        order = [kept[j] for j in F.order_back_to_front(depths, [boxes[i] for i in kept])]
        depth_of = dict(zip(kept, depths))
        ordered = F.resolve_overlaps([masks[i] for i in order])
        final = [(i, m) for i, m in zip(order, ordered) if m.sum() >= max(min_pixels, 1)]
        dropped[F.OCCLUDED] += len(order) - len(final)
        if not final:
            return Outcome(NO_FOREGROUNDS, dropped=+dropped)

        union = np.logical_or.reduce([m for _, m in final])
        hole = dilate(union, cfg.dilate * max(w, h))
        background = st.inpainter.inpaint(image, hole)
        return _Layers(
            key=key,
            source=source,
            image=image,
            caption=caption,
            phrases_from=phrases_from,
            detections=[detections[i] for i, _ in final],
            masks=[m for _, m in final],
            depths=[depth_of[i] for i, _ in final],
            background=background.convert("RGB"),
            background_prompt=sidecar.background_prompt,
            dropped=+dropped,
        )

    def _finish(self, partial: list) -> list[Outcome]:
        layers = [p for p in partial if isinstance(p, _Layers)]
        bg_prompts: dict[str, str | None] = {p.key: p.background_prompt for p in layers}
        crop_prompts: dict[tuple[str, int], str | None] = {}
        if self.stages.captioner is not None and layers:
            todo = [p for p in layers if p.background_prompt is None]
            for p, cap in zip(todo, self._caption_images([p.background for p in todo])):
                bg_prompts[p.key] = cap
            if self.config.layer_prompts == "caption":
                crops = [(p.key, k, _crop(p.image, m, d.box)) for p in layers for k, (m, d) in enumerate(zip(p.masks, p.detections))]
                for (key, k, _), cap in zip(crops, self._caption_images([c for _, _, c in crops])):
                    crop_prompts[(key, k)] = cap
        out = []
        for p in partial:
            if not isinstance(p, _Layers):
                out.append(p)
                continue
            try:
                out.append(Outcome(KEPT, self._sample(p, bg_prompts[p.key], crop_prompts), p.dropped))
            except Exception:
                logger.exception("MLCID: image %s failed while writing its sample; skipped", p.source)
                out.append(Outcome(ERROR))
        return out

    def _sample(self, p: _Layers, bg_prompt: str | None, crop_prompts: dict) -> LayeredSample:
        w, h = p.image.size
        rgb = np.asarray(p.image.convert("RGB"))  # (H, W, 3)
        phrases = [d.phrase for d in p.detections]
        fg_prompts = [crop_prompts.get((p.key, k)) or ph for k, ph in enumerate(phrases)]
        global_prompt = p.caption or f"a photo of {join_phrases(phrases)}"
        foregrounds = [Image.fromarray(np.where(m[..., None], rgb, np.array(GREY, np.uint8)), "RGB") for m in p.masks]
        masks = [Image.fromarray(m.astype(np.uint8) * 255, "L") for m in p.masks]
        extra = {
            "mlcid": {
                "version": PIPELINE_VERSION,
                "settings": self.fingerprint()[0],
                "caption": p.caption,
                "phrases_from": p.phrases_from,
            },
            "phrases": phrases,  # back to front, like the layers
            "boxes": [[round(v, 2) for v in d.box] for d in p.detections],
            "scores": [round(float(d.score), 4) for d in p.detections],
            "depths": [round(float(v), 4) if np.isfinite(v) else None for v in p.depths],
            "areas": [round(float(m.sum()) / (w * h), 4) for m in p.masks],
            "dropped": dict(p.dropped),
        }
        return LayeredSample(
            key=p.key,
            global_prompt=global_prompt,
            layer_prompts=[bg_prompt or "background", *fg_prompts],
            background=p.background,
            foregrounds=foregrounds,
            masks=masks,
            source=p.source,
            extra=extra,
        )


def _crop(image: Image.Image, mask: np.ndarray, box) -> Image.Image:
    """The object on grey, cropped to its box: what a layer-prompt captioner sees."""
    rgb = np.where(mask[..., None], np.asarray(image.convert("RGB")), np.array(GREY, np.uint8))
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return Image.fromarray(rgb.astype(np.uint8), "RGB").crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
