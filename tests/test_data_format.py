"""Shard format (writer atomicity, round trip) and the streaming reader."""

from __future__ import annotations

import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from layerdiff.data.format import (
    GREY,
    LayeredSample,
    composite,
    list_shards,
    read_shard,
    read_shard_meta,
)
from layerdiff.data.reader import LayeredShardDataset, collate_layered, make_loader, sample_to_tensors
from layerdiff.data.shard_writer import ShardWriter, write_shard
from layerdiff.errors import LayerDiffError


def make_sample(key: str, k: int, w: int = 32, h: int = 32, seed: int = 0) -> LayeredSample:
    """Random background; foreground k is a coloured rectangle in column band k, grey elsewhere."""
    rng = np.random.default_rng([seed, k, w, h, sum(map(ord, key))])
    bg = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    fgs, masks = [], []
    for i in range(k):
        m = np.zeros((h, w), dtype=bool)
        m[h // 4: 3 * h // 4, i * w // 3 + 1: (i + 1) * w // 3 - 1] = True
        fg = np.empty((h, w, 3), dtype=np.uint8)
        fg[:] = GREY
        fg[m] = rng.integers(0, 256, (m.sum(), 3), dtype=np.uint8)
        fgs.append(Image.fromarray(fg, "RGB"))
        masks.append(Image.fromarray(m.astype(np.uint8) * 255, "L"))
    return LayeredSample(
        key=key, global_prompt=f"scene {key}", layer_prompts=["bg"] + [f"thing {i}" for i in range(1, k + 1)],
        background=Image.fromarray(bg, "RGB"), foregrounds=fgs, masks=masks, source="test",
        extra={"k": k, "nested": {"a": [1, 2]}},
    )


def write_mixed_shards(tmp_path, shards: int = 4, per_shard: int = 3, size: int = 32):
    """Shards whose samples cycle through 1..3 foregrounds (2..4 layers)."""
    keys = []
    for s in range(shards):
        samples = [make_sample(f"s{s}-{i}", 1 + (s * per_shard + i) % 3, size, size) for i in range(per_shard)]
        keys += [x.key for x in samples]
        write_shard(tmp_path / f"shard-{s:06d}.tar", samples)
    return keys


def assert_same(a: LayeredSample, b: LayeredSample) -> None:
    assert (a.key, a.global_prompt, a.layer_prompts, a.source, a.extra) == (b.key, b.global_prompt, b.layer_prompts, b.source, b.extra)
    for x, y in zip([a.background, *a.foregrounds, *a.masks], [b.background, *b.foregrounds, *b.masks]):
        assert x.mode == y.mode and np.array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------- writer / format


def test_round_trip_is_pixel_exact(tmp_path):
    samples = [make_sample(f"k{i}", i % 4, 40, 24) for i in range(6)]  # includes a background-only sample
    path = tmp_path / "shard-000000.tar"
    assert write_shard(path, samples) == 6
    back = list(read_shard(path))
    assert len(back) == 6
    for a, b in zip(samples, back):
        assert_same(a, b)
        assert b.num_layers == a.num_layers and b.size == (40, 24)
    meta = next(read_shard_meta(path))
    assert meta["num_layers"] == 1 and meta["width"] == 40 and meta["height"] == 24 and meta["foreground_prompts"] == []


def test_member_names_follow_the_layout(tmp_path):
    path = tmp_path / "shard-000000.tar"
    write_shard(path, [make_sample("abc", 2)])
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names == ["abc.json", "abc.bg.png", "abc.fg1.png", "abc.mask1.png", "abc.fg2.png", "abc.mask2.png"]


def test_same_samples_give_identical_bytes(tmp_path):
    samples = [make_sample(f"k{i}", i % 3) for i in range(4)]
    write_shard(tmp_path / "a-000000.tar", samples)
    write_shard(tmp_path / "b-000000.tar", samples)
    assert (tmp_path / "a-000000.tar").read_bytes() == (tmp_path / "b-000000.tar").read_bytes()


def test_write_shard_refuses_to_overwrite(tmp_path):
    path = tmp_path / "shard-000000.tar"
    write_shard(path, [make_sample("a", 1)])
    before = path.read_bytes()
    with pytest.raises(LayerDiffError, match="already exists"):
        write_shard(path, [make_sample("b", 1)])
    assert path.read_bytes() == before
    write_shard(path, [make_sample("b", 1)], overwrite=True)
    assert [s.key for s in read_shard(path)] == ["b"]


def test_bad_sample_leaves_nothing_behind(tmp_path):
    bad = make_sample("bad", 1)
    bad.masks[0] = bad.masks[0].resize((16, 16))
    with pytest.raises(LayerDiffError, match="must have the background's size"):
        write_shard(tmp_path / "shard-000000.tar", [make_sample("ok", 1), bad])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mutate, message", [
    (lambda s: setattr(s, "key", "has.dot"), "no dots"),
    (lambda s: setattr(s, "background", s.background.convert("RGBA")), "convert"),
    (lambda s: s.layer_prompts.pop(), "layer prompts"),
    (lambda s: setattr(s, "masks", [m.convert("RGB") for m in s.masks]), "'L' mask"),
    (lambda s: setattr(s, "extra", {"x": object()}), "JSON"),
])
def test_invalid_samples_are_named(mutate, message):
    s = make_sample("x", 2)
    mutate(s)
    with pytest.raises(LayerDiffError, match=message):
        s.validate()


