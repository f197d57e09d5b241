"""layerdiff.io.sd15: SD1.5 configs, architecture detection, single-file and diffusers-folder loading."""

import logging
import re

import pytest
import torch

from layerdiff.config import load_sd15_configs
from layerdiff.errors import CheckpointError, LayerDiffError
from layerdiff.io import _diffusers_compat as compat
from layerdiff.io.files import read_safetensors, read_safetensors_header, save_safetensors_atomic
from layerdiff.io.sd15 import (
    detect_architecture,
    load_diffusers_dir,
    load_sd15_single_file,
)
from tests.ldm_layout import (
    COMFYUI_SAVERS,
    TINY_CONFIGS,
    comfyui_saved_state_dict,
    make_comfyui_saved_file,
    make_original_sd15_file,
    original_state_dict,
    trainer_leftovers,
)

TINY = {
    "unet_config": TINY_CONFIGS["unet"],
    "vae_config": TINY_CONFIGS["vae"],
    "text_config": TINY_CONFIGS["text_encoder"],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and stay fast when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15") / "tiny_sd15.safetensors"
    return path, make_original_sd15_file(path, seed=0)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _forward(models):
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 3])
    with torch.no_grad():
        text = models["text_encoder"](ids).last_hidden_state  # (1, 10, 32)
        eps = models["unet"](torch.randn(1, 4, 16, 16, generator=g), 10, encoder_hidden_states=text).sample
        image = models["vae"].decode(torch.randn(1, 4, 4, 4, generator=g)).sample  # (1, 3, 32, 32)
        latent = models["vae"].encode(image).latent_dist.mean
    return text, eps, image, latent


# --------------------------------------------------------------------------------------------
# configs


def test_sd15_configs_have_the_real_parameter_counts():
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = load_sd15_configs()
    assert set(cfg) == {"unet", "vae", "text_encoder", "scheduler"}
    with torch.device("meta"):  # shapes only, no memory
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    assert vae.config.scaling_factor == 0.18215
    for cls in (DDIMScheduler, PNDMScheduler):
        sched = cls.from_config(cfg["scheduler"])
        assert sched.config.steps_offset == 1 and sched.config.prediction_type == "epsilon"
        assert sched.betas[0].item() == pytest.approx(0.00085) and sched.betas[-1].item() == pytest.approx(
            0.012
        )
    cfg["unet"]["in_channels"] = 8
    assert load_sd15_configs()["unet"]["in_channels"] == 4  # callers get copies


# --------------------------------------------------------------------------------------------
# loading an original-layout single file


def test_single_file_loads_bit_exact_with_equal_forward(tiny_file):
    path, source = tiny_file
    loaded = load_sd15_single_file(path, **TINY)
    assert set(loaded) == {"unet", "vae", "text_encoder"}
    for name in loaded:
        _assert_same_weights(loaded[name], source[name])
        assert not loaded[name].training
    for a, b in zip(_forward(loaded), _forward(source)):
        assert torch.equal(a, b)


def test_conversion_matches_diffusers_own_converters(tiny_file):
    refs = compat.diffusers_reference_converters()
    if refs is None:
        pytest.skip("this diffusers has no >= 0.28 single-file converters to compare with")
    unet_ref, vae_ref = refs
    path, source = tiny_file
    sd, _ = read_safetensors(path)
    for name, ref, ours in (
        ("unet", unet_ref, compat.unet_ldm_names),
        ("vae", vae_ref, compat.vae_ldm_names),
    ):
        expected = ref(dict(sd), dict(TINY_CONFIGS[name]))
        names = ours(list(source[name].state_dict()), TINY_CONFIGS[name])
        assert set(names) == set(expected)
        for key, ldm in names.items():
            assert torch.equal(compat.fit_to_shape(ldm, sd[ldm], expected[key].shape), expected[key]), key


def test_old_clip_layout_ema_and_dtype(tmp_path, tiny_file):
    path = tmp_path / "old.safetensors"
    source = make_original_sd15_file(path, text_model_prefix=False, ema_offset=0.5, models=tiny_file[1])
    header, _ = read_safetensors_header(path)
    assert "cond_stage_model.transformer.embeddings.position_ids" in header

    loaded = load_sd15_single_file(path, dtype=torch.float16, components=("unet", "text_encoder"), **TINY)
    assert set(loaded) == {"unet", "text_encoder"}
    src_unet = source["unet"].state_dict()
    for k, v in loaded["unet"].state_dict().items():  # EMA copy by default
        assert v.dtype == torch.float16 and torch.equal(v, (src_unet[k] + 0.5).half()), k
    src_text = source["text_encoder"].state_dict()
    for k, v in loaded["text_encoder"].state_dict().items():
        assert torch.equal(v, src_text[k].half() if v.is_floating_point() else src_text[k]), k

    non_ema = load_sd15_single_file(path, components=("unet",), use_ema=False, **TINY)
    _assert_same_weights(non_ema["unet"], source["unet"])


