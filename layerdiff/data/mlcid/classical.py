"""Classical fallbacks for every MLCID stage that has a model: no weights, CPU only.

They keep the builder runnable without any model (smoke tests, machines without the Hugging Face
cache, annotated data whose boxes come from sidecar files). Quality is far below the model path.
Each needs OpenCV (``pip install opencv-python-headless``) or, failing that, scikit-image
(``pip install scikit-image``); ``backend="cv2" | "skimage" | None`` (None = whichever is there,
OpenCV first) picks one.

- :class:`SaliencyDetector`: spectral-residual saliency (Hou & Zhang, CVPR 2007) -> connected
  salient regions -> boxes. It cannot read phrases: box k gets phrase k of the list (placeholders).
- :class:`ClassicalSegmenter`: GrabCut in the box (OpenCV) or a random walker seeded outside the
  box and at its centre (scikit-image).
- :class:`BoxBottomDepth`: the paper's fallback, a lower box bottom is nearer.
- :class:`ClassicalInpainter`: Telea fast marching (OpenCV) or biharmonic (scikit-image).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from layerdiff.data.mlcid.filters import box_mask
from layerdiff.data.mlcid.stages import (
    Box,
    DepthEstimator,
    Detection,
    Detector,
    Inpainter,
    Segmenter,
    paste_outside_mask,
)
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data.mlcid")

BACKENDS = ("cv2", "skimage")


def classical_backend(prefer: str | None = None) -> str:
    """``"cv2"`` or ``"skimage"``: the requested one if importable, else the first that is."""
    if prefer not in (None, "auto", *BACKENDS):
        raise LayerDiffError(f"classical backend {prefer!r} is unknown: use 'cv2', 'skimage' or 'auto'")
    for name in BACKENDS if prefer in (None, "auto") else (prefer,):
        try:
            __import__("cv2" if name == "cv2" else "skimage.segmentation")
            return name
        except ImportError:
            continue
    need = {"cv2": "opencv-python-headless", "skimage": "scikit-image"}
    hint = need[prefer] if prefer in need else "opencv-python-headless  (or: pip install scikit-image)"
    raise LayerDiffError(f"the classical MLCID fallbacks need OpenCV or scikit-image: pip install {hint}")


def _work_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    w, h = size
    s = min(1.0, longest / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``size`` = (width, height)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(size, Image.NEAREST)
    return np.asarray(img) >= 128


def dilate(mask: np.ndarray, radius: float, backend: str | None = None) -> np.ndarray:
    """Grow a bool mask by a disk of ``radius`` pixels (exact Euclidean distance with OpenCV or
    SciPy; a square of that radius with Pillow alone, so the model path needs neither)."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    try:
        backend = classical_backend(backend)
    except LayerDiffError:
        if backend not in (None, "auto"):
            raise
        size = 2 * int(round(radius)) + 1
        img = Image.fromarray(mask.astype(np.uint8) * 255, "L").filter(ImageFilter.MaxFilter(size))
        return np.asarray(img) >= 128
    if backend == "cv2":
        import cv2

        dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    else:
        from scipy import ndimage

        dist = ndimage.distance_transform_edt(~mask)
    return dist <= radius


def label_components(mask: np.ndarray, backend: str | None = None) -> tuple[np.ndarray, int]:
    """(labels (H, W) int, count): 8-connected components of a bool mask, labels 1..count."""
    if classical_backend(backend) == "cv2":
        import cv2

        n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        return labels, int(n) - 1
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    return labels, int(n)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (reflect padding), numpy only."""
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    a = np.pad(a, r, mode="reflect")
    a = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, a)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, a)


def spectral_residual_saliency(image: Image.Image, work_size: int = 64) -> np.ndarray:
    """``(H, W)`` float32 saliency in 0..1 at the image's size (Hou & Zhang 2007)."""
    small = image.convert("L").resize(_work_size(image.size, work_size), Image.BILINEAR)
    a = np.asarray(small, dtype=np.float64) / 255.0  # (h, w)
    h, w = a.shape
    ph, pw = h // 4, w // 4  # mirror padding: the FFT's wrap-around makes the borders look salient
    a = np.pad(a, ((ph, ph), (pw, pw)), mode="symmetric")
    spectrum = np.fft.fft2(a)
    log_amp = np.log(np.abs(spectrum) + 1e-8)
    padded = np.pad(log_amp, 1, mode="edge")
    mean3 = sum(padded[dy : dy + a.shape[0], dx : dx + a.shape[1]] for dy in range(3) for dx in range(3)) / 9.0
    sal = np.abs(np.fft.ifft2(np.exp(log_amp - mean3 + 1j * np.angle(spectrum)))) ** 2
    sal = sal[ph : ph + h, pw : pw + w]
    sal = _blur(sal, sigma=max(1.0, 2.5 * max(h, w) / 64))
    sal = (sal - sal.min()) / max(float(sal.max() - sal.min()), 1e-12)
    up = Image.fromarray((sal * 255).astype(np.uint8), "L").resize(image.size, Image.BILINEAR)
    return np.asarray(up, dtype=np.float32) / 255.0