def test_duplicate_keys_in_one_shard(tmp_path):
    with pytest.raises(LayerDiffError, match="twice"):
        write_shard(tmp_path / "shard-000000.tar", [make_sample("a", 1), make_sample("a", 2)])


def test_shard_writer_splits_and_names(tmp_path):
    with ShardWriter(tmp_path, prefix="part", samples_per_shard=2, start_index=3) as w:
        for i in range(5):
            w.write(make_sample(f"k{i}", 1))
    assert [p.name for p in w.close()] == ["part-000003.tar", "part-000004.tar", "part-000005.tar"]
    assert [p.name for p in list_shards(tmp_path)] == ["part-000003.tar", "part-000004.tar", "part-000005.tar"]
    assert [s.key for p in list_shards(tmp_path) for s in read_shard(p)] == [f"k{i}" for i in range(5)]


def test_exception_in_writer_discards_partial_shard(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, samples_per_shard=2) as w:
            for i in range(3):
                w.write(make_sample(f"k{i}", 1))
            raise RuntimeError("boom")
    # the first (complete) shard stays, the half-filled second one and every temp file are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "b", samples_per_shard=10) as w:
            w.write(make_sample("k", 1))
            raise RuntimeError("early")
    assert list((tmp_path / "b").iterdir()) == []


def test_shard_writer_refuses_existing_shard_up_front(tmp_path):
    write_shard(tmp_path / "shard-000000.tar", [make_sample("a", 1)])
    with pytest.raises(LayerDiffError, match="--overwrite"):
        ShardWriter(tmp_path)
    with ShardWriter(tmp_path, overwrite=True) as w:
        w.write(make_sample("b", 1))
    assert [s.key for s in read_shard(tmp_path / "shard-000000.tar")] == ["b"]


