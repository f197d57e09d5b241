"""MLCID builder: every stage for real, on photographs shipped with scikit-image.

Model stages run tiny random-weight models of the real classes (tests/mlcid_tiny_models.py), saved
and loaded through the builder's loaders; their outputs are meaningless, so the tests check
structure: output format, masks inside their boxes, no overlap, back-to-front order consistent
with depth, counts of skipped files, resume, sharding and atomic shards.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layerdiff.cli import main
from layerdiff.data.format import list_shards, read_shard
from layerdiff.data.mlcid import builder
from layerdiff.data.mlcid import filters as F
from layerdiff.data.mlcid.classical import (
    BoxBottomDepth,
    ClassicalInpainter,
    ClassicalSegmenter,
    SaliencyDetector,
    classical_backend,
    dilate,
)
from layerdiff.data.mlcid.factory import StageOptions, StageSpecs, make_stages
from layerdiff.data.mlcid.phrases import RulePhraseExtractor, parse_phrase_list
from layerdiff.data.mlcid.pipeline import KEPT, MLCIDPipeline, PipelineConfig
from layerdiff.data.shard_writer import write_shard
from layerdiff.errors import LayerDiffError

skdata = pytest.importorskip("skimage.data", reason="the test photographs ship with scikit-image: pip install scikit-image")
torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
import mlcid_tiny_models  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea")


def _have(backend: str) -> bool:
    try:
        return classical_backend(backend) == backend
    except LayerDiffError:
        return False


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _have(b), reason=f"{b} not installed")) for b in ("cv2", "skimage")]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models are dominated by thread start-up; on a loaded 2-core machine 2 threads are 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    out = {}
    for name in PHOTOS:
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        img.thumbnail((128, 128), Image.LANCZOS)
        out[name] = img
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return mlcid_tiny_models.save_all(tmp_path_factory.mktemp("mlcid-models"))


@pytest.fixture
def image_dir(tmp_path, photos) -> Path:
    """Three photos, one sidecar, one non-image and one truncated JPEG."""
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    photos["astronaut"].save(d / "astronaut.jpg", quality=92)
    photos["coffee"].save(d / "sub" / "coffee.png")
    photos["chelsea"].save(d / "chelsea.jpg", quality=92)
    (d / "sub" / "coffee.json").write_text(json.dumps({
        "caption": "a cup of coffee on a saucer",
        "objects": [{"phrase": "cup of coffee", "box": [30, 10, 100, 75]}],
    }))
    (d / "notes.bin").write_bytes(b"not an image at all")
    jpeg = (d / "chelsea.jpg").read_bytes()
    (d / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    return d


# ---------------------------------------------------------------------------------------------
# checks shared by the end-to-end tests


def _check_sample(sample, cfg: F.FilterConfig | None = None) -> None:
    """Format, masks inside boxes, no overlap, area range, grey outside masks, back-to-front by depth."""
    cfg = cfg or F.FilterConfig()
    w, h = sample.size
    k = len(sample.foregrounds)
    assert 1 <= k <= cfg.max_foregrounds
    assert len(sample.layer_prompts) == k + 1 and all(isinstance(p, str) and p for p in sample.layer_prompts)
    assert sample.background.mode == "RGB" and sample.background.size == (w, h)
    extra = sample.extra
    assert len(extra["boxes"]) == len(extra["depths"]) == len(extra["phrases"]) == k
    masks = [np.asarray(m) for m in sample.masks]
    covered = np.zeros((h, w), bool)
    for mask, fg, box in zip(masks, sample.foregrounds, extra["boxes"]):
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        m = mask == 255
        # box corners were rounded to 0.01 px when stored
        box = (box[0] - 0.01, box[1] - 0.01, box[2] + 0.01, box[3] + 0.01)
        assert not (m & ~F.box_mask(box, h, w)).any(), "mask leaks outside its box"
        assert not (m & covered).any(), "foreground masks overlap"
        covered |= m
        assert cfg.min_area <= m.mean() <= cfg.max_area
        assert (np.asarray(fg)[~m] == 128).all(), "foreground is not grey outside its mask"
    depths = [d for d in extra["depths"] if d is not None]
    assert depths == sorted(depths, reverse=True), "layers are not ordered back (far) to front (near)"


# ---------------------------------------------------------------------------------------------
# pure functions


def test_phrases_from_captions():
    ex = RulePhraseExtractor()
    assert ex.phrases("a man in a space suit holding a helmet") == ["man", "space suit", "helmet"]
    assert ex.phrases("there is a cup of coffee on a wooden table") == ["cup of coffee", "wooden table"]
    assert ex.phrases("arafed cat laying on a couch next to a remote control") == ["cat", "couch", "remote control"]
    assert ex.phrases("a photo of two dogs and a red ball") == ["dogs", "red ball"]
    assert ex.phrases("") == [] and ex.phrases("a close up view") == []
    # participles ending a piece are verbs, before a noun adjectives; times are not objects; a group
    # word heading "X of Y" stays
    assert ex.phrases("a rocket launched into the night sky") == ["rocket", "night sky"]
    assert ex.phrases("a city street at night with cars parked") == ["city street", "cars"]
    assert ex.phrases("a large stuffed animal on a striped bed") == ["large stuffed animal", "striped bed"]
    assert ex.phrases("a bunch of coins on a table at sunset") == ["bunch of coins", "table"]
    assert ex.phrases("a lot of people walking") == ["people"]
    assert parse_phrase_list("cat, dog\n# comment\n\nred ball; cat") == ["cat", "dog", "red ball"]


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_filter_detections_reasons():
    cfg = F.FilterConfig(min_area=0.01, max_area=0.6, max_foregrounds=3, max_overlap=0.2, duplicate_iou=0.7)
    masks = [
        _rect(100, 100, 0, 20, 0, 20),  # 0: 4%, best
        _rect(100, 100, 0, 20, 1, 21),  # 1: duplicate of 0
        _rect(100, 100, 10, 30, 10, 30),  # 2: overlaps 0 by 25% of the smaller
        _rect(100, 100, 90, 95, 90, 95),  # 3: 0.25%, too small
        _rect(100, 100, 0, 100, 30, 100),  # 4: 70%, too large
        _rect(100, 100, 40, 60, 0, 20),  # 5: kept
        _rect(100, 100, 40, 60, 40, 60),  # 6: kept
        _rect(100, 100, 70, 90, 0, 20),  # 7: a fourth foreground
        np.zeros((100, 100), bool),  # 8: empty
    ]
    scores = [0.9, 0.8, 0.7, 0.95, 0.99, 0.6, 0.5, 0.4, 0.3]
    r = F.filter_detections(masks, scores, cfg)
    assert r.kept == [0, 5, 6]
    assert r.rejected == {1: F.DUPLICATE, 2: F.OVERLAP, 3: F.TOO_SMALL, 4: F.TOO_LARGE, 7: F.TOO_MANY, 8: F.EMPTY_MASK}
    with pytest.raises(LayerDiffError, match="--min-area"):
        F.FilterConfig(min_area=0.7, max_area=0.6)


def test_order_back_to_front_and_front_wins():
    boxes = [(0, 0, 10, 50), (0, 0, 10, 90), (0, 0, 10, 70), (0, 0, 10, 60)]
    assert F.order_back_to_front([0.5, 0.9, 0.1, 0.5], boxes) == [1, 0, 3, 2]  # tie 0/3: the higher bottom (0) is farther
    back, front = _rect(20, 20, 0, 10, 0, 10), _rect(20, 20, 5, 15, 5, 15)
    b, f = F.resolve_overlaps([back, front])
    assert not (b & f).any() and (f == front).all() and b.sum() == 100 - 25
    depth = BoxBottomDepth()
    img = Image.new("RGB", (20, 100))
    assert depth.object_depths(img, [back, front], [(0, 0, 5, 40), (0, 0, 5, 90)]) == [0.6, pytest.approx(0.1)]


def test_clip_and_nms():
    from layerdiff.data.mlcid.stages import Detection

    assert F.clip_box((-5, 90, 50, 10), 40, 80) == (0.0, 10.0, 40.0, 80.0)
    dets = [Detection((0, 0, 10, 10), 0.5, "a"), Detection((1, 1, 11, 11), 0.9, "b"), Detection((20, 20, 20.5, 30), 1.0, "c")]
    assert [d.phrase for d in F.box_nms(dets, iou=0.5)] == ["b"]  # "c" is degenerate, "a" suppressed


# ---------------------------------------------------------------------------------------------
# classical fallbacks, on real photographs


@pytest.mark.parametrize("backend", BACKENDS)
def test_classical_stages_on_photos(photos, backend):
    detector = SaliencyDetector(backend=backend)
    segmenter = ClassicalSegmenter(backend=backend)
    inpainter = ClassicalInpainter("telea" if backend == "cv2" else "biharmonic")
    for name, img in photos.items():
        w, h = img.size
        dets = detector.detect(img, ["thing", "other"])
        assert dets, f"no salient region in {name}"
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        assert all(0 <= d.box[0] < d.box[2] <= w and 0 <= d.box[1] < d.box[3] <= h for d in dets)
        assert {d.phrase for d in dets} <= {"thing", "other"}
        masks = segmenter.segment(img, [d.box for d in dets])
        assert len(masks) == len(dets)
        for m, d in zip(masks, dets):
            assert m.shape == (h, w) and m.dtype == bool and m.any()
            assert not (m & ~F.box_mask(d.box, h, w)).any(), "classical mask leaks outside its box"
        hole = masks[0]
        out = inpainter.inpaint(img, hole)
        before, after = np.asarray(img), np.asarray(out)
        assert out.size == img.size and (after[~hole] == before[~hole]).all()
        assert np.abs(after[hole].astype(int) - before[hole]).mean() > 0


def test_classical_backend_missing(monkeypatch):
    with pytest.raises(LayerDiffError, match="unknown"):
        classical_backend("gpu")
    monkeypatch.setitem(sys.modules, "cv2", None)
    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)
    with pytest.raises(LayerDiffError, match="pip install opencv-python-headless"):
        classical_backend()
    with pytest.raises(LayerDiffError, match="pip install opencv-python-headless"):
        ClassicalSegmenter()
    dot = _rect(21, 21, 10, 11, 10, 11)
    assert dilate(dot, 3).sum() == 49  # the model path still dilates, with Pillow (a square)


# ---------------------------------------------------------------------------------------------
# model stages on tiny random-weight models


def _tiny_options(**kw) -> StageOptions:
    return StageOptions(device="cpu", dtype="float32", detector_threshold=0.0, inpaint_steps=2, inpaint_resolution=64, **kw)


def test_model_stages_run(photos, tiny_models):
    st = make_stages(StageSpecs(**{k: str(v) for k, v in tiny_models.items()}), _tiny_options(batch_size=2))
    assert [type(s).__name__ for s in (st.captioner, st.detector, st.segmenter, st.depth, st.inpainter)] == [
        "HFCaptioner", "OwlDetector", "SamSegmenter", "HFDepthEstimator", "SDInpainter"]
    imgs = list(photos.values())
    caps = st.captioner.caption(imgs)
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    img = photos["coffee"]
    w, h = img.size
    assert st.detector.detect(img, []) == []
    assert st.detector.detect(img, ["a phrase far longer than the sixteen tokens of the text encoder"])  # truncated
    dets = st.detector.detect(img, ["cup", "saucer"])
    assert dets and [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    assert all(0 <= d.box[0] < d.box[2] <= w and 0 <= d.box[1] < d.box[3] <= h and d.phrase in ("cup", "saucer") for d in dets)
    masks = st.segmenter.segment(img, [d.box for d in dets])
    assert len(masks) == len(dets) and all(m.shape == (h, w) and m.dtype == bool for m in masks)
    assert st.segmenter.segment(img, []) == []
    depth = st.depth.depth(img)
    assert depth.shape == (h, w) and depth.dtype == np.float32 and np.isfinite(depth).all() and depth.std() > 0
    hole = masks[0] & F.box_mask(dets[0].box, h, w)
    out = st.inpainter.inpaint(img, hole)
    assert out.size == img.size and (np.asarray(out)[~hole] == np.asarray(img)[~hole]).all()


def test_grounding_dino_detects_beside_owlv2(photos, tiny_models, tmp_path):
    """A Grounding DINO checkpoint as --detector: picked from its config, boxes inside the image,
    each named by one of the phrases, the pipeline's segmenter taking them."""
    path = mlcid_tiny_models.save_grounding_dino(tmp_path / "grounding-dino")
    specs = StageSpecs(**{**{k: str(v) for k, v in tiny_models.items()}, "detector": str(path)})
    st = make_stages(specs, _tiny_options(batch_size=2))
    assert type(st.detector).__name__ == "GroundingDinoDetector"
    img = photos["coffee"]
    w, h = img.size
    assert st.detector.detect(img, [" "]) == []
    dets = st.detector.detect(img, ["cup", "red saucer", "a cup of coffee on a table with a blue man and a dog"])
    assert dets and [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    assert all(0 <= d.box[0] < d.box[2] <= w and 0 <= d.box[1] < d.box[3] <= h for d in dets)
    assert {d.phrase for d in dets} <= {"cup", "red saucer", "a cup of coffee on a table with a blue man and a dog"}
    assert len(st.segmenter.segment(img, [d.box for d in dets])) == len(dets)
    text, spans = st.detector._prompt(["Cup", "red  saucer."])
    assert text == "cup. red saucer." and [text[a:b] for a, b in spans] == ["cup", "red saucer"]


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(LayerDiffError, match=r"'nobody/no-such-captioner'.*--allow-download"):
        make_stages(StageSpecs(captioner="nobody/no-such-captioner"), _tiny_options())
    with pytest.raises(LayerDiffError, match="no such folder"):
        make_stages(StageSpecs(captioner="fallback", detector=str(tmp_path / "missing" / "owl")), _tiny_options())
    with pytest.raises(LayerDiffError, match="cannot be left out"):
        make_stages(StageSpecs(captioner="none", detector="none", segmenter="none"), _tiny_options())


def test_every_missing_model_is_named_in_one_error_or_replaced_when_asked(tiny_models, caplog):
    from layerdiff.data.mlcid.factory import missing_models, with_fallbacks

    specs = StageSpecs(captioner="nobody/no-such-captioner", detector="nobody/no-such-detector",
                       segmenter=str(tiny_models["segmenter"]), depth="fallback", inpainter="fallback")
    assert missing_models(specs) == [("captioner", "nobody/no-such-captioner"),
                                     ("detector", "nobody/no-such-detector")]
    with pytest.raises(LayerDiffError) as err:
        with_fallbacks(specs)
    text = str(err.value)
    assert "2 stage model(s)" in text and "--captioner 'nobody/no-such-captioner'" in text
    assert "--detector 'nobody/no-such-detector'" in text and "--fallback classical" in text
    assert "\n" not in text  # one line
    with caplog.at_level("WARNING", logger="layerdiff.data.mlcid"):
        replaced = with_fallbacks(specs, fallback="classical")
    assert (replaced.captioner, replaced.detector) == ("fallback", "fallback")
    assert replaced.segmenter == specs.segmenter  # a model that is there stays
    assert "nobody/no-such-captioner" in caplog.text
    assert with_fallbacks(StageSpecs.all_fallbacks()) == StageSpecs.all_fallbacks()
    with pytest.raises(LayerDiffError, match="--fallback 'sometimes' is unknown"):
        with_fallbacks(specs, fallback="sometimes")


def test_build_cli_fallback_classical_builds_with_what_is_there(image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["data", "build", "--images", str(image_dir), "--out", str(out), "--captioner", "nobody/no-such-captioner",
            "--detector", "nobody/no-such-detector", "--segmenter", "fallback", "--depth", "fallback",
            "--inpainter", "fallback"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"not found.*--captioner 'nobody/no-such-captioner'.*--detector 'nobody/no-such-detector'", err)
    assert not out.exists() or not list(out.iterdir())  # refused before any work
    # classical stages instead; the coffee image's sidecar names its object, so it gives a sample
    assert main(argv + ["--fallback", "classical"]) == 0
    summary = json.loads((out / "summary-1of1.json").read_text())
    assert summary["kept"] >= 1


def test_build_without_anything_that_names_objects_is_refused_up_front(tmp_path, photos, capsys):
    images = tmp_path / "images"
    images.mkdir()
    photos["astronaut"].save(images / "a.jpg")
    out = tmp_path / "out"
    assert main(["data", "build", "--images", str(images), "--out", str(out), "--no-models"]) == 1
    assert re.search(r"nothing would name the objects.*--phrases", capsys.readouterr().err)
    assert not out.exists() or not list(out.iterdir())


def test_pipeline_with_tiny_models(photos, tiny_models, tmp_path):
    st = make_stages(StageSpecs(**{k: str(v) for k, v in tiny_models.items()}), _tiny_options())
    pipe = MLCIDPipeline(st, PipelineConfig(layer_prompts="caption"))
    items = [(f"k{i}", name, img, builder.P.Sidecar()) for i, (name, img) in enumerate(photos.items())]
    outcomes = pipe.process(items)
    kept = [o.sample for o in outcomes if o.status == KEPT]
    assert kept, [o.status for o in outcomes]
    for s in kept:
        _check_sample(s)
        assert s.global_prompt == s.extra["mlcid"]["caption"]  # the captioner's caption
        assert s.extra["mlcid"]["phrases_from"] == "caption"
    # the format round trip
    n = write_shard(tmp_path / "x-000000.tar", kept)
    back = list(read_shard(tmp_path / "x-000000.tar"))
    assert n == len(back) == len(kept)
    assert [np.asarray(m).tolist() for m in back[0].masks] == [np.asarray(m).tolist() for m in kept[0].masks]


def test_build_cli_with_tiny_models(image_dir, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["data", "build", "--images", str(image_dir), "--out", str(out), "--device", "cpu", "--dtype", "float32",
            "--detector-threshold", "0", "--inpaint-steps", "2", "--inpaint-resolution", "64", "--batch-size", "2"]
    for stage, path in tiny_models.items():
        argv += [f"--{stage}", str(path)]
    assert main(argv) == 0
    summary = json.loads((out / "summary-1of1.json").read_text())
    assert summary["images_seen"] == 5 and summary["unreadable"] == {"corrupt": 1, "not_an_image": 1}
    samples = [s for p in list_shards(out) for s in read_shard(p)]
    assert len(samples) == summary["kept"] >= 1
    for s in samples:
        _check_sample(s)
    assert "samples kept" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the build command with the fallbacks: bad files, resume, overwrite, sharding, kills


def _fallback_argv(images, out, *extra):
    return ["data", "build", "--images", str(images), "--out", str(out), "--no-models", "--phrases", "object, thing",
            "--samples-per-shard", "2", *extra]


def _samples(out):
    return [s for p in list_shards(out) for s in read_shard(p)]


def test_build_cli_all_fallbacks(image_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_fallback_argv(image_dir, out)) == 0
    summary = json.loads((out / "summary-1of1.json").read_text())
    assert summary["inputs_total"] == summary["images_seen"] == 5
    assert summary["unreadable"] == {"corrupt": 1, "not_an_image": 1}
    assert summary["chunks"] == {"planned": 3, "built": 3, "skipped": 0}
    shards = list_shards(out)
    assert [p.name for p in shards] == [f"mlcid-001of001-{c:06d}.tar" for c in range(3)]
    samples = _samples(out)
    assert len(samples) == summary["kept"] == 3
    assert summary["kept"] + summary["rejected_total"] + summary["unreadable_total"] == 5
    assert sum(summary["samples_by_layers"].values()) == 3
    by_source = {s.source: s for s in samples}
    assert set(by_source) == {"astronaut.jpg", "chelsea.jpg", "sub/coffee.png"}
    assert len({s.key for s in samples}) == 3
    for s in samples:
        _check_sample(s)
        assert s.layer_prompts[0] == "background"
    coffee = by_source["sub/coffee.png"]  # the sidecar's box and caption win over the detector
    assert coffee.global_prompt == "a cup of coffee on a saucer"
    assert coffee.layer_prompts[1:] == ["cup of coffee"] and coffee.extra["boxes"] == [[30, 10, 100, 75]]
    assert by_source["astronaut.jpg"].extra["mlcid"]["phrases_from"] == "fixed"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    # deterministic: a second build gives the same bytes
    assert main(_fallback_argv(image_dir, tmp_path / "again")) == 0
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in list_shards(tmp_path / "again")]


def test_rerun_skips_finished_shards_and_overwrite(image_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_fallback_argv(image_dir, out)) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    first = json.loads((out / "summary-1of1.json").read_text())
    assert main(_fallback_argv(image_dir, out)) == 0
    again = json.loads((out / "summary-1of1.json").read_text())
    assert again["chunks"] == {"planned": 3, "built": 0, "skipped": 3}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps
    for key in ("images_seen", "kept", "unreadable", "rejected", "samples_by_layers"):
        assert again[key] == first[key]
    # other settings into the same folder: refused without --overwrite
    assert main(_fallback_argv(image_dir, out, "--min-area", "0.02")) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps
    assert main(_fallback_argv(image_dir, out, "--min-area", "0.02", "--overwrite")) == 0
    assert json.loads((out / "summary-1of1.json").read_text())["chunks"]["built"] == 3


def test_shards_split_inputs_without_overlap(image_dir, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_fallback_argv(image_dir, whole)) == 0
    assert main(_fallback_argv(image_dir, split, "--shard", "1/2")) == 0
    assert main(_fallback_argv(image_dir, split, "--shard", "2/2")) == 0
    s1 = json.loads((split / "summary-1of2.json").read_text())
    s2 = json.loads((split / "summary-2of2.json").read_text())
    assert s1["images_seen"] + s2["images_seen"] == 5 and s1["images_seen"] and s2["images_seen"]
    assert [p.name for p in list_shards(split)] == [  # chunks 0 and 2 for process 1, chunk 1 for process 2
        "mlcid-001of002-000000.tar", "mlcid-001of002-000002.tar", "mlcid-002of002-000001.tar"]
    parts = [{s.source for s in read_shard(p)} for p in list_shards(split)]
    assert sum(len(p) for p in parts) == len(set().union(*parts))  # no input in two shards
    assert set().union(*parts) == {s.source for s in _samples(whole)}
    # a different split into the same folder is refused
    assert main(_fallback_argv(image_dir, split, "--shard", "1/3")) == 1


def test_killed_run_leaves_no_half_written_shard(image_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = MLCIDPipeline.process
    calls = {"n": 0}

    def dies_on_second_image(self, items):  # chunk 0 = astronaut + broken; chelsea opens chunk 1
        calls["n"] += len(items)
        if calls["n"] >= 2:
            raise KeyboardInterrupt
        return real(self, items)

    monkeypatch.setattr(MLCIDPipeline, "process", dies_on_second_image)
    assert main(_fallback_argv(image_dir, out, "--batch-size", "1")) == 130
    assert sorted(p.name for p in out.iterdir()) == ["dhash-cache.json", "mlcid-001of001-000000.stats.json",
                                                     "mlcid-001of001-000000.tar"]  # the hashes, one whole shard
    monkeypatch.setattr(MLCIDPipeline, "process", real)
    assert main(_fallback_argv(image_dir, out)) == 0
    summary = json.loads((out / "summary-1of1.json").read_text())
    assert summary["chunks"] == {"planned": 3, "built": 2, "skipped": 1} and summary["kept"] == 3


def test_foreign_shard_is_not_overwritten(image_dir, tmp_path, photos):
    out = tmp_path / "out"
    out.mkdir()
    from layerdiff.data.format import LayeredSample

    grey = Image.new("RGB", (8, 8), (128, 128, 128))
    foreign = LayeredSample("other", "x", ["bg", "fg"], grey, [grey], [Image.new("L", (8, 8))], source="elsewhere.jpg")
    write_shard(out / "mlcid-001of001-000000.tar", [foreign])
    assert main(_fallback_argv(image_dir, out)) == 1
    assert [s.key for s in read_shard(out / "mlcid-001of001-000000.tar")] == ["other"]


def test_list_file_inputs_and_bad_arguments(image_dir, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("# inputs\nimages/astronaut.jpg\nimages/gone.jpg\n\nimages/notes.bin\n")
    out = tmp_path / "out"
    assert main(_fallback_argv(listing, out)) == 0
    summary = json.loads((out / "summary-1of1.json").read_text())
    assert summary["unreadable"] == {"missing": 1, "not_an_image": 1} and summary["kept"] == 1
    assert main(_fallback_argv(image_dir, out, "--shard", "3/2")) == 1
    assert "--shard" in capsys.readouterr().err
    assert main(_fallback_argv(tmp_path / "nowhere", out)) == 1
    assert "--images" in capsys.readouterr().err
    assert main(_fallback_argv(image_dir, out, "--max-foregrounds", "0")) == 1


def test_stage_failure_is_counted_not_fatal(image_dir, tmp_path, monkeypatch):
    def broken(self, image, boxes):
        raise RuntimeError("segmenter exploded")

    monkeypatch.setattr(ClassicalSegmenter, "segment", broken)
    out = tmp_path / "out"
    assert main(_fallback_argv(image_dir, out)) == 1  # every image failed: a non-zero exit, shards still atomic
    summary = json.loads((out / "summary-1of1.json").read_text())
    assert summary["rejected"] == {"error": 3} and summary["kept"] == 0 and summary["unreadable_total"] == 2
    assert _samples(out) == []