# --------------------------------------------------------------------------------------------
# files saved by ComfyUI, A1111 merges and trainers: extra tensors are ignored and named at debug


def _ignored_line(caplog, path) -> str:
    lines = [
        r.getMessage() for r in caplog.records
        if r.name == "layerdiff.io" and r.levelno == logging.DEBUG and "ignored" in r.getMessage()
        and str(path) in r.getMessage()
    ]  # fmt: skip
    assert len(lines) <= 1, lines
    return lines[0] if lines else ""


@pytest.mark.parametrize("saved_by", COMFYUI_SAVERS)
def test_comfyui_saved_checkpoints_load_bit_exact(tmp_path, tiny_file, caplog, saved_by):
    """ComfyUI's CheckpointSave output of every version loads; the CLIP extras it wrote (text
    projection, logit scale, position_ids) are named in one debug line and not loaded."""
    path = tmp_path / f"comfyui_{saved_by}.safetensors"
    source = make_comfyui_saved_file(path, models=tiny_file[1], saved_by=saved_by)
    extras = sorted(set(comfyui_saved_state_dict(source, saved_by)) - set(original_state_dict(source)))
    extras += ["cond_stage_model.transformer.text_model.embeddings.position_ids"] * (saved_by == "2023")
    caplog.set_level(logging.DEBUG, logger="layerdiff.io")
    loaded = load_sd15_single_file(path, **TINY)
    for name in loaded:
        _assert_same_weights(loaded[name], source[name])
    line = _ignored_line(caplog, path)
    if saved_by == "current":
        assert not extras and not line
    else:
        assert line.startswith(f"{path}: ignored {len(extras)} tensors SD 1.5 does not use: ")
        assert all(name in line for name in extras), line
    if saved_by == "2024-02":  # the tensor of the original report
        assert "cond_stage_model.transformer.text_projection.weight" in line


def test_trainer_and_merge_leftovers_are_ignored_and_named(tmp_path, tiny_file, caplog):
    """EMA leftovers, LDM schedule buffers, the VAE's training loss, float position_ids and stray
    conditioner.* tensors: detected as SD1.5, not loaded, counted in one debug line."""
    path = tmp_path / "merged.safetensors"
    extras = trainer_leftovers()
    source = make_original_sd15_file(path, models=tiny_file[1], ema_offset=0.5, extras=extras)
    header, _ = read_safetensors_header(path)
    assert detect_architecture(header) == "sd15"
    caplog.set_level(logging.DEBUG, logger="layerdiff.io")

    loaded = load_sd15_single_file(path, use_ema=False, **TINY)
    for name in loaded:  # exactly the modules' own tensors: nothing extra was loaded into them
        _assert_same_weights(loaded[name], source[name])
    ema_copies = sum(k.startswith("model.diffusion_model.") for k in original_state_dict(source))
    line = _ignored_line(caplog, path)
    n = len(extras) + ema_copies  # without EMA the model_ema.* UNet copy is a leftover too
    assert re.fullmatch(
        rf"{re.escape(str(path))}: ignored {n} tensors SD 1\.5 does not use: .* \(\+{n - 5} more\)", line
    )
    for group in (
        "alphas_cumprod",
        "cond_stage_model.",
        "conditioner.",
        "first_stage_model.loss.",
        "model_ema.",
    ):
        assert group in line, (group, line)

    caplog.clear()
    ema = load_sd15_single_file(path, components=("unet",), **TINY)
    src = source["unet"].state_dict()
    assert all(torch.equal(v, src[k] + 0.5) for k, v in ema["unet"].state_dict().items())
    line = _ignored_line(caplog, path)  # the non-EMA UNet is the other choice, not a leftover
    n = sum(not k.startswith(("first_stage_model.", "cond_stage_model.")) for k in extras)
    assert line.startswith(f"{path}: ignored {n} tensors") and "model.diffusion_model" not in line


