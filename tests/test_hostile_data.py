"""Hostile and odd input to the data tools and the trainer (issue 25, class 4, and the training
numbers of class 2): ``data build``, ``data inspect``, ``train --config`` and ``train``'s numbers.

The library is driven with hypothesis (mutated shard JSON, mutated and truncated shards, sidecars of
any JSON and any nesting depth, image files of any bytes, training settings of any type); each must
end in a one-line LayerDiffError (or ValueError for a sidecar, which the builder counts) or succeed
with a valid result. The command line runs in a subprocess under an address-space limit and a
timeout: a refusal exits 1 with exactly one line on stderr, never a traceback or a signal, and no
file outside the output folder changes; a broken input file inside a build is skipped, counted by
its reason, and the build goes on. Set LAYERDIFF_FUZZ_REPORT=1 to print the counts per class and
the largest memory a subprocess reached.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import signal
import socket
import stat
import struct
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fuzz_support import print_fuzz_report, run_limited_cli
from PIL import Image

from layerdiff.data.format import (
    DamageCount,
    LayeredSample,
    decode_record,
    iter_readable_records,
    read_shard,
)
from layerdiff.data.mlcid import inputs as builder
from layerdiff.data.shard_writer import write_shard
from layerdiff.errors import LayerDiffError
from layerdiff.training.settings import TRAIN_SETTINGS, VAE_SETTINGS, TrainConfig, VaeTrainConfig

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 3 * 2**30  # RLIMIT_AS of each command-line run
TIMEOUT_S = 120
QUICK_S = 30  # a FIFO or device among the inputs must not cost more than an ordinary run
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
PEAK_RSS: dict[str, int] = {}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print_fuzz_report(COUNTS, PEAK_RSS)


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: a blocking open or read is interrupted by SIGALRM."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text and text.strip() == text and bool(text)


# ---------------------------------------------------------------------------- building inputs
def make_sample(key: str, k: int, size: int = 16) -> LayeredSample:
    rng = np.random.default_rng([k, size, sum(map(ord, key))])
    bg = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    fgs, masks = [], []
    for i in range(k):
        m = np.zeros((size, size), bool)
        m[2:-2, i:i + 3] = True
        fg = np.full((size, size, 3), 128, np.uint8)
        fg[m] = rng.integers(0, 256, (m.sum(), 3), dtype=np.uint8)
        fgs.append(Image.fromarray(fg, "RGB"))
        masks.append(Image.fromarray(m.astype(np.uint8) * 255, "L"))
    return LayeredSample(key, f"scene {key}", ["bg", *[f"thing {i}" for i in range(1, k + 1)]], bg, fgs, masks,
                         source="test", extra={"k": k, "nested": {"a": [1, 2]}})


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def members_of(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width`` x ``height``, with a few bytes of pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


_state: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def good_shard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    path = folder / "good-000000.tar"
    write_shard(path, [make_sample("a", 1), make_sample("b", 2), make_sample("c", 3)])
    _state["shard"] = path.read_bytes()
    _state["folder"] = folder
    _state["serial"] = itertools.count()
    return path


def shard_with(members: list[tuple[str, bytes]] | bytes) -> Path:
    data = members if isinstance(members, bytes) else tar_bytes(members)
    path = _state["folder"] / f"case{next(_state['serial'])}-000000.tar"
    path.write_bytes(data)
    return path


def good_members() -> list[tuple[str, bytes]]:
    return members_of(_state["shard"])


def read_everything(path: Path) -> tuple[int, DamageCount]:
    """Samples decoded and damage counted by the skipping reader; read_shard must agree."""
    damage = DamageCount()
    decoded = 0
    for key, members, _meta, shard in iter_readable_records([path], damage):
        try:
            decode_record(key, members, shard)
            decoded += 1
        except LayerDiffError as exc:
            assert one_line(str(exc)), str(exc)
            damage.add(exc)
    try:
        strict = sum(1 for _ in read_shard(path))
        assert not damage and strict == decoded
    except LayerDiffError as exc:
        assert damage and one_line(str(exc)) and str(path) in str(exc), str(exc)
    return decoded, damage


# ---------------------------------------------------------------------------- data inspect: the library
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=16)
META_KEYS = ["format", "key", "global_prompt", "background_prompt", "foreground_prompts", "source", "width", "height",
             "num_layers", "extra"]


@st.composite
def mutated_meta(draw):
    """The JSON of sample "b" (2 layers), with keys replaced, deleted or the whole thing swapped."""
    meta = json.loads(dict(good_members())["b.json"])
    how = draw(st.sampled_from(["replace", "delete", "whole", "several"]))
    if how == "whole":
        return draw(json_values)
    for _ in range(draw(st.integers(1, 3)) if how == "several" else 1):
        key = draw(st.sampled_from(META_KEYS))
        if how == "delete":
            meta.pop(key, None)
        else:
            meta[key] = draw(json_values | st.integers(-5, 40) | st.integers(10**6, 10**12))
    return meta


@FUZZ
@given(meta=mutated_meta())
def test_mutated_sample_json_is_one_clear_line_or_a_valid_sample(meta):
    members = [(n, json.dumps(meta).encode() if n == "b.json" else d) for n, d in good_members()]
    path = shard_with(members)
    decoded, damage = read_everything(path)
    assert decoded + damage.samples == 3 and not damage.shards
    if damage:
        assert "b.json" in damage.first or "b." in damage.first, damage.first
    else:
        sample = next(s for s in read_shard(path) if s.key == "b")
        sample.validate()  # what decodes can be written again
    COUNTS["class 4 inspect: mutated sample JSON (library)"]["refused" if damage else "valid"] += 1


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       depth=st.integers(0, 5000))
def test_sample_json_of_any_bytes_or_depth(raw, depth):
    text = raw if depth == 0 else b'{"num_layers": ' + b"[" * depth + b"]" * depth + b"}"
    members = [(n, text if n == "a.json" else d) for n, d in good_members()]
    decoded, damage = read_everything(shard_with(members))
    assert decoded == 2 and damage.samples == 1 and "a.json" in damage.first
    COUNTS["class 4 inspect: sample JSON of any bytes or depth (library)"]["refused"] += 1


@FUZZ
@given(cut=st.integers(0, 200_000))
def test_truncated_shard_is_damage_never_a_silent_short_read(cut):
    data = _state["shard"]
    cut = cut % (len(data) + 1)
    ends = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[-1]
    last_end = ends.offset_data + -(-ends.size // 512) * 512
    decoded, damage = read_everything(shard_with(data[:cut]))
    if cut >= last_end + 1024:
        assert decoded == 3 and not damage
    else:
        assert damage, f"a shard cut at byte {cut} of {len(data)} read as complete"
    COUNTS["class 4 inspect: truncated shard (library)"]["damage named" if damage else "complete"] += 1


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=6))
def test_flipped_bytes_are_damage_or_harmless(flips):
    data = bytearray(_state["shard"])
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    with deadline(30):
        decoded, damage = read_everything(shard_with(bytes(data)))
    assert decoded <= 3
    COUNTS["class 4 inspect: flipped bytes (library)"]["damage named" if damage else "harmless"] += 1


def _member_cases() -> dict[str, tuple[list[tuple[str, bytes]] | bytes, str]]:
    """Hostile shards: (members or raw bytes, the word the message must hold)."""
    good = good_members()
    by_name = dict(good)
    meta = json.loads(by_name["b.json"])

    def swap(name, data):
        return [(n, data if n == name else d) for n, d in good]

    def with_meta(**changes):
        m = {**meta, **changes}
        return swap("b.json", json.dumps({k: v for k, v in m.items() if v is not ...}).encode())

    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16)).save(jpeg, "JPEG")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    data = _state["shard"]
    second = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[2].offset
    broken_header = bytearray(data)
    broken_header[second + 148: second + 156] = b"garbage!"  # the checksum field
    huge_member = bytearray(data)
    claim = tarfile.TarInfo("b.json")
    claim.size = 10**12  # a terabyte, in a file of a few kilobytes
    huge_member[second: second + 512] = claim.tobuf(tarfile.GNU_FORMAT)[:512]
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 10**11  # extended attributes of 100 GB
    huge_pax = pax.tobuf(tarfile.GNU_FORMAT)[:512] + data
    last_b = max(i for i, (n, _) in enumerate(good) if n.startswith("b."))
    crowded = good[: last_b + 1] + [(f"b.x{i}", b"") for i in range(1000)] + good[last_b + 1:]
    return {
        "JSON is a list": (swap("b.json", b"[1, 2]"), "b.json"),
        "JSON is a string": (swap("b.json", b'"b"'), "b.json"),
        "JSON is null": (swap("b.json", b"null"), "b.json"),
        "num_layers missing": (with_meta(num_layers=...), "num_layers"),
        "num_layers a string": (with_meta(num_layers="2"), "num_layers"),
        "num_layers true": (with_meta(num_layers=True), "num_layers"),
        "num_layers a billion": (with_meta(num_layers=10**9), "num_layers"),
        "width missing": (with_meta(width=...), "width"),
        "width negative": (with_meta(width=-16), "width"),
        "foreground prompts a string": (with_meta(foreground_prompts="x"), "foreground_prompts"),
        "foreground prompts too few": (with_meta(foreground_prompts=[]), "foreground_prompts"),
        "extra a list": (with_meta(extra=[1]), "extra"),
        "JSON nested 100000 deep": (swap("b.json", b"[" * 100_000 + b"]" * 100_000), "b.json"),
        "JSON with NaN": (swap("b.json", b'{"num_layers": NaN}'), "b.json"),
        "JSON not UTF-8": (swap("b.json", b"\xff\xfe{}"), "b.json"),
        "decompression-bomb PNG header": (swap("b.bg.png", png_claiming(30000, 30000)), "b.bg.png"),
        "PNG header of another size": (swap("b.mask1.png", png_claiming(17, 16)), "b.mask1.png"),
        "PNG larger than its JSON says": (swap("b.fg1.png", png_claiming(8000, 8000)), "b.fg1.png"),
        "PNG truncated": (swap("b.mask1.png", by_name["b.mask1.png"][:40]), "b.mask1.png"),
        "JPEG member": (swap("b.bg.png", jpeg.getvalue()), "b.bg.png"),
        "EPS member (would run Ghostscript)": (swap("b.bg.png", eps), "b.bg.png"),
        "member missing": ([(n, d) for n, d in good if n != "b.mask1.png"], "b.mask1.png"),
        "not a tar file": (bytes(range(256)) * 16, "tar"),
        "empty file": (b"", "tar"),
        "truncated in a member": (data[: second + 700], "shard"),
        "truncated at a header": (data[:second], "truncated"),
        "damaged header mid-file": (bytes(broken_header), "damaged"),
        "a member claiming a terabyte": (bytes(huge_member), "tar"),
        "a PAX header claiming 100 GB": (huge_pax, "tar"),
        "a sample of 1000 members": (crowded, "members"),
    }


def test_hostile_shards_in_the_library_are_one_named_line():
    cases = _member_cases()
    for name, (members, word) in cases.items():
        path = shard_with(members)
        with deadline(30):
            decoded, damage = read_everything(path)
        assert damage, name
        assert word in damage.first and str(path) in damage.first and one_line(damage.first), (name, damage.first)
        COUNTS["class 4 inspect: named hostile shards (library)"]["refused"] += 1


def test_streaming_reader_skips_and_counts_a_damaged_sample(tmp_path, caplog):
    from layerdiff.data.reader import LayeredShardDataset

    (tmp_path / "x-000000.tar").write_bytes(_state["shard"])
    members = [(n, b"[1]" if n == "b.json" else d) for n, d in good_members()]
    (tmp_path / "x-000001.tar").write_bytes(tar_bytes(members))
    (tmp_path / "x-000002.tar").write_bytes(b"not a tar at all" * 64)
    ds = LayeredShardDataset(tmp_path, size=16, shuffle_buffer=0)
    with caplog.at_level("WARNING", logger="layerdiff.data"):
        keys = [item["key"] for item in ds]
    assert sorted(keys) == ["a", "a", "b", "c", "c"]
    assert "1 damaged samples and 1 damaged shards skipped" in caplog.text
    # an endless stream of nothing is refused instead of spinning
    (tmp_path / "x-000000.tar").unlink()
    for shard in tmp_path.glob("*.tar"):
        shard.write_bytes(b"junk" * 256)
    with pytest.raises(LayerDiffError, match="no usable samples"):
        next(iter(LayeredShardDataset(tmp_path, size=16, shuffle_buffer=0, repeat=True)))


# ---------------------------------------------------------------------------- data build: the library
@FUZZ
@given(data=json_values | st.builds(lambda objs: {"objects": objs}, json_values))
def test_sidecar_of_any_json_is_read_or_refused_with_a_reason(tmp_path, data):
    image = tmp_path / "photo.jpg"
    (tmp_path / "photo.json").write_text(json.dumps(data))
    try:
        sidecar = builder.read_sidecar(image, 0.5)
    except ValueError as exc:
        assert one_line(str(exc)) and "photo.json" in str(exc)
        COUNTS["class 4 build: sidecar of any JSON (library)"]["refused"] += 1
        return
    assert all(isinstance(p, str) and p for p in sidecar.phrases)
    assert all(len(d.box) == 4 and all(math.isfinite(v) for v in d.box) and isinstance(d.phrase, str)
               for d in sidecar.objects)
    COUNTS["class 4 build: sidecar of any JSON (library)"]["read"] += 1


@FUZZ
@given(depth=st.integers(1, 200_000), kind=st.sampled_from(["[", "{\"a\":"]))
def test_sidecar_nesting_of_any_depth_never_aborts(tmp_path, depth, kind):
    close = "]" if kind == "[" else "}"
    inner = '{"objects": []}' if kind == "{\"a\":" else "[]"
    (tmp_path / "photo.json").write_text(kind * depth + inner + close * depth)
    try:
        builder.read_sidecar(tmp_path / "photo.jpg")
        assert depth < builder.SIDECAR_DEPTH
    except ValueError as exc:
        assert one_line(str(exc)) and "photo.json" in str(exc)
    COUNTS["class 4 build: sidecar nesting depth (library)"]["handled"] += 1


@FUZZ
@given(raw=st.binary(max_size=2000) | st.builds(png_claiming, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)))
def test_image_file_of_any_bytes_is_an_image_or_a_counted_reason(tmp_path, raw):
    path = tmp_path / "photo.png"
    path.write_bytes(raw)
    image, scale, reason = builder.load_image(path)
    assert (image is None) == bool(reason)
    assert reason in ("", *builder.UNREADABLE_REASONS)
    COUNTS["class 4 build: image file of any bytes (library)"][reason or "image"] += 1


def _special_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Things that are not regular files, or not small ones: (path, the reason the builder counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)
    out["FIFO"] = (fifo, builder.NOT_A_FILE)
    sock_path = folder / "socket.png"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    _state.setdefault("sockets", []).append(sock)  # kept open for the module's lifetime
    out["socket"] = (sock_path, builder.NOT_A_FILE)
    (folder / "folder.jpg").mkdir()
    out["folder named like an image"] = (folder / "folder.jpg", builder.NOT_A_FILE)
    os.symlink("loop-b.jpg", folder / "loop-a.jpg")
    os.symlink("loop-a.jpg", folder / "loop-b.jpg")
    out["symlink loop"] = (folder / "loop-a.jpg", builder.UNREADABLE)
    out["symlink loop, other end"] = (folder / "loop-b.jpg", builder.UNREADABLE)
    os.symlink("gone.jpg", folder / "dangling.jpg")
    out["dangling symlink"] = (folder / "dangling.jpg", builder.MISSING)
    if os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", folder / "zero.png")
        out["link to /dev/zero"] = (folder / "zero.png", builder.NOT_A_FILE)
    with open(folder / "huge.jpg", "wb") as f:  # sparse: no disk used
        f.truncate(builder.MAX_IMAGE_BYTES + 1)
    out["file over the size limit"] = (folder / "huge.jpg", builder.TOO_LARGE)
    (folder / "bomb.png").write_bytes(png_claiming(30000, 30000))
    out["decompression-bomb PNG"] = (folder / "bomb.png", builder.TOO_LARGE)
    (folder / "big.png").write_bytes(png_claiming(9000, 9000))
    out["PNG over the pixel limit"] = (folder / "big.png", builder.TOO_LARGE)
    (folder / "nothing.png").write_bytes(b"")
    out["empty file"] = (folder / "nothing.png", builder.NOT_AN_IMAGE)
    (folder / "doc.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")
    out["EPS (would run Ghostscript)"] = (folder / "doc.eps", builder.NOT_AN_IMAGE)
    if not IS_ROOT:
        locked = folder / "locked.png"
        Image.new("RGB", (64, 64)).save(locked)
        locked.chmod(0)
        out["unreadable file"] = (locked, builder.UNREADABLE)
    return out


def test_special_files_are_skipped_with_their_reason(tmp_path):
    for name, (path, reason) in _special_files(tmp_path / "in").items():
        with deadline(20):
            image, _, got = builder.load_image(path)
        assert image is None and got == reason, (name, got)
        COUNTS["class 4 build: special input files (library)"]["skipped"] += 1


def test_special_sidecars_make_a_bad_sidecar_not_a_hang(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "pipe.json")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "socket.json"))
    _state.setdefault("sockets", []).append(sock)
    (folder / "folder.json").mkdir()
    os.mkfifo(folder / "pipe2.txt")
    os.symlink("loop2.json", folder / "loop.json")
    os.symlink("loop.json", folder / "loop2.json")
    with open(folder / "huge.json", "wb") as f:
        f.truncate(builder.MAX_SIDECAR_BYTES + 1)
    if os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", folder / "zero.json")
    (folder / "utf16.json").write_bytes('{"caption": "x"}'.encode("utf-16"))
    names = [p.stem for p in folder.iterdir() if p.stem != "loop2"]
    for name in names:
        with deadline(20), pytest.raises(ValueError) as exc:
            builder.read_sidecar(folder / f"{name}.jpg")
        assert name in str(exc.value) and one_line(str(exc.value)), str(exc.value)
        COUNTS["class 4 build: special sidecar files (library)"]["bad sidecar"] += 1


# ---------------------------------------------------------------------------- train settings: the library
def _allowed(key: str, value, rules) -> bool:
    rule = rules[key]
    if value is None:
        return rule.optional
    if rule.kind == "bool":
        return type(value) is bool
    if rule.kind == "choice":
        return isinstance(value, str) and value in rule.choices
    if rule.kind == "int":
        return type(value) is int and rule.lo <= value <= rule.hi
    if rule.kind == "float":
        return type(value) in (int, float) and math.isfinite(value) and rule.lo <= value <= rule.hi
    return True  # lists and maps: checked by the property below


setting_values = (st.integers(-(2**70), 2**70) | st.integers(-3, 3000) | st.booleans() | st.none()
                  | st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 1) | st.text(max_size=8)
                  | st.sampled_from(["constant", "cosine", "fp16", "no", "global", "channel", "1"])
                  | st.lists(st.integers(-2, 40), max_size=3) | st.dictionaries(st.text(max_size=3), json_scalars, max_size=3))


def near(rule) -> st.SearchStrategy:
    """Values of a setting's own type near and inside its range (half the draws), or anything."""
    if rule.kind == "int":
        inside = st.integers(rule.lo, min(rule.hi, rule.lo + 1000))
        edges = st.sampled_from([rule.lo - 1, rule.lo, rule.hi, rule.hi + 1])
    elif rule.kind == "float":
        inside = st.floats(rule.lo, rule.hi)
        edges = st.sampled_from([rule.lo, rule.hi, -1e-9, rule.hi * 1.0001 + 1e-9, math.nan, math.inf])
    elif rule.kind == "bool":
        inside = edges = st.booleans()
    elif rule.kind == "choice":
        inside = edges = st.sampled_from(rule.choices)
    else:
        inside = edges = setting_values
    return st.one_of(inside, edges, setting_values)


