"""LayerDiff checkpoints: round trip, SD 1.5 conversion, bad files, and the info/convert commands."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
from ldm_layout import (
    TINY_CONFIGS,
    make_comfyui_saved_file,
    make_original_sd15_file,
    sd15_full_size_header,
    write_header_only_file,
)
from safetensors.torch import save_file

from layerdiff.cli import main
from layerdiff.config import get_preset
from layerdiff.errors import CheckpointError
from layerdiff.io.checkpoint import (
    build_random_model,
    describe_file,
    load_layerdiff,
    load_model,
    save_layerdiff,
)
from layerdiff.io.convert import convert_sd15


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, trained_like_tiny_model_module):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_layerdiff(trained_like_tiny_model_module, path)
    return path


@pytest.fixture(scope="module")
def trained_like_tiny_model_module():
    model = build_random_model(get_preset("tiny"), seed=3)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "inter_layer_attn.to_out" in name or "gate" in name or "proj_out" in name:
                p.normal_(0, 0.1)
    return model


def _all_tensors(model):
    out = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    out.update({f"vae.{k}": v for k, v in model.vae.state_dict().items()})
    out.update({f"text.{k}": v for k, v in model.text_encoder.state_dict().items()})
    return out


def test_random_model_parts_do_not_move_when_another_part_changes():
    """Each part of a random model has its own seeded stream: a UNet without one attention block
    (fewer random numbers drawn; the change that once moved the toy recipe's VAE) leaves the VAE's
    and text encoder's initial weights exactly as they were, and the seed still changes them."""
    config = get_preset("tiny")
    a = build_random_model(config, seed=5)
    smaller = config.replace(unet={**config.unet, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]})
    b = build_random_model(smaller, seed=5)
    assert sum(p.numel() for p in b.unet.parameters()) < sum(p.numel() for p in a.unet.parameters())
    for part in ("vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    other = build_random_model(config, seed=6)
    assert not torch.equal(a.vae.encoder.conv_in.weight, other.vae.encoder.conv_in.weight)


def test_save_load_round_trip_is_bit_exact(tiny_file, trained_like_tiny_model_module):
    loaded = load_layerdiff(tiny_file)
    a, b = _all_tensors(trained_like_tiny_model_module), _all_tensors(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.config == trained_like_tiny_model_module.config
    # and the loaded model runs
    x = torch.randn(1, 3, 8, 8, 8)
    with torch.no_grad():
        out1 = trained_like_tiny_model_module.unet(x, 10, torch.ones(1, 4, 32))
        out2 = loaded.unet(x, 10, torch.ones(1, 4, 32))
    assert torch.equal(out1, out2)


def test_file_is_self_describing(tiny_file):
    from safetensors import safe_open

    with safe_open(str(tiny_file), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "layerdiff"
    assert json.loads(meta["config"])["name"] == "tiny"
    info = describe_file(tiny_file)
    assert info["architecture"] == "layerdiff"
    assert info["layerdiff_config"]["max_layers"] == 4


def test_save_refuses_to_overwrite(tiny_file, trained_like_tiny_model_module):
    before = tiny_file.read_bytes()
    with pytest.raises(CheckpointError, match="overwrite"):
        save_layerdiff(trained_like_tiny_model_module, tiny_file)
    assert tiny_file.read_bytes() == before


def test_config_that_does_not_match_tensors_is_refused(tmp_path, tiny_file):
    from safetensors.torch import load_file

    from layerdiff.io.files import read_safetensors

    tensors, meta = read_safetensors(tiny_file)
    cfg = json.loads(meta["config"])
    cfg["unet"]["block_out_channels"] = [32, 32]
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(tiny_file)), str(bad), metadata={**meta, "config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match="do not match the config"):
        load_layerdiff(bad)


def test_missing_truncated_pickle_and_wrong_kind(tmp_path, tiny_file):
    with pytest.raises(CheckpointError, match="not found"):
        load_layerdiff(tmp_path / "nope.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_layerdiff(cut)
    pkl = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, pkl)
    with pytest.raises(CheckpointError, match="only .safetensors"):
        load_layerdiff(pkl)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a LayerDiff checkpoint"):
        load_layerdiff(plain)


def test_unknown_builtin_name_lists_choices():
    with pytest.raises(CheckpointError, match="tiny"):
        load_model("no-such-model")


def test_convert_sd15_original_layout_gives_equivalent_layerdiff(tmp_path):
    """An untrained LayerDiff built from an SD 1.5 file reproduces that UNet per layer."""
    base = tmp_path / "sd15.safetensors"
    src = make_original_sd15_file(base)
    cfg = get_preset("sd15")
    base_cfg = cfg.replace(**TINY_CONFIGS)
    out = convert_sd15(base, tmp_path / "ld.safetensors", config=cfg, base_config=base_cfg)
    info = describe_file(out)
    assert info["architecture"] == "layerdiff" and "vae" not in info["layerdiff_config"]["components"]
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("the CLIP tokenizer vocabulary comes from open_clip_torch (pip install --no-deps open_clip_torch)")
    model = load_layerdiff(out, base=base)
    # VAE and text encoder came from the base file
    for k, v in src["vae"].state_dict().items():
        assert torch.equal(model.vae.state_dict()[k], v)
    x = torch.randn(1, 2, 8, 8, 8)
    ctx = torch.randn(1, 77, 32)
    with torch.no_grad():
        out_l = model.unet(x, 20, ctx, model.unet.enhance(ctx, torch.randn(1, 2, 77, 32)))
        for layer in range(2):
            ref = src["unet"](x[:, layer, :4], 20, encoder_hidden_states=ctx).sample
            torch.testing.assert_close(out_l[:, layer, :4], ref, atol=5e-5, rtol=1e-4)


def test_convert_full_stores_vae_and_text_encoder(tmp_path):
    base = tmp_path / "sd15.safetensors"
    make_original_sd15_file(base)
    cfg = get_preset("sd15")
    out = convert_sd15(
        base, tmp_path / "full.safetensors", config=cfg, base_config=cfg.replace(**TINY_CONFIGS),
        include_vae_and_text_encoder=True,
    )
    comps = describe_file(out)["layerdiff_config"]["components"]
    assert "vae" in comps and "text_encoder" in comps


def test_layerdiff_without_vae_needs_base(tmp_path):
    base = tmp_path / "sd15.safetensors"
    make_original_sd15_file(base)
    cfg = get_preset("sd15")
    out = convert_sd15(base, tmp_path / "ld.safetensors", config=cfg, base_config=cfg.replace(**TINY_CONFIGS))
    with pytest.raises(CheckpointError, match="base"):
        load_layerdiff(out)


def test_info_and_convert_commands(tmp_path, capsys, tiny_file):
    assert main(["info", str(tiny_file)]) == 0
    assert "layerdiff" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not found" in err and "Traceback" not in err
    sdxl = tmp_path / "sdxl.safetensors"
    save_file(
        {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2),
         "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)},
        str(sdxl),
    )
    assert main(["info", str(sdxl)]) == 0
    assert "sdxl" in capsys.readouterr().out
    assert main(["convert", "--base", str(sdxl), "--out", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "SDXL" in err and "1.5" in err
    pkl = tmp_path / "x.ckpt"
    torch.save({}, pkl)
    assert main(["convert", "--base", str(pkl), "--out", str(tmp_path / "o.safetensors")]) == 1
    assert "safetensors" in capsys.readouterr().err


def test_text_encoder_keys_load_across_transformers_layouts(tmp_path, tiny_file):
    """transformers 4.x names CLIPTextModel keys text_model.*, 5.x does not: files use the 4.x
    layout and either layout loads (a file written under 5.x before this rule, too)."""
    from safetensors.torch import load_file

    from layerdiff.io.files import read_safetensors

    tensors, meta = read_safetensors(tiny_file)
    text_keys = [k for k in tensors if k.startswith("text_encoder.")]
    assert text_keys and all(k.startswith("text_encoder.text_model.") for k in text_keys)
    bare = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in load_file(str(tiny_file)).items()}
    other = tmp_path / "bare.safetensors"
    save_file(bare, str(other), metadata=meta)
    a, b = load_layerdiff(tiny_file), load_layerdiff(other)
    for (ka, va), (kb, vb) in zip(a.text_encoder.state_dict().items(), b.text_encoder.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_convert_command_takes_a_comfyui_saved_checkpoint(tmp_path, monkeypatch, caplog):
    """`convert --base` on a file saved by ComfyUI's CheckpointSave (Feb-Mar 2024, with the CLIP
    text_projection.weight the original report showed): converts, and the result loads with it."""
    import layerdiff.io.sd15 as sd15

    defaults = sd15.load_sd15_configs()
    # the command assumes real SD 1.5 widths: give it the tiny ones with the same key layout
    monkeypatch.setattr(sd15, "load_sd15_configs", lambda: {**defaults, **TINY_CONFIGS})
    base = tmp_path / "ComfyUI_00001_.safetensors"
    src = make_comfyui_saved_file(base, saved_by="2024-02")
    out = tmp_path / "ld.safetensors"
    caplog.set_level(logging.DEBUG, logger="layerdiff.io")
    assert main(["convert", "--base", str(base), "--out", str(out)]) == 0
    ignored = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "ignored" in r.getMessage()]
    assert ignored == [
        f"{base}: ignored 2 tensors SD 1.5 does not use: cond_stage_model.logit_scale, "
        "cond_stage_model.transformer.text_projection.weight"
    ]
    info = describe_file(out)
    assert info["architecture"] == "layerdiff" and info["layerdiff_config"]["block_out_channels"] == [32, 64, 64, 64]
    model = load_layerdiff(out, base=base)
    for part in ("vae", "text_encoder"):
        theirs = src[part].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(model, part).state_dict().items()), part
    ours = model.unet.state_dict()
    assert torch.equal(ours["unet.conv_out.weight"][:4], src["unet"].conv_out.weight)


def _no_tensor_reads(monkeypatch):
    """Any read of tensor data (safetensors, or our reader) fails the test."""
    import safetensors
    import safetensors.torch

    import layerdiff.io.checkpoint
    import layerdiff.io.files

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read; only the header should be")

    for module, name in ((safetensors, "safe_open"), (safetensors.torch, "load_file"),
                         (layerdiff.io.files, "read_safetensors"), (layerdiff.io.checkpoint, "read_safetensors")):
        monkeypatch.setattr(module, name, refuse)


def test_sd15_checkpoint_given_as_a_layerdiff_model_is_named_from_its_header(tmp_path, monkeypatch, capsys):
    """A real-size SD 1.5 header over a ~2 GB data section that is never written (a sparse file):
    load_model names it without reading any tensor, and `info` points at --base and convert."""
    path = write_header_only_file(tmp_path / "v1-5-pruned-emaonly-fp16.safetensors", sd15_full_size_header())
    assert path.stat().st_size > 2_000_000_000
    _no_tensor_reads(monkeypatch)
    with pytest.raises(CheckpointError) as caught:
        load_model(str(path))
    assert str(caught.value) == (
        f"{path} is an SD 1.5 checkpoint, not a LayerDiff file: use it as --base (the base_checkpoint input of "
        f"Load LayerDiff), or convert it (python -m layerdiff convert --base {path} --out layerdiff.safetensors)"
    )
    assert main(["info", str(path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{path}: sd15, 1,066,235,384 parameters in 1131 tensors; an SD 1.5 checkpoint: use it as --base")
    sdxl = write_header_only_file(
        tmp_path / "xl.safetensors",
        {"model.diffusion_model.input_blocks.0.0.weight": ("F16", (320, 4, 3, 3)),
         "model.diffusion_model.label_emb.0.0.weight": ("F16", (1280, 2816))},
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=r"xl\.safetensors looks like an SDXL checkpoint, not a LayerDiff file"):
        load_model(str(sdxl))
