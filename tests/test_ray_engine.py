"""``data build --engine ray``: Ray Data for real (a local Ray of 2 CPUs, one session per module),
the classical fallbacks on photographs shipped with scikit-image.

Checked: the same samples, byte for byte, as the local engine, with de-duplication and the
sharpness filter on; resume (a deleted shard alone is rebuilt); growth (a new image rebuilds only
its bucket's shard); the checks that run before Ray starts. The screening functions are checked on
their own first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import ray  # CI installs ray[data] through requirements-dev.txt: a missing one fails here, loudly
from PIL import Image, ImageFilter

from layerdiff.cli import main
from layerdiff.data.format import iter_shard_records, list_shards, read_shard
from layerdiff.data.mlcid import hash_layout, screening
from layerdiff.errors import LayerDiffError

skdata = pytest.importorskip("skimage.data", reason="the test photographs ship with scikit-image: pip install scikit-image")


def _photo(name: str, side: int = 128) -> Image.Image:
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    img.thumbnail((side, side), Image.LANCZOS)
    return img


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Five photos (one with a sidecar), a near-duplicate, a flat image and a non-image."""
    d = tmp_path_factory.mktemp("ray-images")
    (d / "sub").mkdir()
    for name in ("astronaut", "chelsea", "camera", "rocket"):
        _photo(name).save(d / f"{name}.jpg", quality=92)
    _photo("coffee").save(d / "sub" / "coffee.png")
    (d / "sub" / "coffee.json").write_text(json.dumps({
        "caption": "a cup of coffee on a saucer",
        "objects": [{"phrase": "cup of coffee", "box": [30, 10, 100, 75]}],
    }))
    # a re-encoded, resized copy that sorts after the original: the original stays
    _photo("astronaut", 120).save(d / "sub" / "zz-astronaut-copy.png")
    Image.new("RGB", (96, 96), (40, 120, 200)).save(d / "flat.png")
    (d / "notes.bin").write_bytes(b"not an image")
    return d


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _argv(images, out, *extra):
    return ["data", "build", "--images", str(images), "--out", str(out), "--no-models", "--phrases", "object, thing",
            "--samples-per-shard", "2", *extra]


def _ray_argv(images, out, *extra):
    return _argv(images, out, "--engine", "ray", "--workers", "1", *extra)