def settings_of(rules: dict, extra_keys: list[str]) -> st.SearchStrategy:
    keys = st.lists(st.sampled_from([*rules, *extra_keys]), max_size=4, unique=True)
    return keys.flatmap(lambda ks: st.fixed_dictionaries({k: near(rules[k]) if k in rules else setting_values for k in ks}))


@FUZZ
@given(data=settings_of(TRAIN_SETTINGS, ["stepz", "model"]))
def test_train_settings_of_any_type_are_refused_by_name_or_valid(data):
    try:
        cfg = TrainConfig.from_dict(data)
    except LayerDiffError as exc:
        msg = str(exc)
        assert one_line(msg) and any(str(k) in msg for k in data), msg
        COUNTS["class 4 train --config: settings of any type (library)"]["refused"] += 1
        return
    for key, value in data.items():
        if TRAIN_SETTINGS[key].kind in ("int", "float", "bool", "choice"):
            assert _allowed(key, value, TRAIN_SETTINGS), (key, value)
    assert cfg.steps >= 1 and all(math.isfinite(v) and v >= 0 for v in cfg.layer_weights.values())
    COUNTS["class 4 train --config: settings of any type (library)"]["valid"] += 1


@FUZZ
@given(data=settings_of(VAE_SETTINGS, ["stpes"]))
def test_vae_settings_of_any_type_are_refused_by_name_or_valid(data):
    try:
        VaeTrainConfig.from_dict(data, "vae.")
    except LayerDiffError as exc:
        assert one_line(str(exc)) and any(str(k) in str(exc) for k in data), str(exc)
        COUNTS["class 4 train --config: VAE settings of any type (library)"]["refused"] += 1
        return
    for key, value in data.items():
        if VAE_SETTINGS[key].kind in ("int", "float", "bool", "choice"):
            assert _allowed(key, value, VAE_SETTINGS), (key, value)
    COUNTS["class 4 train --config: VAE settings of any type (library)"]["valid"] += 1