def test_v_prediction_mark_is_warned_about(tmp_path, tiny_file, caplog):
    """ComfyUI's CheckpointSave writes an empty ``v_pred`` tensor for v-prediction models: the file
    loads, and a warning says the LayerDiff recipe expects epsilon prediction."""
    sd = comfyui_saved_state_dict(tiny_file[1])
    sd["v_pred"] = torch.tensor([])
    path = save_safetensors_atomic(sd, tmp_path / "vpred.safetensors")
    caplog.set_level(logging.DEBUG, logger="layerdiff.io")
    load_sd15_single_file(path, components=("unet",), **TINY)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{path} is marked as a v-prediction model (it carries 'v_pred'); LayerDiff's SD 1.5 recipe assumes "
        "epsilon prediction: fine-tune from an epsilon-prediction SD 1.5 checkpoint instead"
    ]
    assert _ignored_line(caplog, path) == f"{path}: ignored 1 tensor SD 1.5 does not use: v_pred"


def _comfyui_file(tmp_path, tiny_file, name, edit):
    sd = comfyui_saved_state_dict(tiny_file[1], "2024-02")
    edit(sd)
    return save_safetensors_atomic(sd, tmp_path / name)


def test_comfyui_saved_files_that_are_really_wrong_are_still_refused(tmp_path, tiny_file):
    proj_in = "model.diffusion_model.input_blocks.1.1.proj_in.weight"

    def wrong_shape(sd):
        sd[proj_in] = torch.zeros(16, 32, 1, 1)

    def missing(sd):
        del sd["first_stage_model.decoder.conv_out.bias"]

    def extra_clip_layer(sd):
        sd["cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(64, 32)

    def sdxl(sd):
        sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(8, 16)
        sd["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(32)

    cases = [
        (wrong_shape, rf"the unet weights do not fit the SD1\.5 unet config \(shape file vs model {proj_in} "
                      r"\(16, 32, 1, 1\) vs \(32, 32, 1, 1\)\): use an unmodified SD1\.5-architecture checkpoint"),
        (missing, r"the vae weights do not fit .*missing first_stage_model\.decoder\.conv_out\.bias\): use an"),
        (extra_clip_layer, r"the text_encoder weights do not fit .*unexpected cond_stage_model\.transformer\.text_model"
                           r"\.encoder\.layers\.2\.mlp\.fc1\.weight\): use an unmodified"),
        (sdxl, "looks like an SDXL checkpoint; LayerDiff needs a Stable Diffusion 1.5 checkpoint"),
    ]  # fmt: skip
    for edit, words in cases:
        path = _comfyui_file(tmp_path, tiny_file, f"{edit.__name__}.safetensors", edit)
        with pytest.raises(CheckpointError, match=words) as caught:
            load_sd15_single_file(path, **TINY)
        assert str(caught.value).startswith(str(path)), caught.value


# --------------------------------------------------------------------------------------------
# architecture detection


def _unet_keys(in_channels=4, context=768):
    p = "model.diffusion_model."
    return {
        p + "input_blocks.0.0.weight": (320, in_channels, 3, 3),
        p + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, context),
        p + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    }


FABRICATED = {
    "sd15": {
        **_unet_keys(),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    },
    "sd15-inpainting": _unet_keys(in_channels=9),
    "sd2": {**_unet_keys(context=1024), "cond_stage_model.model.token_embedding.weight": (49408, 1024)},
    "sdxl": {
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    },
    "sd3": {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,)},
    "flux": {
        "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
        "single_blocks.0.linear1.weight": (21504, 3072),
    },
    "layerdiff": {
        "unet.conv_in.weight": (320, 8, 3, 3),
        "prompt_enhancer.blocks.0.attn.to_q.weight": (768, 768),
    },
    "diffusers-unet": {
        "conv_in.weight": (320, 4, 3, 3),
        "time_embedding.linear_1.weight": (1280, 320),
        "down_blocks.0.attentions.0.proj_in.weight": (320, 320, 1, 1),
        "up_blocks.3.resnets.2.conv1.weight": (320, 640, 3, 3),
    },
    "unknown": {"encoder.conv_in.weight": (128, 3, 3, 3)},
}


@pytest.mark.parametrize("arch", list(FABRICATED))
def test_detect_architecture_from_a_header(tmp_path, arch):
    tensors = {k: torch.zeros(1) for k in FABRICATED[arch]}  # the header decides; shapes come separately
    header, _ = read_safetensors_header(save_safetensors_atomic(tensors, tmp_path / f"{arch}.safetensors"))
    assert set(header) == set(FABRICATED[arch])
    assert detect_architecture(FABRICATED[arch]) == arch
    # header entries (dtype, shape) are accepted as they come from read_safetensors_header
    assert detect_architecture({k: ("F16", s) for k, s in FABRICATED[arch].items()}) == arch


