"""Stage specs (a model id or folder, "fallback" or "none") -> stage objects.

Defaults are the open models closest to the paper's (METHOD.md section 6). They are looked up in
local folders or the Hugging Face cache only; ``allow_download=True`` lets them be fetched.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from layerdiff.errors import LayerDiffError

if TYPE_CHECKING:
    from layerdiff.data.mlcid.pipeline import Stages

logger = logging.getLogger("layerdiff.data.mlcid")

DEFAULT_MODELS = {
    "captioner": "Salesforce/blip-image-captioning-large",
    "detector": "google/owlv2-base-patch16-ensemble",
    "segmenter": "facebook/sam-vit-base",
    "depth": "depth-anything/Depth-Anything-V2-Small-hf",
    "inpainter": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}
FALLBACK_WORDS = ("fallback", "classical")
NONE_WORDS = ("none", "off")
# what "fallback" and "none" mean per stage (None = not allowed)
FALLBACKS = {
    "captioner": ("none", "none"),  # no classical captioner: prompts from sidecars / phrases
    "detector": ("saliency", "none"),  # "none": only sidecar boxes
    "segmenter": ("classical", None),
    "depth": ("box_bottom", "box_bottom"),
    "inpainter": ("classical", None),
}


@dataclass(frozen=True)
class StageSpecs:
    captioner: str = DEFAULT_MODELS["captioner"]
    detector: str = DEFAULT_MODELS["detector"]
    segmenter: str = DEFAULT_MODELS["segmenter"]
    depth: str = DEFAULT_MODELS["depth"]
    inpainter: str = DEFAULT_MODELS["inpainter"]

    @classmethod
    def all_fallbacks(cls) -> StageSpecs:
        return cls(*(["fallback"] * 5))


@dataclass(frozen=True)
class StageOptions:
    """Run-time options of the model stages (not part of the resume fingerprint except thresholds)."""

    device: str = "auto"
    dtype: str = "auto"
    allow_download: bool = False
    batch_size: int = 8
    detector_threshold: float = 0.2
    max_detections: int = 20
    nms_iou: float = 0.5
    inpaint_steps: int = 25
    inpaint_resolution: int = 512
    seed: int = 0
    classical_backend: str | None = None  # "cv2" | "skimage" | None (whichever is installed)

    def __post_init__(self):
        _in_range("--batch-size", self.batch_size, 1, 1024)
        _in_range("--detector-threshold", self.detector_threshold, 0.0, 1.0, "a score, e.g. 0.2")
        _in_range("--max-detections", self.max_detections, 1, 1000)
        _in_range("nms_iou", self.nms_iou, 0.0, 1.0)
        _in_range("--inpaint-steps", self.inpaint_steps, 1, 1000, "e.g. 25")
        _in_range("--inpaint-resolution", self.inpaint_resolution, 64, 4096, "e.g. 512")
        if self.inpaint_resolution % 8:
            raise LayerDiffError(f"--inpaint-resolution {self.inpaint_resolution} is not a multiple of 8: use e.g. 512")
        _in_range("--seed", self.seed, 0, 2**32 - 1)
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d{1,3})?", self.device):
            raise LayerDiffError(f"--device {self.device!r} is not a device: use auto, cpu, cuda, cuda:1, mps or xpu")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise LayerDiffError(f"--dtype {self.dtype!r} is unknown: use auto, float32, float16 or bfloat16")


def _in_range(flag: str, value, lo, hi, example: str = "") -> None:
    """Refuse a number of the wrong type, NaN, or outside ``lo``..``hi``, naming the flag and the range."""
    want = int if isinstance(lo, int) else (int, float)
    ok = isinstance(value, want) and not isinstance(value, bool) and lo <= value <= hi  # NaN fails the comparison
    if not ok:
        kind = "an integer" if want is int else "a number"
        raise LayerDiffError(f"{flag} {value!r} must be {kind} from {lo} to {hi}" + (f" ({example})" if example else ""))


def _kind(stage: str, spec: str) -> str:
    """"model", or the fallback/none implementation name for ``spec``."""
    word = spec.strip().lower()
    fallback, none = FALLBACKS[stage]
    if word in FALLBACK_WORDS:
        return fallback
    if word in NONE_WORDS:
        if none is None:
            raise LayerDiffError(f"--{stage} none: the {stage} cannot be left out: give a model id or folder, or 'fallback'")
        return none
    if not word:
        raise LayerDiffError(f"--{stage} is empty: give a model id or folder, 'fallback' or 'none'")
    return "model"


def looks_local(model_id: str) -> bool:
    """Whether a stage's model spec names a folder rather than a Hugging Face id."""
    return model_id.startswith((".", "/", "~")) or Path(model_id).exists() or model_id.count("/") > 1


