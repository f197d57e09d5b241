"""Background inpainting with Stable Diffusion inpainting (diffusers), as in the paper.

The image is resized so its longer side is ``resolution`` (both sides multiples of 8), inpainted
inside the dilated foreground mask and resized back; pixels outside the mask are then restored
from the original, so the VAE round trip never touches the kept background.

**choice:** the fill prompt is fixed ("empty scene, background only") with a negative prompt for
objects: the image's caption names the foregrounds, and SD would paint them back. Every call
starts from the same seed, so a rerun gives the same background whatever the order of images.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from layerdiff.data.mlcid.hf import load_pretrained, resolve_device, resolve_dtype
from layerdiff.data.mlcid.stages import Inpainter, paste_outside_mask

logger = logging.getLogger("layerdiff.data.mlcid")

DEFAULT_PROMPT = "empty scene, background only, high quality photo"
DEFAULT_NEGATIVE = "person, animal, object, text, watermark, blurry, distorted"


class SDInpainter(Inpainter):
    """``StableDiffusionInpaintPipeline`` (SD 1.5 inpainting or any checkpoint of that class)."""

    name = "sd_inpaint"
    fingerprint_params = ("steps", "guidance_scale", "resolution", "seed", "prompt", "negative_prompt")

    def __init__(self, model_id: str, device=None, dtype=None, allow_download: bool = False, steps: int = 25,
                 guidance_scale: float = 7.5, resolution: int = 512, seed: int = 0,
                 prompt: str = DEFAULT_PROMPT, negative_prompt: str = DEFAULT_NEGATIVE):
        from diffusers import StableDiffusionInpaintPipeline

        self.model_id = model_id
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        pipe = load_pretrained(StableDiffusionInpaintPipeline, model_id, stage="inpainter", allow_download=allow_download,
                               safety_checker=None, requires_safety_checker=False, torch_dtype=self.dtype)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.resolution = resolution
        self.seed = seed
        self.prompt = prompt
        self.negative_prompt = negative_prompt

    def _work_size(self, size: tuple[int, int]) -> tuple[int, int]:
        w, h = size
        s = self.resolution / max(w, h)
        return max(8, int(round(w * s / 8)) * 8), max(8, int(round(h * s / 8)) * 8)

    @torch.inference_mode()
    def inpaint(self, image: Image.Image, mask: np.ndarray, prompt: str = "") -> Image.Image:
        rgb = image.convert("RGB")
        if not mask.any():
            return rgb.copy()
        size = self._work_size(rgb.size)
        mask_img = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(size, Image.NEAREST)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)  # same noise on every device
        out = self.pipe(
            prompt=prompt or self.prompt,
            negative_prompt=self.negative_prompt,
            image=rgb.resize(size, Image.BICUBIC),
            mask_image=mask_img,
            height=size[1],
            width=size[0],
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            generator=generator,
            output_type="pil",
        ).images[0]
        return paste_outside_mask(rgb, out, mask)