class SaliencyDetector(Detector):
    """Boxes around connected salient regions, strongest first; phrases are placeholders."""

    name = "saliency"
    fingerprint_params = ("max_detections", "threshold", "work_size")

    def __init__(self, max_detections: int = 5, threshold: float = 2.0, work_size: int = 64, backend: str | None = None):
        self.max_detections = max_detections
        self.threshold = threshold  # a region is salient where saliency > threshold * mean
        self.work_size = work_size
        self.backend = classical_backend(backend)

    def detect(self, image: Image.Image, phrases: Sequence[str]) -> list[Detection]:
        sal = spectral_residual_saliency(image, self.work_size)  # (H, W)
        h, w = sal.shape
        salient = sal > min(self.threshold * float(sal.mean()), 0.9 * float(sal.max()))
        salient = dilate(salient, 0.02 * max(h, w), self.backend)  # merge the blobs of one object
        labels, n = label_components(salient, self.backend)
        found = []
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            if ys.size < 4:
                continue
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            found.append((float(sal[ys, xs].mean()), box))
        found.sort(key=lambda sb: (-sb[0], sb[1]))
        names = list(phrases) or ["object"]
        return [Detection(box, score, names[i % len(names)]) for i, (score, box) in enumerate(found[: self.max_detections])]


def _ellipse_in(box: Box, height: int, width: int, scale: float = 1.0) -> np.ndarray:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = max((x1 - x0) * scale / 2, 0.5), max((y1 - y0) * scale / 2, 0.5)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0


