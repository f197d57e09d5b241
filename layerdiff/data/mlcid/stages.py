"""The stage interfaces of the MLCID builder (METHOD.md section 6), one small ABC per stage.

Every stage is swappable: a model-backed implementation (``hf.py``, ``sd_inpaint.py``) and a
classical fallback (``classical.py``, ``phrases.py``) implement the same class. Conventions shared
by all stages:

- images are RGB :class:`PIL.Image.Image`, of any size;
- boxes are ``(x0, y0, x1, y1)`` floats in pixels of that image, x1/y1 exclusive;
- masks are ``bool`` numpy arrays ``(H, W)``, True = object;
- depth maps are ``float32`` numpy arrays ``(H, W)``, **larger = farther** from the camera.

A stage also carries ``name``, ``model_id`` (model-backed stages) and ``fingerprint_params`` (the
attribute names of its settings that change the output): the builder's resume check compares
them, so a rerun with another model or threshold never mixes into finished shards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels


@dataclass(frozen=True)
class Detection:
    """One detected object: its box in pixels, the detector's confidence and the phrase it matched."""

    box: Box
    score: float
    phrase: str


class Captioner(ABC):
    """Image -> one-sentence caption (InstructBLIP in the paper; BLIP here)."""

    name = "captioner"

    @abstractmethod
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per image, in order."""


class PhraseExtractor(ABC):
    """Caption -> object phrases to detect ("a cat on a red sofa" -> ["cat", "red sofa"])."""

    name = "phrases"

    @abstractmethod
    def phrases(self, caption: str) -> list[str]:
        """Distinct object phrases in order of appearance."""


class Detector(ABC):
    """Open-vocabulary detection: image + phrases -> boxes (DetCLIP in the paper; OWLv2 here)."""

    name = "detector"

    @abstractmethod
    def detect(self, image: Image.Image, phrases: Sequence[str]) -> list[Detection]:
        """Detections sorted by descending score; boxes lie inside the image."""


class Segmenter(ABC):
    """Box-prompted segmentation (SAM): one mask per box."""

    name = "segmenter"

    @abstractmethod
    def segment(self, image: Image.Image, boxes: Sequence[Box]) -> list[np.ndarray]:
        """One ``(H, W)`` bool mask per box, same order. Masks may leak outside their box; the
        pipeline clips them."""


class DepthEstimator(ABC):
    """Monocular depth, used only to order the foregrounds back to front."""

    name = "depth"

    @abstractmethod
    def depth(self, image: Image.Image) -> np.ndarray:
        """``(H, W)`` float32 relative depth of the image, larger = farther."""

    def object_depths(self, image: Image.Image, masks: Sequence[np.ndarray], boxes: Sequence[Box]) -> list[float]:
        """One depth per object (larger = farther): the median depth inside its mask."""
        if not masks:
            return []
        depth = self.depth(image)  # (H, W)
        return [float(np.median(depth[m])) if m.any() else float("inf") for m in masks]


class Inpainter(ABC):
    """Remove the foregrounds: fill ``mask`` (True = fill) with plausible background."""

    name = "inpainter"

    @abstractmethod
    def inpaint(self, image: Image.Image, mask: np.ndarray, prompt: str = "") -> Image.Image:
        """RGB image of ``image``'s size; pixels outside ``mask`` are kept exactly."""


def paste_outside_mask(original: Image.Image, filled: Image.Image, mask: np.ndarray) -> Image.Image:
    """Keep ``original`` outside ``mask`` and take ``filled`` inside it (undoes resize/VAE drift)."""
    orig = np.asarray(original.convert("RGB"))  # (H, W, 3)
    fill = np.asarray(filled.convert("RGB").resize(original.size, Image.BICUBIC))  # (H, W, 3)
    out = np.where(mask[..., None], fill, orig)
    return Image.fromarray(out.astype(np.uint8), "RGB")