def test_detect_real_layouts(tiny_file):
    header, _ = read_safetensors_header(tiny_file[0])
    assert detect_architecture(header) == "sd15"
    # the UNet decides, as in ComfyUI: a stray conditioner.* tensor does not make an SD1.5 file SDXL
    stray = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)}
    assert detect_architecture({**FABRICATED["sd15"], **stray}) == "sd15"
    assert detect_architecture({**_unet_keys(context=2048), **stray}) == "sdxl"
    assert detect_architecture(tiny_file[1]["unet"].state_dict()) == "diffusers-unet"


# --------------------------------------------------------------------------------------------
# bad files


def test_wrong_architecture_is_named(tmp_path):
    path = save_safetensors_atomic(
        {k: torch.zeros(1) for k in FABRICATED["sdxl"]}, tmp_path / "xl.safetensors"
    )
    with pytest.raises(
        CheckpointError, match="looks like an SDXL checkpoint; LayerDiff needs a Stable Diffusion 1.5"
    ):
        load_sd15_single_file(path)
    path = save_safetensors_atomic(
        {k: torch.zeros(1) for k in FABRICATED["layerdiff"]}, tmp_path / "ld.safetensors"
    )
    with pytest.raises(
        CheckpointError, match="LayerDiff checkpoint; load it with the LayerDiff model loader"
    ):
        load_sd15_single_file(path)


def test_missing_component_is_named(tmp_path):
    path = tmp_path / "no_vae.safetensors"
    make_original_sd15_file(path, components=("unet", "text_encoder"))
    with pytest.raises(CheckpointError, match=r"has no VAE \(first_stage_model\.\*\) weights"):
        load_sd15_single_file(path, **TINY)
    assert set(load_sd15_single_file(path, components=["unet", "text_encoder"], **TINY)) == {
        "unet",
        "text_encoder",
    }
    with pytest.raises(LayerDiffError, match="component 'tokenizer' is not one of"):
        load_sd15_single_file(path, components=["tokenizer"])


def test_mismatched_weights_are_reported(tiny_file, tmp_path):
    path, _ = tiny_file
    with pytest.raises(
        CheckpointError, match="the unet weights do not fit the SD1.5 unet config .*shape file vs model"
    ):
        load_sd15_single_file(path, components=["unet"])  # tiny file, full-size default config
    sd, _ = read_safetensors(path)
    sd["model.diffusion_model.input_blocks.1.1.extra.weight"] = torch.zeros(2)
    del sd["model.diffusion_model.out.2.bias"]
    broken = save_safetensors_atomic(sd, tmp_path / "broken.safetensors")
    with pytest.raises(
        CheckpointError, match=r"missing model\.diffusion_model\.out\.2\.bias; unexpected .*extra\.weight"
    ):
        load_sd15_single_file(broken, **TINY)


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("absent.safetensors", None, "model file not found"),
        ("cut.safetensors", "truncate", "truncated or corrupt"),
        ("header.safetensors", b"\xff" * 8 + b"{}", "truncated or corrupt"),
        ("sd15.ckpt", "pickle", "pickle checkpoint"),
    ],
)
def test_bad_files_give_checkpoint_errors(tiny_file, tmp_path, name, content, words):
    path = tmp_path / name
    if content == "truncate":
        path.write_bytes(tiny_file[0].read_bytes()[:100_000])
    elif content == "pickle":
        torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=words):
        load_sd15_single_file(path, **TINY)


# --------------------------------------------------------------------------------------------
# diffusers folders


def test_load_diffusers_dir(tmp_path, tiny_file):
    source = tiny_file[1]
    for name, model in source.items():
        model.save_pretrained(tmp_path / name, safe_serialization=True)
    loaded = load_diffusers_dir(tmp_path)
    for name in source:
        _assert_same_weights(loaded[name], source[name])
    half = load_diffusers_dir(tmp_path, dtype=torch.float16, components=["vae"])
    assert list(half) == ["vae"] and next(half["vae"].parameters()).dtype == torch.float16

    for f in (tmp_path / "vae").glob("*.safetensors"):
        f.unlink()
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match=r"holds only pickle weights \(diffusion_pytorch_model\.bin\)"):
        load_diffusers_dir(tmp_path)
    with pytest.raises(LayerDiffError, match="is not one of"):
        load_diffusers_dir(tmp_path, components=["scheduler"])
    with pytest.raises(CheckpointError, match="use load_sd15_single_file"):
        load_diffusers_dir(tiny_file[0])


def test_original_state_dict_round_trip_keys(tiny_file):
    """The test helper's layout matches what real SD1.5 files carry (spot-check of famous names)."""
    sd = original_state_dict(tiny_file[1])
    for name in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.middle_block.1.proj_out.weight",
        "model.diffusion_model.time_embed.2.bias",
        "first_stage_model.decoder.up.0.block.2.conv2.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert name in sd, name
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
