"""The latent cache: a whole (small) data set encoded by the VAE once, then drawn from with
layer-count oversampling (optionally one layer count per batch).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from layerdiff.errors import LayerDiffError
from layerdiff.io.files import read_safetensors, save_safetensors_atomic
from layerdiff.model.bundle import LayerDiffModel

logger = logging.getLogger("layerdiff.train")


class LatentCache:
    """A whole (small) data set encoded once: latents (N, Lmax, 8, h, w) fp16 + prompts."""

    def __init__(self, latents, valid, global_prompts, layer_prompts):
        self.latents, self.valid = latents, valid
        self.global_prompts, self.layer_prompts = global_prompts, layer_prompts
        self.num_layers = valid.sum(1)

    def __len__(self):
        return self.latents.shape[0]

    @classmethod
    def build(cls, model: LayerDiffModel, data, size: int, path: Path, max_layers: int, batch_size: int = 32):
        from layerdiff.data.format import DamageCount, read_samples
        from layerdiff.data.reader import resolve_shards, sample_to_tensors

        if path.exists():
            return cls.load(path)
        lat_all, valid_all, gp, lp = [], [], [], []
        buf = []
        white = None  # the background's mask slot: one constant latent, encoded once

        def flush():
            # only real layers are encoded (no padded slots, no constant white masks): one VAE
            # call for the images of the buffered samples and one for their foreground masks
            nonlocal white
            if not buf:
                return
            nhwc = torch.channels_last
            imgs = torch.cat([item["images"] for item in buf])  # (sum L, 3, S, S) in [-1, 1]
            msks = torch.cat([item["masks"][1:] for item in buf])  # (sum (L-1), 1, S, S) in 0..1
            lat_img = model.encode_images(imgs.contiguous(memory_format=nhwc)).float()
            lat_msk = (model.encode_images((msks.expand(-1, 3, -1, -1) * 2 - 1).contiguous(memory_format=nhwc)).float()
                       if len(msks) else None)
            if white is None:
                white = model.encode_images(torch.ones_like(imgs[:1])).float()[0]
            lat = torch.zeros(len(buf), max_layers, 8, *lat_img.shape[-2:])
            valid = torch.zeros(len(buf), max_layers, dtype=torch.bool)
            oi = om = 0
            for b, item in enumerate(buf):
                n = item["num_layers"]
                lat[b, :n, :4] = lat_img[oi:oi + n]
                lat[b, 0, 4:] = white
                if n > 1:
                    lat[b, 1:n, 4:] = lat_msk[om:om + n - 1]
                valid[b, :n] = True
                oi, om = oi + n, om + n - 1
                gp.append(item["global_prompt"])
                lp.append(list(item["layer_prompts"]) + [""] * (max_layers - n))
            lat_all.append(lat.half())
            valid_all.append(valid)
            buf.clear()

        # channels-last layout: the encoder's convolutions run faster on CPU
        model.vae.to(memory_format=torch.channels_last)
        damage = DamageCount()  # damaged samples are skipped and counted, as the streaming reader does
        try:
            for sample in read_samples(resolve_shards(data), damage):
                if sample.num_layers > max_layers:
                    continue
                buf.append(sample_to_tensors(sample, size))
                if len(buf) == batch_size:
                    flush()
            flush()
        finally:
            model.vae.to(memory_format=torch.contiguous_format)
        if not lat_all:
            why = f"; {damage.describe()}" if damage else ""
            raise LayerDiffError(f"no sample of {max_layers} layers or fewer in {data}{why}: "
                                 "check the data with python -m layerdiff data inspect DIR")
        if damage:
            logger.warning("latent cache: %s", damage.describe())
        cache = cls(torch.cat(lat_all), torch.cat(valid_all), gp, lp)
        save_safetensors_atomic(
            {"latents": cache.latents, "valid": cache.valid.to(torch.uint8)},
            path,
            metadata={"prompts": json.dumps({"global": gp, "layers": lp})},
            overwrite=True,
        )
        logger.info("cached %d samples' latents in %s", len(cache), path)
        return cache

    @classmethod
    def load(cls, path: Path) -> LatentCache:
        tensors, meta = read_safetensors(path)
        prompts = json.loads(meta["prompts"])
        return cls(tensors["latents"], tensors["valid"].bool(), prompts["global"], prompts["layers"])

    def batch(self, gen: torch.Generator, batch_size: int, layer_weights: dict, bucket: bool = False) -> tuple:
        """Weighted draw with replacement (oversampling 3- and 4-layer samples); trims padding.

        With ``bucket``, the batch's layer count is drawn first (with the same overall odds) and
        all its samples have that count, so no compute goes to empty slots.
        """
        w = torch.tensor([float(layer_weights.get(int(n), 1.0)) for n in self.num_layers.tolist()])
        if bucket:
            counts = sorted(set(self.num_layers.tolist()))
            mass = torch.tensor([float(w[self.num_layers == c].sum()) for c in counts])
            chosen = counts[int(torch.multinomial(mass, 1, generator=gen))]
            w = w * (self.num_layers == chosen)
        idx = torch.multinomial(w, batch_size, replacement=True, generator=gen)
        L = int(self.num_layers[idx].max())
        return (
            self.latents[idx, :L].float(),
            self.valid[idx, :L],
            [self.global_prompts[i] for i in idx.tolist()],
            [self.layer_prompts[i][:L] for i in idx.tolist()],
        )
