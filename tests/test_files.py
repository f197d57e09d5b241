"""layerdiff.io.files: safetensors reading/writing and the refusal of pickles and broken files."""

import json
import pickle
import struct

import pytest
import torch

from layerdiff.errors import CheckpointError
from layerdiff.io.files import read_safetensors, read_safetensors_header, save_safetensors_atomic


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.arange(5, dtype=torch.int64)}


def test_round_trip_with_metadata_and_header(tmp_path):
    path = save_safetensors_atomic(
        _tensors(), tmp_path / "m.safetensors", metadata={"format": "pt", "k": "v"}
    )
    tensors, meta = read_safetensors(path)
    assert meta == {"format": "pt", "k": "v"}
    assert all(torch.equal(tensors[k], v) for k, v in _tensors().items())
    header, meta2 = read_safetensors_header(path)
    assert header == {"a.weight": ("F32", (3, 4)), "b.bias": ("I64", (5,))} and meta2 == meta
    only, _ = read_safetensors(path, keys=["b.bias"])
    assert list(only) == ["b.bias"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind


def test_shared_and_non_contiguous_tensors_are_saved(tmp_path):
    base = torch.randn(4, 6)
    tensors = {"w": base, "tied": base, "view": base[:2], "t": base.t()}
    tensors_read, _ = read_safetensors(save_safetensors_atomic(tensors, tmp_path / "s.safetensors"))
    assert all(torch.equal(tensors_read[k], v) for k, v in tensors.items())


def test_existing_file_needs_overwrite(tmp_path):
    path = save_safetensors_atomic(_tensors(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="already exists: pass overwrite=True"):
        save_safetensors_atomic({"x": torch.zeros(1)}, path)
    save_safetensors_atomic({"x": torch.zeros(1)}, path, overwrite=True)
    assert list(read_safetensors(path)[0]) == ["x"]


def test_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write to folder .*not_a_folder"):
        save_safetensors_atomic(_tensors(), blocker / "m.safetensors")


def test_missing_file_lists_nearby_names(tmp_path):
    save_safetensors_atomic(_tensors(), tmp_path / "v1-5-pruned-emaonly.safetensors")
    save_safetensors_atomic(_tensors(), tmp_path / "other.safetensors")
    with pytest.raises(
        CheckpointError, match=r"model file not found: .*v1-5-pruned\.safetensors; .* v1-5-pruned-emaonly"
    ):
        read_safetensors(tmp_path / "v1-5-pruned.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_safetensors_header(tmp_path / "nowhere" / "m.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_safetensors(tmp_path)


class _Trap:
    """Unpickling this creates a file: proves the loader never unpickles."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "disguised.safetensors"])
def test_pickles_are_refused_by_suffix_and_magic(tmp_path, name):
    path = tmp_path / name
    torch.save({"w": torch.zeros(2)}, path)  # a zip archive of pickles
    with pytest.raises(CheckpointError, match="is a pickle checkpoint; LayerDiff loads only .safetensors"):
        read_safetensors(path)


def test_raw_pickle_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "raw.safetensors"
    path.write_bytes(pickle.dumps(_Trap(marker), protocol=2))
    for reader in (read_safetensors, read_safetensors_header):
        with pytest.raises(CheckpointError, match="pickle checkpoint"):
            reader(path)
    assert not marker.exists()


def test_header_length_that_looks_like_pickle_magic_is_fine(tmp_path):
    # A header of 640 bytes starts the file with 0x80 0x02, the bytes of a protocol-2 pickle.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (640 - len(header))
    path = tmp_path / "ok.safetensors"
    path.write_bytes(struct.pack("<Q", 640) + header + struct.pack("<2f", 1.0, 2.0))
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert torch.equal(read_safetensors(path)[0]["w"], torch.tensor([1.0, 2.0]))


def _corrupt_cases(tmp_path):
    good = save_safetensors_atomic(_tensors(), tmp_path / "good.safetensors").read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    bad_offsets = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4000]}}).encode()
    return {
        "truncated": good[:-7],
        "header_too_long": struct.pack("<Q", 10**6) + good[8:],
        "bad_json": good[:8] + b"{" + b"\x00" * (n - 1) + good[8 + n :],
        "offsets_past_end": struct.pack("<Q", len(bad_offsets)) + bad_offsets + b"\x00" * 16,
        "tiny": b"\x01\x02",
    }


@pytest.mark.parametrize("case", ["truncated", "header_too_long", "bad_json", "offsets_past_end", "tiny"])
def test_truncated_or_corrupt_files(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(_corrupt_cases(tmp_path)[case])
    for reader in (read_safetensors, read_safetensors_header):
        with pytest.raises(CheckpointError, match=rf"{case}\.safetensors is truncated or corrupt"):
            reader(path)


def test_tensors_are_read_into_memory_of_their_own_with_any_dtype(tmp_path):
    """Every dtype reads back bit-exact and 64-byte aligned, ``dtype`` converts only floating tensors,
    and the tensors own their memory: rewriting the file in place afterwards changes none of them
    (a memory-mapped tensor would change, or fault)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(), "i64": torch.arange(5), "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    ours, _ = read_safetensors(path)
    reference = load_file(str(path))
    for k, v in reference.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
        assert ours[k].data_ptr() % 64 == 0 or ours[k].numel() == 0, k
    converted, _ = read_safetensors(path, dtype=torch.float64, keys=["f16", "i64", "bool"])
    assert converted["f16"].dtype == torch.float64 and torch.equal(converted["f16"], tensors["f16"].double())
    assert converted["i64"].dtype == torch.int64 and converted["bool"].dtype == torch.bool
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the same file, its bytes overwritten in place
        f.seek(size // 2)
        f.write(b"\xff" * (size - size // 2))
    for k in reference:
        assert torch.equal(ours[k], tensors[k]), k
