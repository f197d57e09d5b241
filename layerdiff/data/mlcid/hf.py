"""Model-backed MLCID stages through transformers: captioner, detector, segmenter, depth.

Every model loads with ``from_pretrained(path_or_id, local_files_only=not allow_download)``: a
local folder or the user's Hugging Face cache, never a download unless asked. transformers is
imported inside the constructors, so importing this module is cheap.

- :class:`HFCaptioner`: BLIP (``BlipForConditionalGeneration``; the paper used InstructBLIP);
  other image-to-text checkpoints through ``AutoModelForVision2Seq`` (untested).
- :class:`OwlDetector`: OWLv2 / OWL-ViT open-vocabulary detection (DetCLIP in the paper is not public).
- :class:`SamSegmenter`: SAM with box prompts.
- :class:`HFDepthEstimator`: any ``AutoModelForDepthEstimation`` (DPT, Depth Anything, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from layerdiff.data.mlcid.filters import box_nms
from layerdiff.data.mlcid.stages import Box, Captioner, DepthEstimator, Detection, Detector, Segmenter
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data.mlcid")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None -> cuda if available, else cpu."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise LayerDiffError(f"--device {device!r} is not a torch device: use auto, cpu, cuda or cuda:1") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayerDiffError(f"--device {device!r}: CUDA is not available on this machine: use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto"/None -> float16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise LayerDiffError(f"--dtype {dtype!r} is unknown: use auto, float32, float16 or bfloat16")
    return table[dtype]


def load_pretrained(cls, model_id: str, *, stage: str, allow_download: bool = False, **kwargs):
    """``cls.from_pretrained`` from a local folder or the HF cache; a missing model is a
    :class:`LayerDiffError` that says how to provide it."""
    from layerdiff.data.mlcid.factory import looks_local as _looks_local

    looks_local = _looks_local(model_id)
    if looks_local and not Path(model_id).expanduser().exists():
        raise LayerDiffError(f"--{stage} {model_id!r}: no such folder: give the folder of a saved model, a Hugging Face id, or 'fallback'")
    path = str(Path(model_id).expanduser()) if looks_local else model_id
    try:
        return cls.from_pretrained(path, local_files_only=not allow_download, **kwargs)
    except (OSError, ValueError) as exc:  # huggingface_hub's "not in cache" errors are OSError/ValueError
        where = "the folder" if looks_local else "a local folder or the Hugging Face cache"
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        fix = "" if looks_local or allow_download else " add --allow-download to fetch it,"
        raise LayerDiffError(
            f"--{stage} model {model_id!r} could not be loaded from {where} ({detail}): pass a local path "
            f"with --{stage} PATH,{fix} or use --{stage} fallback"
        ) from exc


class _TorchStage:
    def _load_detector(self, model_id: str, allow_download: bool):
        """A zero-shot detector's processor (kept) and model (returned), from a folder or the HF cache."""
        import transformers

        self.model_id = model_id
        self.processor = load_pretrained(transformers.AutoProcessor, model_id, stage="detector", allow_download=allow_download)
        return load_pretrained(transformers.AutoModelForZeroShotObjectDetection, model_id, stage="detector",
                               allow_download=allow_download)

    @staticmethod
    def _query(image: Image.Image, phrases: Sequence[str]) -> tuple[Image.Image, list[str]]:
        """A detector's inputs: the image as RGB and the non-blank phrases (none: nothing to find)."""
        return image.convert("RGB"), [p for p in phrases if p.strip()]

    def _to_model(self, inputs) -> dict:
        """A processor's tensors on the model's device; floating-point ones in its dtype."""
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)) for k, v in inputs.items()}

    def _setup(self, model, device, dtype):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(self.device, self.dtype).eval()