# files whose presence in the Hugging Face cache says a model was downloaded (transformers models
# have a config.json, diffusers pipelines such as SD inpainting a model_index.json)
_CACHE_MARKERS = ("config.json", "model_index.json")


def model_available(model_id: str, allow_download: bool = False) -> bool:
    """Whether ``model_id`` can load without a download: an existing folder, or a Hugging Face id
    that is in the local cache (or may be downloaded)."""
    if looks_local(model_id):
        return Path(model_id).expanduser().exists()
    if allow_download:
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # no hub library: loading says what to install
        return True
    try:
        return any(isinstance(try_to_load_from_cache(model_id, name), str) for name in _CACHE_MARKERS)
    except ValueError:  # not a valid repo id: the loader names the problem
        return True


def missing_models(specs: StageSpecs, options: StageOptions | None = None) -> list[tuple[str, str]]:
    """(stage, model spec) of every model stage whose model is neither a local folder nor cached."""
    o = options or StageOptions()
    return [(stage, getattr(specs, stage)) for stage in FALLBACKS
            if _kind(stage, getattr(specs, stage)) == "model" and not model_available(getattr(specs, stage),
                                                                                     o.allow_download)]


def model_stages(specs: StageSpecs) -> list[str]:
    """The stages of ``specs`` that load a model (not "fallback" nor "none")."""
    return [stage for stage in FALLBACKS if _kind(stage, getattr(specs, stage)) == "model"]


FALLBACK_CHOICES = ("none", "classical")  # --fallback: what a stage whose model is missing does


def with_fallbacks(specs: StageSpecs, options: StageOptions | None = None, fallback: str = "none") -> StageSpecs:
    """``specs`` with every missing model checked at once: one error listing them all and the ways
    out (``fallback="none"``), or each missing stage replaced by its classical version (``"classical"``,
    logged)."""
    if fallback not in FALLBACK_CHOICES:
        raise LayerDiffError(f"--fallback {fallback!r} is unknown: use 'none' (a missing model is an error) or "
                             "'classical' (a missing model's stage uses its classical version)")
    missing = missing_models(specs, options)
    if not missing:
        return specs
    listed = ", ".join(f"--{stage} {spec!r}" for stage, spec in missing)
    if fallback == "none":
        raise LayerDiffError(
            f"{len(missing)} stage model(s) not found in local folders or the Hugging Face cache: {listed}. Put "
            "them in the cache (huggingface-cli download ID) or pass local folders (--STAGE PATH), add "
            "--allow-download to fetch them, or add --fallback classical to run each missing stage's classical "
            "version (saliency boxes, GrabCut, box-bottom depth, Telea inpainting; no captioner: give --phrases)")
    logger.warning("models not found, classical versions used instead: %s", listed)
    return dataclasses.replace(specs, **{stage: "fallback" for stage, _ in missing})


def make_stages(specs: StageSpecs, options: StageOptions | None = None) -> Stages:
    """Build (and load) every stage; fails fast, before any image is read."""
    from layerdiff.data.mlcid import classical
    from layerdiff.data.mlcid.pipeline import Stages

    o = options or StageOptions()
    common = {"device": o.device, "dtype": o.dtype, "allow_download": o.allow_download}
    kinds = {stage: _kind(stage, getattr(specs, stage)) for stage in FALLBACKS}

    captioner = None
    if kinds["captioner"] == "model":
        from layerdiff.data.mlcid.hf import HFCaptioner

        captioner = HFCaptioner(specs.captioner, batch_size=o.batch_size, **common)

    detector = None
    if kinds["detector"] == "model":
        from layerdiff.data.mlcid.hf import make_detector

        detector = make_detector(specs.detector, threshold=o.detector_threshold, nms_iou=o.nms_iou,
                                 max_detections=o.max_detections, **common)
    elif kinds["detector"] == "saliency":
        detector = classical.SaliencyDetector(max_detections=min(o.max_detections, 8), backend=o.classical_backend)

    if kinds["segmenter"] == "model":
        from layerdiff.data.mlcid.hf import SamSegmenter

        segmenter = SamSegmenter(specs.segmenter, **common)
    else:
        segmenter = classical.ClassicalSegmenter(backend=o.classical_backend)

    if kinds["depth"] == "model":
        from layerdiff.data.mlcid.hf import HFDepthEstimator

        depth = HFDepthEstimator(specs.depth, **common)
    else:
        depth = classical.BoxBottomDepth()

    if kinds["inpainter"] == "model":
        from layerdiff.data.mlcid.sd_inpaint import SDInpainter

        inpainter = SDInpainter(specs.inpainter, steps=o.inpaint_steps, resolution=o.inpaint_resolution, seed=o.seed, **common)
    else:
        inpainter = classical.ClassicalInpainter(backend=o.classical_backend)

    return Stages(segmenter=segmenter, depth=depth, inpainter=inpainter, captioner=captioner, detector=detector)