def test_python_api_refuses_what_the_json_refuses():
    for kwargs in ({"steps": -5}, {"steps": 0}, {"steps": 2.5}, {"batch_size": True}, {"lr_new": float("nan")},
                   {"grad_clip": float("inf")}, {"seed": 2**64}, {"size": 100}, {"ema_decay": 1.0},
                   {"layer_weights": {"x": 1}}, {"layer_weights": {2: -1}}, {"drop_all": 0.9, "drop_layers": 0.2}):
        with pytest.raises(LayerDiffError) as exc:
            TrainConfig(**kwargs)
        assert next(iter(kwargs)) in str(exc.value) and one_line(str(exc.value))
        COUNTS["class 2 train numbers (library)"]["refused"] += 1


# ---------------------------------------------------------------------------- the command line
def run_cli(args: list[str], cwd: Path) -> tuple[int, str, str, int, float]:
    """(exit code, stdout, stderr, peak RSS in bytes, seconds) of ``python -m layerdiff ARGS`` under the limits."""
    return run_limited_cli(args, cwd, MEMORY_LIMIT, TIMEOUT_S)


def snapshot(folder: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every entry under ``folder`` (never opening what is not a regular file) but those under ``skip``."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if any(p == s or s in p.parents for s in skip) or name.startswith("cli-"):
                continue
            st_ = os.lstat(p)
            digest = ""
            if stat.S_ISREG(st_.st_mode) and st_.st_size < 2**24 and st_.st_mode & 0o444:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            found[str(p)] = (stat.S_IFMT(st_.st_mode), st_.st_size, st_.st_mtime_ns, digest)
    return found


def _refused(code: int, out: str, err: str, words: tuple[str, ...]) -> str:
    """'' when the run is a clean refusal naming ``words``, else what is wrong."""
    lines = err.strip().splitlines()
    if code < 0:
        return f"killed by signal {-code}"
    if code != 1:
        return f"exit {code}"
    if "Traceback" in out + err:
        return "traceback"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"{len(lines)} lines on stderr"
    missing = [w for w in words if w not in lines[0]]
    return f"message lacks {missing}" if missing else ""


def _run_all(cases: dict[str, tuple[list[str], tuple[str, ...]]], cwd: Path, label: str, out_of: Path, capsys,
             in_subprocess: tuple[str, ...]) -> None:
    """Every refusal case through ``main`` in this process (fast), and the cases named in
    ``in_subprocess`` again as ``python -m layerdiff`` under the memory limit and the timeout (two at
    a time; each starts a fresh interpreter, so the set is kept to one case of each kind). Each must
    be a clean refusal naming its words, and leave every file under ``cwd`` but those in
    ``out_of`` as it was."""
    from layerdiff.cli import main

    before = snapshot(cwd, skip=(out_of,))
    failures = []
    capsys.readouterr()
    for name, (argv, words) in cases.items():
        try:
            with deadline(60):
                code = main(argv)
            out, err = capsys.readouterr()
        except BaseException as exc:  # noqa: BLE001 - any escape is what this test looks for
            code, (out, err) = 99, capsys.readouterr()
            err += f"Traceback: {type(exc).__name__}: {exc}"
        why = _refused(code, out, err, words)
        COUNTS[label]["clean" if not why else "NOT CLEAN"] += 1
        if why:
            failures.append(f"{name}: {why}: {err[-600:]!r}")
    assert not failures, "\n".join(failures)
    if out_of.is_dir():  # what the in-process runs wrote there (contact sheets of the good samples)
        for child in out_of.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    chosen = {name: cases[name] for name in in_subprocess}
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(chosen, pool.map(lambda c: run_cli(c[0], cwd), chosen.values())))
    for name, (code, out, err, rss, _seconds) in results.items():
        PEAK_RSS[f"{label}: {name}"] = rss
        why = _refused(code, out, err, cases[name][1])
        COUNTS[f"{label} in a subprocess"]["clean" if not why else "NOT CLEAN"] += 1
        if why:
            failures.append(f"{name} (subprocess): {why}: {err[-600:]!r}")
    after = snapshot(cwd, skip=(out_of,))
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not failures, "\n".join(failures)
    assert not changed, f"files changed by refused runs: {changed[:5]}"
    assert max(PEAK_RSS.values()) < MEMORY_LIMIT


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    skdata = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        img.thumbnail((64, 64))
        img.save(folder / f"{name}.png")
    return folder