class HFCaptioner(Captioner, _TorchStage):
    """Image captioning with a transformers image-to-text model (BLIP by default)."""

    name = "hf_captioner"
    fingerprint_params = ("max_new_tokens", "num_beams")

    def __init__(self, model_id: str, device=None, dtype=None, allow_download: bool = False, batch_size: int = 8,
                 max_new_tokens: int = 30, num_beams: int = 1):
        import transformers

        self.model_id = model_id
        config = load_pretrained(transformers.AutoConfig, model_id, stage="captioner", allow_download=allow_download)
        if config.model_type == "blip":
            model_cls = transformers.BlipForConditionalGeneration
        else:
            model_cls = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        self.processor = load_pretrained(transformers.AutoProcessor, model_id, stage="captioner", allow_download=allow_download)
        model = load_pretrained(model_cls, model_id, stage="captioner", allow_download=allow_download)
        self._setup(model, device, dtype)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams

    @torch.inference_mode()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.device, self.dtype)  # (B, 3, h, w)
            ids = self.model.generate(pixel_values=pixel_values, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
            texts = self.processor.batch_decode(ids, skip_special_tokens=True)
            out.extend(" ".join(t.split()) for t in texts)
        return out


class OwlDetector(Detector, _TorchStage):
    """OWLv2 / OWL-ViT: every image patch proposes one box, scored against each phrase."""

    name = "owl"
    fingerprint_params = ("threshold", "nms_iou", "max_detections")

    def __init__(self, model_id: str, device=None, dtype=None, allow_download: bool = False, threshold: float = 0.2,
                 nms_iou: float = 0.5, max_detections: int = 20):
        model = self._load_detector(model_id, allow_download)
        if model.config.model_type not in ("owlv2", "owlvit"):
            raise LayerDiffError(
                f"--detector {model_id!r} is a {model.config.model_type!r} model: use an OWLv2, OWL-ViT or Grounding "
                "DINO checkpoint, e.g. google/owlv2-base-patch16-ensemble or IDEA-Research/grounding-dino-tiny"
            )
        # OWLv2 pads the image to a square (bottom/right) before resizing: its boxes are relative to
        # that square. OWL-ViT resizes without padding: its boxes are relative to (W, H).
        self.square = model.config.model_type == "owlv2"
        self._setup(model, device, dtype)
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections

    @torch.inference_mode()
    def detect(self, image: Image.Image, phrases: Sequence[str]) -> list[Detection]:
        image, phrases = self._query(image, phrases)
        if not phrases:
            return []
        inputs = self.processor(text=[list(phrases)], images=image, return_tensors="pt", truncation=True)
        inputs = self._to_model(inputs)
        out = self.model(**inputs)
        probs = out.logits[0].float().sigmoid()  # (Q, P): Q patch queries x P phrases
        boxes = out.pred_boxes[0].float()  # (Q, 4): cx, cy, w, h in 0..1
        score, label = probs.max(dim=-1)  # (Q,)
        w, h = image.size
        sx, sy = (max(w, h), max(w, h)) if self.square else (w, h)
        dets = []
        for q in torch.nonzero(score >= self.threshold).flatten().tolist():
            cx, cy, bw, bh = boxes[q].tolist()
            box: Box = ((cx - bw / 2) * sx, (cy - bh / 2) * sy, (cx + bw / 2) * sx, (cy + bh / 2) * sy)
            box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
            dets.append(Detection(box, float(score[q]), phrases[int(label[q])]))
        return box_nms(dets, self.nms_iou, self.max_detections)


class SamSegmenter(Segmenter, _TorchStage):
    """Segment Anything with box prompts: one image embedding, then every box's mask."""

    name = "sam"

    def __init__(self, model_id: str, device=None, dtype=None, allow_download: bool = False, boxes_per_batch: int = 32):
        import transformers

        self.model_id = model_id
        self.processor = load_pretrained(transformers.SamProcessor, model_id, stage="segmenter", allow_download=allow_download)
        model = load_pretrained(transformers.SamModel, model_id, stage="segmenter", allow_download=allow_download)
        self._setup(model, device, dtype)
        self.boxes_per_batch = boxes_per_batch

    @torch.inference_mode()
    def segment(self, image: Image.Image, boxes: Sequence[Box]) -> list[np.ndarray]:
        if not boxes:
            return []
        image = image.convert("RGB")
        inputs = self.processor(images=image, input_boxes=[[[float(v) for v in b] for b in boxes]], return_tensors="pt")
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device, self.dtype))
        masks: list[np.ndarray] = []
        for start in range(0, len(boxes), self.boxes_per_batch):
            prompt = inputs["input_boxes"][:, start : start + self.boxes_per_batch].to(self.device, self.dtype)  # (1, nb, 4)
            out = self.model(image_embeddings=embeddings, input_boxes=prompt, multimask_output=False)
            low = out.pred_masks.float().cpu()  # (1, nb, 1, h, w) logits
            full = self.processor.image_processor.post_process_masks(
                low, inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )[0]  # (nb, 1, H, W) bool
            masks.extend(np.asarray(m[0], dtype=bool) for m in full)
        return masks


