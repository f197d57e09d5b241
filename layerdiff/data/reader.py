"""Streaming reader of layered shards for training: worker/rank splitting, shuffling, mixed layer counts.

Every sample becomes tensors of one training size, all layers transformed alike:

    images (L, 3, S, S) float in [-1, 1]   background first, foregrounds back to front; a
                                           foreground is exactly 0 (grey 0.5) outside its mask
    masks  (L, 1, S, S) float in {0, 1}    the background's mask is all ones

:func:`collate_layered` pads a batch to its largest L and adds ``valid`` (B, L) for the model's
attention key mask and the loss (METHOD.md section 3).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from layerdiff.data.format import (
    SHARD_PATTERN,
    DamageCount,
    LayeredSample,
    decode_record,
    iter_readable_records,
    list_shards,
)
from layerdiff.data.remote import is_url, list_url_shards
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data")

__all__ = ["EncodedSample", "LayeredShardDataset", "ShuffleBuffer", "collate_layered", "first_records", "make_loader",
           "resolve_shards", "sample_to_tensors"]


def resolve_shards(paths_or_dir) -> list[Path | str]:
    """Shard files from a folder, one ``.tar`` file, or a list of either (folders expand sorted); a
    URL (``s3://bucket/shards/``, a ``*`` glob or one ``.tar``) gives shard URLs, read through fsspec."""
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, Path)) else list(paths_or_dir)
    shards: list[Path | str] = []
    for item in items:
        if is_url(item):
            shards.extend(list_url_shards(item, SHARD_PATTERN))
            continue
        p = Path(item)
        if p.is_dir():
            shards.extend(list_shards(p))
        elif p.is_file() and p.suffix == ".tar":
            shards.append(p)
        else:
            raise LayerDiffError(f"data path {str(p)!r} is neither a folder of shards nor a .tar shard: check the path")
    if not shards:
        raise LayerDiffError(f"no .tar shards found in {[str(i) for i in items]}: generate data first "
                             "(python -m layerdiff data toy --out DIR ...)")
    return shards


def first_records(paths_or_dir, count: int, max_layers: int) -> tuple[list[EncodedSample], list[dict], DamageCount]:
    """The first ``count`` readable records of at most ``max_layers`` layers, in shard order (a
    fixed set, e.g. for validation), still encoded, with their checked metadata; damaged ones are
    skipped and counted."""
    damage = DamageCount()
    records, metas = [], []
    if count > 0:
        for key, members, meta, path in iter_readable_records(resolve_shards(paths_or_dir), damage):
            if meta["num_layers"] > max_layers:
                continue
            records.append(EncodedSample(key, members, path))
            metas.append(meta)
            if len(records) == count:
                break
    return records, metas, damage


def _resize_crop(img: Image.Image, size: int, mode: str, resample) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if mode == "resize":
        return img.resize((size, size), resample)
    scale = size / min(w, h)  # shorter side to `size`, then the centre square
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def sample_to_tensors(sample: LayeredSample, size: int = 128, resize: str = "crop") -> dict:
    """One sample as training tensors (see the module docstring); the same geometry for every layer."""
    L = sample.num_layers
    images = np.empty((L, size, size, 3), dtype=np.float32)
    masks = np.ones((L, size, size), dtype=np.float32)
    images[0] = np.asarray(_resize_crop(sample.background, size, resize, Image.BICUBIC), dtype=np.float32)
    for i, (fg, mask) in enumerate(zip(sample.foregrounds, sample.masks), start=1):
        m = np.asarray(_resize_crop(mask, size, resize, Image.NEAREST)) >= 128  # re-binarised
        masks[i] = m
        images[i] = np.asarray(_resize_crop(fg, size, resize, Image.BICUBIC), dtype=np.float32)
        images[i][~m] = 127.5  # exact neutral grey outside the (resized) mask
    images = np.clip(images / 127.5 - 1.0, -1.0, 1.0)
    return {
        "key": sample.key,
        "global_prompt": sample.global_prompt,
        "layer_prompts": list(sample.layer_prompts),
        "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),  # (L, 3, S, S)
        "masks": torch.from_numpy(masks)[:, None],  # (L, 1, S, S)
        "num_layers": L,
        "extra": sample.extra,
    }


class EncodedSample(NamedTuple):
    """One record as it lies in its shard: the tar members' bytes by name (``json``, ``bg.png``, ...)."""

    key: str
    members: dict[str, bytes]
    shard: Path | str  # a local file or a URL (fsspec)

    @property
    def nbytes(self) -> int:
        return sum(len(data) for data in self.members.values() if isinstance(data, bytes))


class ShuffleBuffer:
    """The encoded samples a reader shuffles among (``nbytes``: the bytes they hold; the copies of an
    oversampled sample share theirs)."""

    def __init__(self):
        self.items: list[EncodedSample] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: EncodedSample) -> None:
        self.items.append(item)

    def swap(self, index: int, item: EncodedSample) -> EncodedSample:
        """Put ``item`` at ``index``; return the sample it replaces."""
        self.items[index], item = item, self.items[index]
        return item

    def pop(self) -> EncodedSample:
        return self.items.pop()

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in {id(item.members): item for item in self.items}.values())