def _build(images: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "build", "--images", str(images), "--out", str(out), "--no-models", "--samples-per-shard", "64",
            "--classical-backend", "skimage", *extra]


@pytest.mark.slow
def test_build_goes_on_past_every_broken_input(photos, tmp_path):
    """Good photos among special files, a sidecar nested 100,000 deep and other broken sidecars:
    the build finishes quickly, keeps the good photos, and counts each bad file by its reason."""
    folder = tmp_path / "in"
    specials = _special_files(folder)
    for p in photos.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "chelsea.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "coffee.json").write_text(json.dumps({"objects": [{"box": [1, 2, 3]}]}))
    os.mkfifo(folder / "rocket.txt")  # a sidecar that is a pipe
    listing = tmp_path / "list.txt"  # a list names the folder too (a folder is walked into, not listed)
    listing.write_text("".join(f"in/{p.name}\n" for p in [*(v[0] for v in specials.values()), *photos.iterdir()]))
    before = snapshot(tmp_path)
    for source, out in ((folder, tmp_path / "out"), (listing, tmp_path / "out-list")):
        code, stdout, err, rss, seconds = run_cli(_build(source, out, "--phrases", "object"), tmp_path)
        PEAK_RSS[f"data build: broken inputs among photos ({source.name})"] = rss
        assert code == 0 and "Traceback" not in err, err[-2000:]
        assert seconds < QUICK_S, f"{seconds:.0f} s: a special file held the build up"
        summary = json.loads((out / "summary-1of1.json").read_text())
        listed = {k: v for k, v in specials.items() if source == listing or k != "folder named like an image"}
        expected = collections.Counter(reason for _, reason in listed.values())
        expected[builder.BAD_SIDECAR] += 3
        assert summary["unreadable"] == dict(expected), summary["unreadable"]
        assert summary["images_seen"] == len(listed) + 4 and summary["kept"] >= 1
        skipped = [line for line in err.splitlines() if line]
        assert all(line.startswith("MLCID: skipped ") for line in skipped), skipped
        assert len(skipped) == sum(expected.values())
    assert snapshot(tmp_path, skip=(tmp_path / "out", tmp_path / "out-list")) == before, "the build changed its inputs"
    COUNTS["class 4 build: special files among photos (CLI)"]["skipped and counted"] += 2 * len(specials) - 1
    # a sidecar nested 100,000 deep, one with a 3-number box, one that is a FIFO; in both builds
    COUNTS["class 4 build: broken sidecars among photos (CLI)"]["skipped and counted"] += 6