def _records(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard in ``out``: key -> {member suffix: bytes}."""
    found = {}
    for shard in list_shards(out):
        for key, members in iter_shard_records(shard):
            assert key not in found, f"{key} is in two shards"
            found[key] = members
    return found


def _stamps(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary-ray.json").read_text())


@pytest.fixture(scope="module")
def ray_out(image_dir, ray_session, tmp_path_factory) -> Path:
    """One Ray build shared by the tests below (each copies it before changing anything)."""
    out = tmp_path_factory.mktemp("ray-build") / "out"
    assert main(_ray_argv(image_dir, out)) == 0
    return out


# ---------------------------------------------------------------------------------------------
# screening, pure functions


def test_hashes_come_from_the_cache_unless_an_input_changed(image_dir, tmp_path):
    """The dHash cache: a second pass decodes nothing, a changed file is hashed again, a damaged
    cache is ignored, and the duplicates found are the same either way."""
    from layerdiff.data.mlcid.inputs import list_inputs

    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    inputs = list_inputs(images)
    asked: list[list[str]] = []

    def hasher(part):
        asked.append(sorted(rel for rel, _ in part))
        return screening.hash_inputs(part)

    cache = tmp_path / screening.CACHE_NAME
    config = screening.ScreenConfig()
    first = screening.duplicates_of(inputs, config, hasher=hasher, cache=cache)
    assert first == screening.duplicates_of(inputs, config) and first  # the copy of the astronaut
    assert len(asked[0]) == len(inputs) and cache.is_file()
    assert screening.duplicates_of(inputs, config, hasher=hasher, cache=cache) == first
    assert len(asked) == 1  # nothing decoded again
    _photo("coffee", 100).save(images / "rocket.jpg", quality=80)  # another picture under a known name
    again = screening.duplicates_of(inputs, config, hasher=hasher, cache=cache)
    assert asked[1] == ["rocket.jpg"] and again == screening.duplicates_of(inputs, config)
    cache.write_text("{not json")
    assert screening.duplicates_of(inputs, config, hasher=hasher, cache=cache) == again
    assert len(asked[2]) == len(inputs)


def test_dhash_matches_copies_and_tells_photos_apart():
    astronaut = _photo("astronaut")
    copy = _photo("astronaut", 120).filter(ImageFilter.GaussianBlur(0.6))
    assert screening.hamming(screening.dhash(astronaut), screening.dhash(copy)) <= 4
    others = [screening.dhash(_photo(n)) for n in ("coffee", "chelsea", "camera", "rocket")]
    assert min(screening.hamming(screening.dhash(astronaut), h) for h in others) > 16


def test_find_duplicates_keeps_the_first_by_path_greedily():
    hashes = {"b.jpg": 0b0000, "a.jpg": 0b0011, "c.jpg": 0b0111, "d.jpg": 1 << 63}
    # a (kept); b is 2 bits from a; c is 1 bit from a; d is far from everything
    assert screening.find_duplicates(hashes, 2) == {"b.jpg": "a.jpg", "c.jpg": "a.jpg"}
    assert screening.find_duplicates(hashes, 0) == {}
    assert screening.find_duplicates({**hashes, "e.jpg": 0b0011}, 0) == {"e.jpg": "a.jpg"}
    assert screening.find_duplicates(hashes, -1) == {}
    # greedy against kept images only: x ~ y ~ z, but z is 4 bits from x, the one kept
    assert screening.find_duplicates({"x": 0, "y": 0b11, "z": 0b1111}, 2) == {"y": "x"}
    rng = np.random.default_rng(0)  # the block index finds what a full pairwise scan finds
    many = {f"{i:04d}": int(v) for i, v in enumerate(rng.integers(0, 2**16, 300))}
    brute, kept = {}, []
    for rel in sorted(many):
        match = [k for k in kept if screening.hamming(many[rel], many[k]) <= 3]
        if match:
            brute[rel] = min(match)
        else:
            kept.append(rel)
    assert screening.find_duplicates(many, 3) == brute


def test_sharpness_separates_photos_from_flat_and_blurred_images():
    photo = _photo("chelsea")
    assert screening.sharpness(photo) > 100
    assert screening.sharpness(Image.new("RGB", (64, 64), (10, 200, 30))) == 0.0
    assert 0.5 < screening.sharpness(photo.filter(ImageFilter.GaussianBlur(4))) < 5
    with pytest.raises(LayerDiffError, match="--dedup-distance"):
        screening.ScreenConfig(dedup_distance=65)
    with pytest.raises(LayerDiffError, match="--min-sharpness"):
        screening.ScreenConfig(min_sharpness=-1)


def test_bucket_rule_is_the_documented_one():
    for rel in ("a.jpg", "sub/coffee.png", "ünïcode/ß.jpg"):
        digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()
        assert hash_layout.bucket_of(rel, 7) == int(digest[:8], 16) % 7


def test_a_folder_built_before_screening_resumes_with_screening_off(image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    off = ("--dedup-distance", "-1", "--min-sharpness", "0")
    assert main(_argv(image_dir, out, *off)) == 0
    for stats in out.glob("*.stats.json"):  # as builds before screening wrote them
        data = json.loads(stats.read_text())
        del data["screening"]
        stats.write_text(json.dumps(data))
    stamps = _stamps(out)
    capsys.readouterr()
    assert main(_argv(image_dir, out)) == 1  # the defaults screen: refused, naming the way back
    assert "--dedup-distance -1 --min-sharpness 0.0" in capsys.readouterr().err
    assert main(_argv(image_dir, out, *off)) == 0
    assert json.loads((out / "summary-1of1.json").read_text())["chunks"]["built"] == 0 and _stamps(out) == stamps


# ---------------------------------------------------------------------------------------------
# checks before Ray starts (these run before the module's Ray session exists)


def test_missing_models_are_named_before_ray_starts(image_dir, tmp_path, capsys, monkeypatch):
    assert not ray.is_initialized()
    out = tmp_path / "out"
    argv = ["data", "build", "--images", str(image_dir), "--out", str(out), "--engine", "ray", "--captioner",
            "nobody/no-such-captioner", "--detector", "nobody/no-such-detector", "--segmenter", "fallback",
            "--depth", "fallback", "--inpainter", "fallback"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--captioner 'nobody/no-such-captioner'" in err and "--detector 'nobody/no-such-detector'" in err
    assert "--fallback classical" in err and len(err.strip().splitlines()) == 1
    assert not ray.is_initialized() and not out.exists()
    # without Ray installed: one line naming the install
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(_ray_argv(image_dir, out)) == 1
    assert 'pip install "ray[data]"' in capsys.readouterr().err
    monkeypatch.undo()
    # flags of the other engine
    assert main(_ray_argv(image_dir, out, "--shard", "1/2")) == 1
    assert "--shard 1/2 is for --engine local" in capsys.readouterr().err
    assert main(_argv(image_dir, out, "--workers", "2")) == 1
    assert "--engine ray" in capsys.readouterr().err
    assert main(_ray_argv(image_dir, out, "--workers", "0")) == 1
    assert "--workers 0" in capsys.readouterr().err
    assert not ray.is_initialized()


# ---------------------------------------------------------------------------------------------
# builds on Ray


def test_ray_gives_the_same_samples_as_local(image_dir, ray_out, tmp_path, capsys):
    local = tmp_path / "local"
    assert main(_argv(image_dir, local)) == 0
    from_local, from_ray = _records(local), _records(ray_out)
    assert sorted(from_ray) == sorted(from_local) and len(from_ray) == 5
    for key, members in from_local.items():
        assert from_ray[key] == members, f"sample {key} differs between the engines"
    s_local = json.loads((local / "summary-1of1.json").read_text())
    s_ray = _summary(ray_out)
    for field in ("images_seen", "kept", "unreadable", "rejected", "dropped_detections", "samples_by_layers",
                  "settings_sha", "screening"):
        assert s_ray[field] == s_local[field], field
    assert s_ray["rejected"] == {"duplicate": 1, "too_blurry": 1} and s_ray["unreadable"] == {"not_an_image": 1}
    # content-addressed: each sample sits in the bucket its source's name hashes to
    buckets = s_ray["layout"]["buckets"]
    assert buckets == 4  # ceil(8 inputs / 2 per shard)
    for shard in list_shards(ray_out):
        assert shard.name.startswith(f"mlcid-hashof{buckets:03d}-")
        for sample in read_shard(shard):
            assert shard.name == f"mlcid-hashof{buckets:03d}-{hash_layout.bucket_of(sample.source, buckets):06d}.tar"
    # the report: counts, and seconds and rates of every step
    steps = s_ray["steps"]
    assert {"hash", "load", "pipeline", "segmenter", "inpainter", "write"} <= set(steps)
    assert steps["load"]["items"] == 7 and steps["hash"]["items"] == 8 and steps["write"]["items"] == 5
    assert all(v["seconds"] >= 0 for v in steps.values())
    assert s_ray["this_run"]["images_per_s"] > 0 and s_ray["shards"]["built"] == len(list_shards(ray_out))


def test_ray_rerun_rebuilds_only_a_deleted_shard(ray_out, image_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ray_out, out)  # copy2: mtimes kept
    stamps = _stamps(out)
    assert main(_ray_argv(image_dir, out)) == 0  # nothing to do
    assert _summary(out)["shards"]["built"] == 0 and _stamps(out) == stamps
    victim = sorted(stamps)[1]
    before = (out / victim).read_bytes()
    (out / victim).unlink()
    assert main(_ray_argv(image_dir, out)) == 0
    summary = _summary(out)
    assert summary["shards"]["built"] == 1 and summary["kept"] == 5
    after = _stamps(out)
    assert {k: v for k, v in after.items() if k != victim} == {k: v for k, v in stamps.items() if k != victim}
    assert (out / victim).read_bytes() == before
    # other settings into the same folder are refused, not mixed
    assert main(_ray_argv(image_dir, out, "--min-area", "0.02")) == 1
    assert main(_ray_argv(image_dir, out, "--dedup-distance", "-1")) == 1
    assert _stamps(out) == after
    # nor does the local engine write into a folder of Ray shards
    assert main(_argv(image_dir, out)) == 1


def test_a_new_image_rebuilds_only_its_shard(ray_out, image_dir, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(image_dir, images)
    shutil.copytree(ray_out, out)
    stamps = _stamps(out)
    _photo("coffee").rotate(90).save(images / "new-coffee-turned.jpg", quality=92)
    assert main(_ray_argv(images, out)) == 0
    summary = _summary(out)
    assert summary["shards"]["built"] == 1 and summary["images_seen"] == 9 and summary["layout"]["buckets"] == 4
    grown = f"mlcid-hashof004-{hash_layout.bucket_of('new-coffee-turned.jpg', 4):06d}.tar"
    after = _stamps(out)
    assert {k: v for k, v in after.items() if k != grown} == {k: v for k, v in stamps.items() if k != grown}
    assert grown not in stamps or after[grown] != stamps[grown]
    assert summary["kept"] == 6 and "new-coffee-turned.jpg" in {s.source for s in read_shard(out / grown)}


def test_a_setup_error_in_an_actor_reaches_the_driver_as_its_own_message():
    """Ray Data keeps only the text of an actor's exception: the actor class (called directly here)
    hands a LayerDiffError back in its rows, and the driver's sink raises it."""
    from layerdiff.data.mlcid.factory import StageOptions, StageSpecs
    from layerdiff.data.mlcid.pipeline import PipelineConfig
    from layerdiff.data.mlcid.ray_engine import PipelineWorker, _ShardSink
    from layerdiff.data.mlcid.timing import StepClock

    specs = StageSpecs(captioner="none", detector="fallback", segmenter="none", depth="fallback", inpainter="fallback")
    worker = PipelineWorker(specs, StageOptions(), PipelineConfig(), gpus=0.0)
    obj = {"dtype": object}
    rows = worker({"bucket": np.array([0]), "rel": np.array(["a.jpg"], **obj), "table": np.array([""], **obj),
                   "reason": np.array([""], **obj), "payload": np.array([b"unused"], **obj), "load_s": np.array([0.0])})
    assert "cannot be left out" in rows["fatal"][0]
    row = {k: v[0] for k, v in rows.items()}
    with pytest.raises(LayerDiffError, match="--segmenter none"):
        _ShardSink([], {}, "", None, StepClock()).add(row)
