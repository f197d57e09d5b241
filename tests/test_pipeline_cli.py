"""Pipeline input checks and the `generate` command line (with the random-weight `tiny` model)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layerdiff.cli import main
from layerdiff.conditioning import LayerPrompts, check_prompts, encode_prompts
from layerdiff.errors import LayerDiffError
from layerdiff.pipeline import check_size

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["generate", "--model", "tiny", "--steps", "2", "--prompt", "a red star in front of a brick wall",
        "--layer", "a brick wall", "--layer", "a red star", "--layer", "a blue circle"]


def test_sizes_must_be_multiples_of_8_and_errors_name_the_nearest():
    check_size(64, 72)
    with pytest.raises(LayerDiffError, match="width 100 is not a multiple of 8: use 96 or 104"):
        check_size(100, 64)
    with pytest.raises(LayerDiffError, match="height 3 is not a multiple of 8: use 8"):
        check_size(64, 3)


def test_prompt_checks():
    with pytest.raises(LayerDiffError, match="at least a background"):
        check_prompts(LayerPrompts("scene", ()), 4)
    with pytest.raises(LayerDiffError, match="5 layer prompts .* at most 4 .* remove 1"):
        check_prompts(LayerPrompts("scene", tuple("abcde")), 4)
    with pytest.raises(LayerDiffError, match="global prompt is empty"):
        check_prompts(LayerPrompts("  ", ("a",)), 4)
    with pytest.raises(LayerDiffError, match="layer 1 \\(foreground 1\\) is empty"):
        check_prompts(LayerPrompts("scene", ("a", "")), 4)


def test_mixed_layer_counts_encode_with_validity(tiny_model):
    cond = encode_prompts(tiny_model, [LayerPrompts("x", ("a", "b")), LayerPrompts("y", ("a", "b", "c", "d"))])
    assert cond.layer_tokens.shape[:2] == (2, 4)
    assert cond.valid.tolist() == [[True, True, False, False], [True] * 4]


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def test_generate_writes_a_complete_layer_set(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*ARGS, "--out", str(out), "--seed", "7"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["composite.png", "layer_00.png", "layer_01.png", "layer_02.png", "layers.psd",
                     "mask_01.png", "mask_02.png", "meta.json"]
    assert Image.open(out / "layer_00.png").mode == "RGB"
    fg = Image.open(out / "layer_01.png")
    mask = np.asarray(Image.open(out / "mask_01.png"))
    assert fg.mode == "RGBA" and fg.size == (64, 64)
    assert set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(np.asarray(fg)[..., 3], mask)  # alpha is the mask
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 7 and meta["steps"] == 2 and meta["model"] == "tiny"
    assert meta["sampler"] == "ddim" and meta["scheduler"] == "normal" and meta["eta"] == 0.0  # every setting, resolved
    assert meta["layer_prompts"] == ["a brick wall", "a red star", "a blue circle"]
    assert meta["background_cfg"] == meta["cfg"] == 7.5 and meta["layout_cleanup"] == 1.0  # the tiny model's defaults
    assert meta["mask_guidance_erode"] == 0  # the model's own (its SamplerSettings), recorded
    from layerdiff.io.psd import load_psd

    psd = load_psd(out / "layers.psd")
    assert psd.num_layers == 3 and psd.names[1] == "layer 1: a red star"
    # same seed and settings -> bit-identical PNGs
    again = tmp_path / "again"
    assert main([*ARGS, "--out", str(again), "--seed", "7"]) == 0
    assert _sha(out) == _sha(again)


def test_generate_dtype_loads_the_weights_at_that_precision(tmp_path, capsys):
    for flag, name in (("bf16", "bfloat16"), ("fp32", "float32")):
        out = tmp_path / flag
        assert main([*ARGS, "--out", str(out), "--dtype", flag]) == 0
        assert json.loads((out / "meta.json").read_text())["dtype"] == name
        assert (out / "layers.psd").is_file()
    with pytest.raises(SystemExit):
        main([*ARGS, "--out", str(tmp_path / "x"), "--dtype", "fp8"])
    assert "bf16" in capsys.readouterr().err  # argparse names the choices


def test_generate_batch_writes_subfolders(tmp_path):
    out = tmp_path / "b"
    assert main([*ARGS, "--out", str(out), "--batch", "2", "--no-psd", "--width", "72", "--height", "56"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_000", "sample_001"]
    assert Image.open(out / "sample_001" / "composite.png").size == (72, 56)
    assert not (out / "sample_000" / "layers.psd").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--width", "100"], "width 100 is not a multiple of 8: use 96 or 104"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "/no/such/file.safetensors"], "not found"),
        (["--layer", ""], "layer 3 (foreground 3) is empty"),
        (["--batch", "0"], "--batch 0"),
        (["--layer", "x", "--layer", "y"], "at most 4 layers"),
        (["--layout-cleanup", "1.5"], "--layout-cleanup 1.5 is outside 0..1"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, extra, message):
    assert main([*ARGS, "--out", str(tmp_path / "o"), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1], err


def test_generate_with_an_sd15_checkpoint_as_model_says_so_from_the_header(tmp_path, capsys, monkeypatch):
    """--model given the user's SD 1.5 file (real-size header, ~2 GB of never-written data): one line
    saying what it is and what to do, before --out is created and without reading a tensor."""
    import safetensors
    from ldm_layout import sd15_full_size_header, write_header_only_file

    import layerdiff.io.checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read; only the header should be")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(layerdiff.io.checkpoint, "read_safetensors", refuse)
    sd15 = write_header_only_file(tmp_path / "dreamshaper_8.safetensors", sd15_full_size_header())
    out = tmp_path / "o"
    assert main([*ARGS, "--model", str(sd15), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {sd15} is an SD 1.5 checkpoint, not a LayerDiff file: use it as --base (the base_checkpoint "
        f"input of Load LayerDiff), or convert it (python -m layerdiff convert --base {sd15} --out layerdiff.safetensors)"
    ]
    assert not out.exists()


def test_existing_files_are_not_overwritten(tmp_path, capsys):
    out = tmp_path / "o"
    assert main([*ARGS, "--out", str(out)]) == 0
    before = _sha(out)
    assert main([*ARGS, "--out", str(out), "--seed", "3"]) == 1
    assert "already exists" in capsys.readouterr().err and _sha(out) == before
    assert main([*ARGS, "--out", str(out), "--seed", "3", "--overwrite"]) == 0
    assert _sha(out) != before


def test_unwritable_out_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([*ARGS, "--out", str(blocker / "sub")]) == 1
    assert "not a writable folder" in capsys.readouterr().err


def test_command_line_runs_as_a_module_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "layerdiff", "generate", "--prompt", "x", "--layer", "y",
                        "--out", str(tmp_path), "--width", "30", "--model", "tiny"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "width 30" in r.stderr


def test_library_imports_without_comfyui():
    code = "import sys, layerdiff, layerdiff.pipeline, layerdiff.sampling, layerdiff.io.checkpoint; " \
           "assert not any(m == 'comfy' or m.startswith('comfy.') or m == 'folder_paths' for m in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_root_init_is_importable_and_inert_outside_comfyui():
    spec = importlib.util.spec_from_file_location("layerdiff_pack_root", ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {}