class ClassicalSegmenter(Segmenter):
    """Box-prompted segmentation without a model: GrabCut (OpenCV) or random walker (scikit-image),
    run on a copy of at most ``work_size`` px; the inscribed ellipse where either cannot run."""

    name = "classical"
    fingerprint_params = ("work_size", "iterations", "backend")

    def __init__(self, work_size: int = 256, iterations: int = 3, backend: str | None = None):
        self.work_size = work_size
        self.iterations = iterations
        self.backend = classical_backend(backend)

    def segment(self, image: Image.Image, boxes: Sequence[Box]) -> list[np.ndarray]:
        rgb = image.convert("RGB")
        size = _work_size(rgb.size, self.work_size)
        small = np.asarray(rgb.resize(size, Image.BILINEAR))  # (h, w, 3)
        sx, sy = size[0] / rgb.size[0], size[1] / rgb.size[1]
        masks = []
        for box in boxes:
            sbox = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            if self.backend == "cv2":
                m = self._grabcut(small, sbox)
            else:
                m = self._random_walker(small, sbox)
            masks.append(_resize_mask(m, rgb.size))
        return masks

    def _grabcut(self, rgb: np.ndarray, box: Box) -> np.ndarray:
        import cv2

        h, w = rgb.shape[:2]
        x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
        x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 - x0 < 3 or y1 - y0 < 3 or (x1 - x0) * (y1 - y0) >= h * w - 1:
            return _ellipse_in(box, h, w)  # GrabCut needs some background outside the rectangle
        # GrabCut costs grow with the pixels it sees: run it on the box plus a margin of background
        margin = max(8, (x1 - x0) // 4, (y1 - y0) // 4)
        cx0, cy0, cx1, cy1 = max(x0 - margin, 0), max(y0 - margin, 0), min(x1 + margin, w), min(y1 + margin, h)
        crop = np.ascontiguousarray(rgb[cy0:cy1, cx0:cx1, ::-1])  # (h', w', 3) BGR
        gc = np.zeros(crop.shape[:2], np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)  # GrabCut's k-means draws from OpenCV's global RNG: same box, same mask
        try:
            cv2.grabCut(crop, gc, (x0 - cx0, y0 - cy0, x1 - x0, y1 - y0), bgd, fgd, self.iterations, cv2.GC_INIT_WITH_RECT)
        except cv2.error as exc:  # degenerate colour models (flat boxes)
            logger.debug("grabcut failed on box %s (%s); using the box's ellipse", box, exc)
            return _ellipse_in(box, h, w)
        m = np.zeros((h, w), bool)
        m[cy0:cy1, cx0:cx1] = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        return m if m.any() else _ellipse_in(box, h, w)

    def _random_walker(self, rgb: np.ndarray, box: Box, max_side: int = 96) -> np.ndarray:
        from skimage.segmentation import random_walker

        h, w = rgb.shape[:2]
        # the box plus a margin of background, at most max_side px: the solve grows with the pixels
        bw, bh = box[2] - box[0], box[3] - box[1]
        margin = max(8.0, bw / 4, bh / 4)
        cx0, cy0 = int(max(box[0] - margin, 0)), int(max(box[1] - margin, 0))
        cx1, cy1 = int(min(np.ceil(box[2] + margin), w)), int(min(np.ceil(box[3] + margin), h))
        crop = Image.fromarray(rgb[cy0:cy1, cx0:cx1])
        small = crop.resize(_work_size(crop.size, max_side), Image.BILINEAR)
        sx, sy = small.width / crop.width, small.height / crop.height
        cbox = ((box[0] - cx0) * sx, (box[1] - cy0) * sy, (box[2] - cx0) * sx, (box[3] - cy0) * sy)
        sh, sw = small.height, small.width
        inside = box_mask(cbox, sh, sw)
        seeds = np.zeros((sh, sw), np.int32)
        seeds[~inside] = 1  # background: everything outside the box
        seeds[_ellipse_in(cbox, sh, sw, scale=0.3) & inside] = 2  # object: the box's centre
        if not (seeds == 1).any() or not (seeds == 2).any():
            return _ellipse_in(box, h, w)
        with warnings.catch_warnings():  # "probability range" notes on flat crops are harmless here
            warnings.simplefilter("ignore", UserWarning)
            labels = random_walker(np.asarray(small, np.float64) / 255.0, seeds, beta=130, mode="cg_j", channel_axis=-1)
        m = np.zeros((h, w), bool)
        m[cy0:cy1, cx0:cx1] = _resize_mask(labels == 2, crop.size)
        return m & box_mask(box, h, w)


class BoxBottomDepth(DepthEstimator):
    """Depth from the box bottom: the lower an object stands in the image, the nearer it is."""

    name = "box_bottom"

    def depth(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        rows = 1.0 - (np.arange(h, dtype=np.float32) + 0.5) / h  # top row farthest
        return np.repeat(rows[:, None], w, axis=1)

    def object_depths(self, image: Image.Image, masks: Sequence[np.ndarray], boxes: Sequence[Box]) -> list[float]:
        h = image.size[1]
        return [1.0 - float(b[3]) / h for b in boxes]


class ClassicalInpainter(Inpainter):
    """Telea fast-marching inpainting (OpenCV) or biharmonic inpainting (scikit-image) on a copy of
    at most ``work_size`` px (biharmonic solves a sparse system: kept small); pixels outside the
    mask are kept exactly. The prompt is ignored."""

    name = "classical"
    fingerprint_params = ("method", "radius", "work_size")

    def __init__(self, method: str = "auto", radius: float = 5.0, work_size: int | None = None,
                 backend: str | None = None):
        if method not in ("auto", "telea", "biharmonic"):
            raise LayerDiffError(f"inpainting method {method!r} is unknown: use 'telea', 'biharmonic' or 'auto'")
        if method == "auto":
            method = "telea" if classical_backend(backend) == "cv2" else "biharmonic"
        classical_backend("cv2" if method == "telea" else "skimage")  # fail now if it is missing
        self.method = method
        self.radius = radius
        self.work_size = work_size or (512 if method == "telea" else 128)

    def inpaint(self, image: Image.Image, mask: np.ndarray, prompt: str = "") -> Image.Image:
        rgb = image.convert("RGB")
        if not mask.any():
            return rgb.copy()
        size = _work_size(rgb.size, self.work_size)
        small = np.asarray(rgb.resize(size, Image.BICUBIC))  # (h, w, 3)
        # grow the hole by the resampling blur so no object colour leaks into the fill
        small_mask = dilate(_resize_mask(mask, size), 1.0, "cv2" if self.method == "telea" else "skimage")
        if self.method == "telea":
            import cv2

            filled = cv2.inpaint(small, small_mask.astype(np.uint8) * 255, self.radius, cv2.INPAINT_TELEA)
        else:
            from skimage.restoration import inpaint_biharmonic

            filled = inpaint_biharmonic(small.astype(np.float64) / 255.0, small_mask, channel_axis=-1)
            filled = np.clip(np.rint(filled * 255.0), 0, 255).astype(np.uint8)
        return paste_outside_mask(rgb, Image.fromarray(filled, "RGB"), mask)