class HFDepthEstimator(DepthEstimator, _TorchStage):
    """Monocular depth with any ``AutoModelForDepthEstimation`` checkpoint.

    DPT and Depth Anything predict relative inverse depth (larger = nearer) and are negated; the
    metric models listed in ``METRIC_MODEL_TYPES`` already give larger = farther.
    """

    name = "hf_depth"
    METRIC_MODEL_TYPES = frozenset({"glpn", "zoedepth", "depth_pro"})

    def __init__(self, model_id: str, device=None, dtype=None, allow_download: bool = False):
        import transformers

        self.model_id = model_id
        self.processor = load_pretrained(transformers.AutoImageProcessor, model_id, stage="depth", allow_download=allow_download)
        model = load_pretrained(transformers.AutoModelForDepthEstimation, model_id, stage="depth", allow_download=allow_download)
        self.inverse = model.config.model_type not in self.METRIC_MODEL_TYPES
        self._setup(model, device, dtype)

    @torch.inference_mode()
    def depth(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt")
        pred = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype)).predicted_depth  # (1, h, w)
        full = torch.nn.functional.interpolate(
            pred[:, None].float(), size=(image.height, image.width), mode="bicubic", align_corners=False
        )[0, 0]  # (H, W)
        d = full.cpu().numpy().astype(np.float32)
        return -d if self.inverse else d


class GroundingDinoDetector(Detector, _TorchStage):
    """Grounding DINO: a fixed set of box queries, each scored against every token of the phrases
    written as one prompt ("a cat. a red cup."); a box's phrase is the one whose tokens score it
    highest, its score that phrase's best token."""

    name = "grounding_dino"
    fingerprint_params = ("threshold", "nms_iou", "max_detections")

    def __init__(self, model_id: str, device=None, dtype=None, allow_download: bool = False, threshold: float = 0.2,
                 nms_iou: float = 0.5, max_detections: int = 20):
        model = self._load_detector(model_id, allow_download)
        if model.config.model_type != "grounding-dino":
            raise LayerDiffError(f"--detector {model_id!r} is a {model.config.model_type!r} model, not Grounding DINO")
        self.max_text = int(getattr(model.config, "max_text_len", 256))
        self._setup(model, device, dtype)
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections

    def _prompt(self, phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
        """The prompt "a cat. a red cup." and each phrase's character span in it."""
        text, spans = "", []
        for p in phrases:
            p = " ".join(p.lower().split()).rstrip(".")
            spans.append((len(text), len(text) + len(p)))
            text += p + ". "
        return text.strip(), spans

    @torch.inference_mode()
    def detect(self, image: Image.Image, phrases: Sequence[str]) -> list[Detection]:
        image, phrases = self._query(image, phrases)
        if not phrases:
            return []
        text, spans = self._prompt(phrases)
        inputs = self.processor(images=image, text=text, return_tensors="pt", truncation=True, max_length=self.max_text)
        offsets = self.processor.tokenizer(text, return_offsets_mapping=True, truncation=True,
                                           max_length=self.max_text)["offset_mapping"]
        inputs = self._to_model(inputs)
        out = self.model(**inputs)
        probs = out.logits[0].float().sigmoid()  # (Q, max_text_len): each query against each token
        boxes = out.pred_boxes[0].float()  # (Q, 4): cx, cy, w, h relative to the image
        columns = []  # per phrase: its best token's score for every query
        for start, end in spans:
            tokens = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end and i < probs.shape[1]]
            columns.append(probs[:, tokens].max(dim=1).values if tokens else torch.zeros(probs.shape[0]))
        score, label = torch.stack(columns, dim=1).max(dim=1)  # (Q,)
        w, h = image.size
        dets = []
        for q in torch.nonzero(score >= self.threshold).flatten().tolist():
            cx, cy, bw, bh = boxes[q].tolist()
            box: Box = (max(0.0, (cx - bw / 2) * w), max(0.0, (cy - bh / 2) * h),
                        min(float(w), (cx + bw / 2) * w), min(float(h), (cy + bh / 2) * h))
            dets.append(Detection(box, float(score[q]), phrases[int(label[q])]))
        return box_nms(dets, self.nms_iou, self.max_detections)


def make_detector(model_id: str, allow_download: bool = False, **kwargs) -> Detector:
    """The detector class that runs ``model_id``'s architecture: OWLv2 / OWL-ViT or Grounding DINO."""
    import transformers

    config = load_pretrained(transformers.AutoConfig, model_id, stage="detector", allow_download=allow_download)
    cls = GroundingDinoDetector if config.model_type == "grounding-dino" else OwlDetector
    return cls(model_id, allow_download=allow_download, **kwargs)