def test_list_shards_skips_temporary_and_other_files(tmp_path):
    write_shard(tmp_path / "toy-000000.tar", [make_sample("a", 1)])
    (tmp_path / ".toy-000001.tar.abc.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_shards(tmp_path)] == ["toy-000000.tar"]
    with pytest.raises(LayerDiffError, match="does not exist"):
        list_shards(tmp_path / "missing")


def test_corrupt_shard_is_reported(tmp_path):
    path = tmp_path / "shard-000000.tar"
    write_shard(path, [make_sample("a", 2)])
    data = path.read_bytes()
    path.write_bytes(data[:700])  # truncated inside a PNG member
    with pytest.raises(LayerDiffError, match="shard"):
        list(read_shard(path))


def test_composite_back_to_front():
    s = make_sample("c", 2)
    out = np.asarray(composite(s))
    m1, m2 = (np.asarray(m) > 0 for m in s.masks)
    assert np.array_equal(out[m2], np.asarray(s.foregrounds[1])[m2])
    assert np.array_equal(out[m1], np.asarray(s.foregrounds[0])[m1])
    rest = ~(m1 | m2)
    assert np.array_equal(out[rest], np.asarray(s.background)[rest])


# --------------------------------------------------------------------------------- reader


def test_sample_tensors_shapes_and_values():
    s = make_sample("t", 3, 32, 32)
    item = sample_to_tensors(s, size=32)
    assert item["images"].shape == (4, 3, 32, 32) and item["masks"].shape == (4, 1, 32, 32)
    assert item["images"].dtype == torch.float32 and item["images"].min() >= -1 and item["images"].max() <= 1
    assert torch.all(item["masks"][0] == 1)
    m = item["masks"][1:]
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(item["images"][1:] * (1 - m) == 0)  # exact grey outside the masks
    expected = torch.from_numpy(np.array(s.background)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(item["images"][0], expected)


def test_crop_and_resize_keep_layers_aligned():
    s = make_sample("r", 2, w=64, h=48)
    for mode in ("crop", "resize"):
        item = sample_to_tensors(s, size=32, resize=mode)
        assert item["images"].shape == (3, 3, 32, 32)
        m = item["masks"][1:]
        assert set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 0
        inside = item["images"][1:][m.expand(-1, 3, -1, -1) > 0]
        assert not torch.any(inside == 0)  # pixels under a mask carry the object, never the fill
    with pytest.raises(LayerDiffError, match="multiple of 8"):
        LayeredShardDataset([], size=30)


def test_dataset_mixed_layer_counts_and_collate(tmp_path):
    write_mixed_shards(tmp_path, shards=2)
    ds = LayeredShardDataset(tmp_path, size=32, shuffle_buffer=4, seed=1)
    items = list(ds)
    assert len(items) == 6 and {i["num_layers"] for i in items} == {2, 3, 4}
    batch = collate_layered(items[:4])
    lmax = max(i["num_layers"] for i in items[:4])
    assert batch["images"].shape == (4, lmax, 3, 32, 32) and batch["masks"].shape == (4, lmax, 1, 32, 32)
    assert batch["valid"].shape == (4, lmax) and batch["valid"].dtype == torch.bool
    for b, item in enumerate(items[:4]):
        n = item["num_layers"]
        assert batch["valid"][b].tolist() == [True] * n + [False] * (lmax - n)
        assert torch.all(batch["images"][b, n:] == 0) and torch.all(batch["masks"][b, n:] == 0)
        assert batch["layer_prompts"][b][n:] == [""] * (lmax - n) and len(batch["layer_prompts"][b]) == lmax
    assert batch["key"] == [i["key"] for i in items[:4]] and batch["num_layers"].tolist() == [i["num_layers"] for i in items[:4]]


def test_dataloader_workers_cover_each_sample_once(tmp_path):
    keys = write_mixed_shards(tmp_path, shards=4)
    loader = make_loader(tmp_path, batch_size=5, num_workers=2, size=32, shuffle_buffer=8)
    seen = [k for batch in loader for k in batch["key"]]
    assert sorted(seen) == sorted(keys)


@pytest.mark.parametrize("shards", [4, 1])  # whole shards per reader; sample-level split when too few
def test_ranks_partition_the_data(tmp_path, shards):
    keys = write_mixed_shards(tmp_path, shards=shards)
    parts = [[i["key"] for i in LayeredShardDataset(tmp_path, size=32, rank=r, world_size=3)] for r in range(3)]
    assert sorted(k for p in parts for k in p) == sorted(keys)
    assert all(parts)


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    write_mixed_shards(tmp_path, shards=4)

    def keys(seed, epoch=0):
        ds = LayeredShardDataset(tmp_path, size=32, shuffle_buffer=5, seed=seed)
        ds.set_epoch(epoch)
        return [i["key"] for i in ds]

    assert keys(0) == keys(0)
    assert keys(0) != keys(0, epoch=1) and sorted(keys(0)) == sorted(keys(0, epoch=1))
    unshuffled = [i["key"] for i in LayeredShardDataset(tmp_path, size=32, shuffle_buffer=0)]
    assert unshuffled == [f"s{s}-{i}" for s in range(4) for i in range(3)]


def test_layer_weights_oversample_deterministically(tmp_path):
    write_mixed_shards(tmp_path, shards=4)  # 4 samples each of 2, 3 and 4 layers

    def counts(weights, seed=0):
        ds = LayeredShardDataset(tmp_path, size=32, shuffle_buffer=0, seed=seed, layer_weights=weights)
        return [i["key"] for i in ds]

    got = counts({2: 0, 3: 1, 4: 3})
    layers = {f"s{s}-{i}": 2 + (s * 3 + i) % 3 for s in range(4) for i in range(3)}
    assert sorted(layers[k] for k in got) == [3] * 4 + [4] * 12
    assert counts({2: 0.5, 3: 1.5}) == counts({2: 0.5, 3: 1.5})
    assert len([i for i in LayeredShardDataset(tmp_path, size=32, max_layers=3)]) == 8


def test_repeat_streams_several_epochs(tmp_path):
    write_mixed_shards(tmp_path, shards=2)
    ds = LayeredShardDataset(tmp_path, size=32, shuffle_buffer=2, repeat=True)
    first = [i["key"] for i in itertools.islice(iter(ds), 18)]
    assert len(first) == 18 and sorted(first[:6]) == sorted(first[6:12])


def test_reader_rejects_missing_data(tmp_path):
    with pytest.raises(LayerDiffError, match="no .tar shards"):
        LayeredShardDataset(tmp_path)
    with pytest.raises(LayerDiffError, match="neither"):
        LayeredShardDataset(tmp_path / "nope")


# ---------------------------------------------------------------------------- the shuffle buffer
def _member_bytes(folder, keys) -> int:
    """The tar members' sizes of ``keys``, read with tarfile (not with the reader under test)."""
    total = 0
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            total += sum(m.size for m in tar.getmembers() if m.name.split(".", 1)[0] in keys)
    return total


def test_shuffle_buffer_holds_encoded_samples_and_decodes_them_on_the_way_out(tmp_path):
    """The buffer stores the shards' bytes (JSON + PNGs), not tensors: after the first sample has
    left a buffer large enough for the whole data set, it holds the other 11 samples' tar members,
    byte for byte, about a tenth of what they take decoded."""
    keys = write_mixed_shards(tmp_path, shards=4)
    ds = LayeredShardDataset(tmp_path, size=32, shuffle_buffer=64, seed=3)
    stream = iter(ds)
    first = next(stream)
    buffer = ds.buffer
    held = {item.key for item in buffer.items}
    assert len(buffer) == 11 and held == set(keys) - {first["key"]}
    assert all(isinstance(data, bytes) for item in buffer.items for data in item.members.values())
    assert {name for item in buffer.items for name in item.members} >= {"json", "bg.png", "fg1.png", "mask1.png"}
    assert buffer.nbytes == _member_bytes(tmp_path, held)
    rest = list(stream)
    decoded = sum(item["images"].numel() * 4 + item["masks"].numel() * 4 for item in rest)
    assert buffer.nbytes * 4 < decoded, (buffer.nbytes, decoded)
    assert len(buffer) == 0 and sorted(i["key"] for i in rest) == sorted(held)


def test_shuffled_samples_are_the_unshuffled_ones_decoded_identically(tmp_path):
    """With and without the buffer (and with layer-count oversampling, whose copies share one
    encoded record): the same samples, the same number of times, with identical tensors."""
    write_mixed_shards(tmp_path, shards=4)
    weights = {2: 1.0, 3: 2.0, 4: 1.5}

    def items(buffer, seed=5):
        return list(LayeredShardDataset(tmp_path, size=32, shuffle_buffer=buffer, seed=seed, layer_weights=weights))

    plain, shuffled = items(0), items(4)
    assert sorted(i["key"] for i in plain) == sorted(i["key"] for i in shuffled)
    assert [i["key"] for i in plain] != [i["key"] for i in shuffled]
    assert len(plain) > 12  # the weights really made copies
    by_key = {i["key"]: i for i in plain}
    for item in shuffled:
        ref = by_key[item["key"]]
        assert torch.equal(item["images"], ref["images"]) and torch.equal(item["masks"], ref["masks"])
        assert (item["global_prompt"], item["layer_prompts"], item["extra"]) == (
            ref["global_prompt"], ref["layer_prompts"], ref["extra"])
    # one seed, one order; another seed, another
    assert [i["key"] for i in items(4)] == [i["key"] for i in shuffled]
    assert [i["key"] for i in items(4, seed=6)] != [i["key"] for i in shuffled]


def test_shuffle_buffer_keeps_the_rank_and_worker_partition(tmp_path):
    keys = write_mixed_shards(tmp_path, shards=4)
    parts = [[i["key"] for i in LayeredShardDataset(tmp_path, size=32, shuffle_buffer=3, seed=2, rank=r, world_size=2)]
             for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(keys) and not set(parts[0]) & set(parts[1])
    # 2 ranks x 2 workers: four readers, each sample read by exactly one
    seen = [k for r in range(2) for batch in make_loader(tmp_path, batch_size=2, num_workers=2, size=32, shuffle_buffer=3,
                                                         seed=2, rank=r, world_size=2) for k in batch["key"]]
    assert sorted(seen) == sorted(keys)


# --------------------------------------------------------------------------------- shards at URLs


def test_shards_at_fsspec_urls_read_like_local_ones(tmp_path):
    """A folder URL, a glob and one shard's URL (fsspec's in-memory filesystem and file://) give the
    same records as the local folder; the training dataset streams from them."""
    import fsspec

    from layerdiff.data.reader import resolve_shards

    keys = write_mixed_shards(tmp_path, shards=2)
    fs = fsspec.filesystem("memory")
    root = f"/layerdiff-test-{tmp_path.name}"
    for p in sorted(tmp_path.glob("*.tar")):
        fs.pipe(f"{root}/data/{p.name}", p.read_bytes())
    fs.pipe(f"{root}/data/notes.txt", b"not a shard")
    try:
        urls = resolve_shards(f"memory://{root}/data")
        assert [u.rsplit("/", 1)[-1] for u in urls] == ["shard-000000.tar", "shard-000001.tar"]
        assert all(u.startswith("memory://") for u in urls)
        assert resolve_shards(f"memory://{root}/data/*.tar") == urls
        assert resolve_shards(urls[1]) == [urls[1]]
        local = [s for p in list_shards(tmp_path) for s in read_shard(p)]
        remote = list(LayeredShardDataset(f"memory://{root}/data", size=32, shuffle_buffer=0))
        assert [i["key"] for i in remote] == [s.key for s in local] == keys
        assert [i["key"] for i in LayeredShardDataset(f"file://{tmp_path}", size=32, shuffle_buffer=0)] == keys
        with pytest.raises(LayerDiffError, match="neither a folder of shards nor a .tar shard"):
            resolve_shards(f"memory://{root}/nothing-here")
    finally:
        fs.rm(root, recursive=True)
    with pytest.raises(LayerDiffError, match="fsspec cannot open this URL"):
        resolve_shards("nosuchscheme://bucket/data")