@dataclass
class _EpochTally:
    """What one epoch of a reader skipped: too many layers, damaged records and PNGs."""

    skipped: int = 0
    usable: int = 0
    damage: DamageCount = field(default_factory=DamageCount)
    failed: set = field(default_factory=set)  # (shard, key) of records whose PNGs did not decode: copies skip them


class LayeredShardDataset(IterableDataset):
    """Stream samples from shards, split over DataLoader workers and distributed ranks.

    Each (rank, worker) reads a disjoint set of whole shards; with fewer shards than readers, every
    reader scans all shards and keeps every N-th sample instead (still disjoint, slower). Shard
    order and the shuffle buffer are seeded by ``(seed, epoch)``. The buffer holds up to
    ``shuffle_buffer`` samples still encoded (their PNG and JSON bytes, see :class:`ShuffleBuffer`;
    a reader's live buffer is ``self.buffer``), and a sample is decoded to tensors only when it
    leaves it: at 512 px a decoded 4-layer sample is 17 MB of float32 images and masks, its
    compressed PNGs a fraction of that. 0 (or 1) keeps the shards' order; call :meth:`set_epoch` between
    epochs, or pass ``repeat=True`` for an endless stream. ``layer_weights`` oversamples by layer
    count: a sample with L layers is emitted ``floor(w)`` times plus once more with probability
    ``frac(w)`` (w = ``layer_weights.get(L, 1.0)``; 0 drops them), decided by ``(seed, epoch, key)``.
    Samples with more than ``max_layers`` layers are skipped. Readers may receive different sample
    counts (shards differ in size), so distributed training should run by steps with ``repeat=True``.
    """

    def __init__(self, paths_or_dir, size: int = 128, shuffle_buffer: int = 256, seed: int = 0,
                 max_layers: int = 4, resize: str = "crop", layer_weights: Mapping[int, float] | None = None,
                 repeat: bool = False, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if not isinstance(size, int) or size < 8 or size % 8:
            raise LayerDiffError(f"training size {size!r} is not a positive multiple of 8: use e.g. 64, 128 or 512")
        if resize not in ("crop", "resize"):
            raise LayerDiffError(f"resize {resize!r} is unknown: use 'crop' (keep aspect, centre crop) or 'resize' (stretch)")
        if max_layers < 1:
            raise LayerDiffError(f"max_layers {max_layers} must be at least 1")
        if shuffle_buffer < 0:
            raise LayerDiffError(f"shuffle_buffer {shuffle_buffer} must be 0 (no shuffling) or more")
        if layer_weights is not None and any(w < 0 for w in layer_weights.values()):
            raise LayerDiffError(f"layer_weights {dict(layer_weights)} must not be negative")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise LayerDiffError(f"rank {rank} / world_size {world_size}: give both, with 0 <= rank < world_size")
        self.shards = resolve_shards(paths_or_dir)
        self.size, self.shuffle_buffer, self.seed = size, shuffle_buffer, seed
        self.max_layers, self.resize, self.repeat = max_layers, resize, repeat
        self.layer_weights = dict(layer_weights) if layer_weights else None
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.buffer: ShuffleBuffer | None = None  # the shuffle buffer of the running iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _reader_slot(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over ranks x workers."""
        rank, world = self.rank, self.world_size
        if rank is None:
            rank, world = 0, 1
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def _copies(self, key: str, num_layers: int, epoch: int) -> int:
        if self.layer_weights is None:
            return 1
        w = float(self.layer_weights.get(num_layers, 1.0))
        whole, frac = int(w), w - int(w)
        if frac > 0:
            u = np.random.default_rng([self.seed, epoch, zlib.crc32(key.encode())]).random()
            whole += int(u < frac)
        return whole

    def _records(self, epoch: int, damage: DamageCount) -> Iterator[tuple[str, dict, dict, Path]]:
        slot, readers = self._reader_slot()
        shards = list(self.shards)
        if self.shuffle_buffer > 0:  # same order on every reader, so the split stays a partition
            np.random.default_rng([self.seed, epoch]).shuffle(shards)
        if len(shards) >= readers:
            yield from iter_readable_records(shards[slot::readers], damage)
        else:
            if epoch == self.epoch and slot == 0:
                logger.warning("%d shards for %d readers: each reader scans every shard; write more shards",
                               len(shards), readers)
            for n, record in enumerate(iter_readable_records(shards, damage)):
                if n % readers == slot:
                    yield record

    def _encoded(self, epoch: int, tally: _EpochTally) -> Iterator[EncodedSample]:
        """This reader's records of at most ``max_layers`` layers, each as many times as its layer
        weight says, still encoded (nothing is decoded before it leaves the shuffle buffer)."""
        for key, members, meta, path in self._records(epoch, tally.damage):
            num_layers = meta["num_layers"]
            if num_layers > self.max_layers:
                tally.skipped += 1
                continue
            tally.usable += 1
            item = EncodedSample(key, members, path)
            for _ in range(self._copies(key, num_layers, epoch)):
                yield item  # copies share their bytes

    def _shuffled(self, items: Iterator[EncodedSample], epoch: int) -> Iterator[EncodedSample]:
        """``items`` through a buffer of ``shuffle_buffer`` encoded samples: once it is full, each new
        sample takes the place of a random one, which leaves; at the end the rest leave in random order."""
        if self.shuffle_buffer <= 1:
            yield from items
            return
        slot, _ = self._reader_slot()
        rng = np.random.default_rng([self.seed, epoch, slot, 1])
        self.buffer = buffer = ShuffleBuffer()
        for item in items:
            if len(buffer) < self.shuffle_buffer:
                buffer.add(item)
                continue
            yield buffer.swap(int(rng.integers(len(buffer))), item)
        rng.shuffle(buffer.items)
        while buffer:
            yield buffer.pop()

    def _decoded(self, item: EncodedSample, tally: _EpochTally) -> dict | None:
        """The training tensors of ``item``; None (counted once per sample) if its PNGs are damaged."""
        if (item.shard, item.key) in tally.failed:
            return None
        try:
            sample = decode_record(item.key, item.members, item.shard)
        except LayerDiffError as exc:  # one damaged sample: the stream goes on without it
            tally.damage.add(exc)
            tally.failed.add((item.shard, item.key))
            tally.usable -= 1
            return None
        return sample_to_tensors(sample, self.size, self.resize)

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        while True:
            tally = _EpochTally()
            for item in self._shuffled(self._encoded(epoch, tally), epoch):
                decoded = self._decoded(item, tally)
                if decoded is not None:
                    yield decoded
            self._report(epoch, tally)
            if not self.repeat:
                return
            epoch += 1

    def _report(self, epoch: int, tally: _EpochTally) -> None:
        if tally.skipped:
            logger.info("skipped %d samples with more than %d layers", tally.skipped, self.max_layers)
        if tally.damage:
            logger.warning("epoch %d: %s", epoch, tally.damage.describe())
        if not tally.usable and self.repeat:  # an endless stream of nothing would spin for ever
            why = f"; {tally.damage.describe()}" if tally.damage else ""
            raise LayerDiffError(
                f"no usable samples in {len(self.shards)} shards for this reader ({tally.skipped} with more than "
                f"{self.max_layers} layers{why}): check the data with python -m layerdiff data inspect DIR")


def collate_layered(batch: Sequence[dict]) -> dict:
    """Pad a list of samples to the largest layer count; ``valid`` (B, Lmax) marks real layers."""
    if not batch:
        raise LayerDiffError("collate_layered got an empty batch")
    sizes = {tuple(item["images"].shape[-2:]) for item in batch}
    if len(sizes) != 1:
        raise LayerDiffError(f"samples of sizes {sorted(sizes)} in one batch: give the dataset one training size")
    (h, w), b = sizes.pop(), len(batch)
    lmax = max(item["num_layers"] for item in batch)
    images = torch.zeros(b, lmax, 3, h, w)  # (B, Lmax, 3, S, S); padding = 0 = grey
    masks = torch.zeros(b, lmax, 1, h, w)  # (B, Lmax, 1, S, S)
    valid = torch.zeros(b, lmax, dtype=torch.bool)  # (B, Lmax)
    for i, item in enumerate(batch):
        n = item["num_layers"]
        images[i, :n] = item["images"]
        masks[i, :n] = item["masks"]
        valid[i, :n] = True
    return {
        "key": [item["key"] for item in batch],
        "global_prompt": [item["global_prompt"] for item in batch],
        "layer_prompts": [list(item["layer_prompts"]) + [""] * (lmax - item["num_layers"]) for item in batch],
        "images": images,
        "masks": masks,
        "valid": valid,
        "num_layers": torch.tensor([item["num_layers"] for item in batch], dtype=torch.long),
        "extra": [item["extra"] for item in batch],
    }


def make_loader(paths_or_dir, batch_size: int = 8, num_workers: int = 2, size: int = 128, shuffle_buffer: int = 256,
                seed: int = 0, drop_last: bool = False, pin_memory: bool = False, **dataset_kwargs) -> DataLoader:
    """A DataLoader over :class:`LayeredShardDataset` batching with :func:`collate_layered`."""
    if batch_size < 1:
        raise LayerDiffError(f"batch_size {batch_size} must be at least 1")
    if num_workers < 0:
        raise LayerDiffError(f"num_workers {num_workers} must be 0 or more")
    dataset = LayeredShardDataset(paths_or_dir, size=size, shuffle_buffer=shuffle_buffer, seed=seed, **dataset_kwargs)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_layered,
                      drop_last=drop_last, pin_memory=pin_memory)