@pytest.mark.slow
def test_build_refusals_are_one_line(photos, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    os.mkfifo(tmp_path / "list.txt")
    os.mkfifo(tmp_path / "phrases.txt")
    (tmp_path / "in").mkdir()
    for p in photos.iterdir():
        (tmp_path / "in" / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    cases = {
        "--no-models without phrases": (_build(tmp_path / "in", out / "a"), ("nothing would name the objects", "--phrases", "first 4 images")),
        "an empty folder": (_build(tmp_path / "empty", out / "b"), ("--images", "no files")),
        "a FIFO as the .txt list": (_build(tmp_path / "list.txt", out / "c"), ("--images", "named pipe")),
        "--phrases @FIFO": (_build(tmp_path / "in", out / "d", "--phrases", f"@{tmp_path / 'phrases.txt'}"),
                            ("--phrases", "named pipe")),
        "--shard beyond the chunks": (_build(tmp_path / "in", out / "e", "--shard", "2/2"), ("--shard 2/2", "no work")),
        "--detector-threshold nan": (_build(tmp_path / "in", out / "f", "--detector-threshold", "nan"),
                                     ("--detector-threshold",)),
        "--max-detections -1": (_build(tmp_path / "in", out / "g", "--max-detections", "-1"), ("--max-detections",)),
        "--max-side 10**9": (_build(tmp_path / "in", out / "h", "--max-side", str(10**9)), ("--max-side",)),
        "--max-foregrounds 10**6": (_build(tmp_path / "in", out / "i", "--max-foregrounds", str(10**6)),
                                    ("--max-foregrounds",)),
        "--seed -1": (_build(tmp_path / "in", out / "j", "--seed", "-1"), ("--seed",)),
    }
    _run_all(cases, tmp_path, "class 4 build: refusals (CLI)", out, capsys,
             ("--no-models without phrases", "a FIFO as the .txt list", "--phrases @FIFO", "--detector-threshold nan"))
    # every case was refused before any work: not even an output folder was written
    assert not out.exists() or not list(out.iterdir())


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    from layerdiff.data.toy_dataset import generate_toy_dataset

    out = tmp_path_factory.mktemp("toy") / "data"
    generate_toy_dataset(out, 4, seed=0, size=32, samples_per_shard=4, workers=1)
    return out


@pytest.mark.slow
def test_inspect_names_the_damaged_shard_and_member(tmp_path, capsys):
    cases = {}
    sheets = tmp_path / "sheets"
    sheets.mkdir()
    for i, (name, (members, word)) in enumerate(_member_cases().items()):
        d = tmp_path / f"case{i}"
        d.mkdir()
        (d / "good-000000.tar").write_bytes(_state["shard"])
        (d / "bad-000001.tar").write_bytes(members if isinstance(members, bytes) else tar_bytes(members))
        cases[name] = (["data", "inspect", str(d), "--sheet", str(sheets / f"{i}.png"), "--count", "6"],
                       ("bad-000001.tar", word))
        cases[f"{name}, no sheet"] = (["data", "inspect", str(d), "--count", "0"], ("bad-000001.tar", word))
    _run_all(cases, tmp_path, "class 4 inspect: hostile shards (CLI)", sheets, capsys,
             ("JSON is a list", "num_layers missing", "JSON nested 100000 deep", "decompression-bomb PNG header",
              "not a tar file", "truncated in a member", "damaged header mid-file"))


@pytest.mark.slow
def test_inspect_sheet_is_never_overwritten_and_always_atomic(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    (d / "good-000000.tar").write_bytes(_state["shard"])
    os.mkfifo(d / "pipe-000001.tar")  # not a shard: never opened
    existing = tmp_path / "sheet.png"
    existing.write_bytes(b"the user's own file")
    (tmp_path / "dir.png").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    cases = {
        "an existing --sheet": (["data", "inspect", str(d), "--sheet", str(existing)], ("--sheet", "already exists")),
        "an existing default sheet": (["data", "inspect", str(d)], ("already exists",)),
        "a folder as --sheet": (["data", "inspect", str(d), "--sheet", str(tmp_path / "dir.png")], ("folder",)),
        "--sheet in a missing folder": (["data", "inspect", str(d), "--sheet", str(tmp_path / "no" / "s.png")],
                                        ("does not exist",)),
        "--sheet not a .png": (["data", "inspect", str(d), "--sheet", str(out / "s.jpg")], (".png",)),
        "--count a million": (["data", "inspect", str(d), "--count", "1000000", "--sheet", str(out / "a.png")],
                              ("--count",)),
        "--count -1": (["data", "inspect", str(d), "--count", "-1"], ("--count",)),
    }
    (d / "contact_sheet.png").write_bytes(b"an older sheet")
    _run_all(cases, tmp_path, "class 4 inspect: --sheet and --count (CLI)", out, capsys,
             ("an existing --sheet", "--count a million"))
    assert existing.read_bytes() == b"the user's own file"
    code, stdout, err, rss, _ = run_cli(["data", "inspect", str(d), "--sheet", str(existing), "--overwrite"], tmp_path)
    PEAK_RSS["data inspect --overwrite"] = rss
    assert code == 0 and err == "", err
    with Image.open(existing) as im:
        assert im.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "temporary files left"
    COUNTS["class 4 inspect: --sheet and --count (CLI)"]["clean"] += 1


def _train(data: Path, out: Path, *extra: str, preset: str = "tiny") -> list[str]:
    return ["train", "--preset", preset, "--data", str(data), "--out", str(out), *extra]


@pytest.mark.slow
def test_train_refuses_bad_numbers_and_configs_up_front(toy_data, tmp_path, capsys):
    out = tmp_path / "out"
    configs = tmp_path / "configs"
    configs.mkdir()

    def config(name: str, text: str | bytes) -> str:
        path = configs / f"{name}.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    os.mkfifo(configs / "fifo.json")
    numbers = {
        "--steps -5": (_train(toy_data, out, "--steps", "-5"), ("--steps -5",)),
        "--steps 0": (_train(toy_data, out, "--steps", "0"), ("--steps 0",)),
        "--steps 10**12": (_train(toy_data, out, "--steps", str(10**12)), ("--steps",)),
        "--batch-size 0": (_train(toy_data, out, "--batch-size", "0"), ("--batch-size 0",)),
        "--batch-size 10**6": (_train(toy_data, out, "--batch-size", str(10**6)), ("--batch-size",)),
        "--seed -1": (_train(toy_data, out, "--seed", "-1"), ("--seed -1",)),
        "--seed 2**64": (_train(toy_data, out, "--seed", str(2**64)), ("--seed",)),
        "--threads 0": (_train(toy_data, out, "--threads", "0"), ("--threads 0",)),
        "--threads -3": (_train(toy_data, out, "--threads", "-3"), ("--threads",)),
        "toy --vae-steps -1": (_train(toy_data, out, "--vae-steps", "-1", preset="toy"), ("--vae-steps",)),
        "toy --samples 0": (_train(toy_data, out, "--samples", "0", preset="toy"), ("--samples",)),
        "toy --steps -5": (_train(toy_data, out, "--steps", "-5", preset="toy"), ("--steps",)),
    }
    bad_configs = {
        "bad JSON": ('{"steps": 10', ("--config", "not valid JSON")),
        "JSON nested 100000 deep": ("[" * 100_000 + "]" * 100_000, ("--config", "nested")),
        "a list": ("[1, 2]", ("--config", "not a JSON object")),
        "null": ("null", ("--config",)),
        "not UTF-8": (b"\xff\xfe\x00{", ("--config", "UTF-8")),
        "steps a string": ('{"steps": "10"}', ("steps", "'10'")),
        "steps true": ('{"steps": true}', ("steps", "true")),
        "steps a float": ('{"steps": 10.5}', ("steps", "10.5")),
        "steps negative": ('{"steps": -5}', ("steps -5",)),
        "lr NaN": ('{"lr_new": NaN}', ("--config", "NaN")),
        "lr overflowing to inf": ('{"lr_new": 1e999}', ("--config",)),
        "lr 1e308": ('{"lr_new": 1e308}', ("lr_new",)),
        "an unknown key": ('{"stepz": 10}', ("stepz", "steps")),
        "a toy section for tiny": ('{"train": {"steps": 3}}', ("train", "--preset toy")),
        "layer_weights of words": ('{"layer_weights": {"two": 1}}', ("layer_weights",)),
        "mixed_precision unknown": ('{"mixed_precision": "fp8"}', ("mixed_precision", "fp8")),
        "size not a multiple of 8": ('{"size": 100}', ("size 100",)),
        "model not a string": ('{"model": 5}', ("model",)),
        "a repeated key": ('{"steps": 3, "steps": 4}', ("--config", "twice")),
    }
    toy_configs = {
        "toy: vae steps a string": ('{"vae": {"steps": "x"}}', ("vae.steps", "'x'")),
        "toy: vae unknown key": ('{"vae": {"stpes": 3}}', ("vae", "stpes")),
        "toy: decoder crop not a multiple of 8": ('{"decoder": {"crop": 60}}', ("crop 60",)),
        "toy: train a list": ('{"train": []}', ("train",)),
        "toy: train steps -5": ('{"train": {"steps": -5}}', ("train.steps -5",)),
        "toy: samples 0": ('{"samples": 0}', ("samples 0",)),
        "toy: top-level training key": ('{"steps": 5}', ("steps", "--preset toy")),
        "toy: calibration candidates NaN-free huge": ('{"calibration": {"candidates": [1e300]}}', ("candidates",)),
        "toy: unet widths a string": ('{"unet": {"block_out_channels": "wide"}}', ("unet",)),
    }
    cases = dict(numbers)
    for name, (text, words) in bad_configs.items():
        cases[f"config: {name}"] = (_train(toy_data, out, "--config", config(name.replace(" ", "_"), text)), words)
    for name, (text, words) in toy_configs.items():
        cases[f"config: {name}"] = (_train(toy_data, out, "--config", config(name.replace(" ", "_").replace(":", ""), text),
                                           preset="toy"), words)
    cases["config: a FIFO"] = (_train(toy_data, out, "--config", str(configs / "fifo.json")), ("--config", "named pipe"))
    cases["config: a folder"] = (_train(toy_data, out, "--config", str(configs)), ("--config", "folder"))
    cases["config: missing"] = (_train(toy_data, out, "--config", str(configs / "none.json")), ("--config", "does not exist"))
    # numbers are class 2; --config content is class 4
    label = "class 2 and 4 train: refusals (CLI)"
    data_before = snapshot(toy_data)
    _run_all(cases, tmp_path, label, out, capsys,
             ("--steps -5", "--seed 2**64", "toy --samples 0", "config: bad JSON", "config: JSON nested 100000 deep",
              "config: steps a string", "config: toy: vae steps a string", "config: a FIFO",
              "config: toy: unet widths a string"))
    assert not out.exists(), "a refused run must not create its output folder"
    assert snapshot(toy_data) == data_before
    COUNTS["class 2 train numbers (CLI)"]["clean"] += len(numbers)
    COUNTS["class 4 train --config (CLI)"]["clean"] += len(cases) - len(numbers)
