"""LayerDiff files as adapters, and LayerDiff on SD 1.5 weights a host holds (Apply LayerDiff to Model).

The SD 1.5 checkpoints are tiny random models with the real key layout, saved the way ComfyUI's
CheckpointSave saves them; the equivalence checks use untrained (zero-initialised) layer modules,
with which one layer of LayerDiff must reproduce the SD UNet it sits on.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from ldm_layout import TINY_CONFIGS, build_tiny_models, comfyui_saved_state_dict, make_comfyui_saved_file

from layerdiff.cli import main
from layerdiff.config import get_preset
from layerdiff.errors import CheckpointError
from layerdiff.io.adapter import ADAPTER, split_names
from layerdiff.io.checkpoint import describe_file, layerdiff_kind, load_layerdiff, save_layerdiff
from layerdiff.io.convert import convert_sd15
from layerdiff.io.files import read_safetensors_header
from layerdiff.io.on_model import load_on_weights

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None,
    reason="the CLIP tokenizer vocabulary comes from open_clip_torch (pip install --no-deps open_clip_torch)",
)

UNET = "model.diffusion_model."


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # conftest's: torch on one thread for this module
    yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Base A (ComfyUI-saved), an untrained LayerDiff file built on A, a 'trained' one (random layer
    modules), its adapter, and a second checkpoint B (a fine-tune of the same architecture)."""
    root = tmp_path_factory.mktemp("on_model")
    a = build_tiny_models(seed=0)
    make_comfyui_saved_file(root / "a.safetensors", models=a)
    config = get_preset("sd15", max_layers=3)
    untrained = convert_sd15(
        root / "a.safetensors", root / "untrained.safetensors", config=config, base_config=config.replace(**TINY_CONFIGS)
    )
    model = load_layerdiff(untrained, base=root / "a.safetensors")
    gen = torch.Generator().manual_seed(5)
    _, adapter_names = split_names({k: tuple(v.shape) for k, v in model.unet.state_dict().items()
                                    if k.startswith("unet.")}, model.config)
    with torch.no_grad():  # layer modules and the mask channels of the widened convolutions: trained
        for name, p in model.unet.named_parameters():
            if name in ("unet.conv_in.weight", "unet.conv_out.weight", "unet.conv_out.bias"):
                p.narrow(1 if name == "unet.conv_in.weight" else 0, 4, 4).normal_(0, 0.05, generator=gen)
            elif name in adapter_names or name.startswith("prompt_enhancer."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    trained = save_layerdiff(model.unet, root / "trained.safetensors", include_vae_and_text_encoder=False)
    adapter = save_layerdiff(model.unet, root / "adapter.safetensors", kind=ADAPTER)
    b = build_tiny_models(seed=1)
    return {"root": root, "a": a, "b": b, "untrained": untrained, "trained": trained, "adapter": adapter,
            "trained_unet": model.unet}


def _inputs(layers=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, layers, 8, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)


def _one_layer(model, x, ctx, t=321):
    with torch.no_grad():
        return model.unet(x, t, ctx, model.unet.enhance(ctx, ctx[:, None].expand(-1, x.shape[1], -1, -1)))


def test_adapter_file_holds_only_layer_modules_and_loads_like_the_full_file(files):
    full, adapter = files["trained"], files["adapter"]
    assert layerdiff_kind(adapter) == "adapter" and layerdiff_kind(full) == "full"
    info = describe_file(adapter)
    assert info["layerdiff_config"]["kind"] == "adapter"
    names = set(read_safetensors_header(adapter)[0])
    assert "unet.conv_in.weight" in names and "unet.conv_out.bias" in names  # widened: adapter weights
    assert "unet.conv_in.bias" not in names and "unet.time_embedding.linear_1.weight" not in names
    assert any(".inter_layer_attn." in n for n in names) and any(n.startswith("prompt_enhancer.") for n in names)
    assert info["parameters"] < describe_file(full)["parameters"] / 2
    with pytest.raises(CheckpointError, match="adapter.*SD 1.5 checkpoint"):
        load_layerdiff(adapter)
    on_a = load_layerdiff(adapter, base=files["root"] / "a.safetensors")
    reference = files["trained_unet"].state_dict()
    for k, v in on_a.unet.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_info_command_names_the_kind(files, capsys):
    assert main(["info", str(files["adapter"])]) == 0
    assert "adapter" in capsys.readouterr().out


@pytest.mark.parametrize("checkpoint", ["a", "b"])
def test_untrained_layerdiff_on_held_weights_reproduces_that_unet(files, checkpoint):
    """One layer of an untrained LayerDiff on a checkpoint's weights = that checkpoint's own UNet
    (B: a fine-tune the LayerDiff file was not built from)."""
    models = files[checkpoint]
    tensors = comfyui_saved_state_dict(models)
    model = load_on_weights(files["untrained"], tensors, source="test MODEL")
    x, ctx = _inputs()
    out = _one_layer(model, x, ctx)
    with torch.no_grad():
        ref = models["unet"](x[:, 0, :4], 321, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(out[:, 0, :4], ref, atol=1e-5, rtol=1e-5)
    for name in ("vae", "text_encoder"):
        own = getattr(model, name).state_dict()
        for k, v in models[name].state_dict().items():
            if not k.endswith("position_ids"):
                assert torch.equal(own[k], v), (name, k)


def test_held_weights_are_copied_not_changed(files):
    tensors = comfyui_saved_state_dict(files["b"])
    before = {k: v.clone() for k, v in tensors.items()}
    model = load_on_weights(files["trained"], tensors)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(1.0)
    assert all(torch.equal(tensors[k], before[k]) for k in before)


def test_base_weights_model_takes_sd_weights_from_the_model_and_layer_modules_from_the_file(files):
    tensors = comfyui_saved_state_dict(files["b"])
    trained = files["trained_unet"].state_dict()
    b_unet = files["b"]["unet"].state_dict()
    for source in ("trained", "adapter"):
        model = load_on_weights(files[source], tensors, base_weights="model")
        sd = model.unet.state_dict()
        assert torch.equal(sd["unet.time_embedding.linear_1.weight"], b_unet["time_embedding.linear_1.weight"])
        assert torch.equal(sd["unet.conv_in.weight"][:, :4], b_unet["conv_in.weight"])
        assert torch.equal(sd["unet.conv_in.weight"][:, 4:], trained["unet.conv_in.weight"][:, 4:])
        assert torch.equal(sd["unet.conv_out.bias"][:4], b_unet["conv_out.bias"])
        assert torch.equal(sd["unet.conv_out.bias"][4:], trained["unet.conv_out.bias"][4:])
        layer_keys = [k for k in sd if ".inter_layer_attn." in k or k.startswith("prompt_enhancer.")]
        assert layer_keys and all(torch.equal(sd[k], trained[k]) for k in layer_keys)


def test_base_weights_layerdiff_adds_the_models_weight_changes(files):
    tensors = comfyui_saved_state_dict(files["b"])
    trained = files["trained_unet"].state_dict()
    attn = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    g = torch.Generator().manual_seed(3)
    deltas = {
        UNET + attn: torch.randn(tensors[UNET + attn].shape, generator=g),
        UNET + "input_blocks.0.0.weight": torch.randn(tensors[UNET + "input_blocks.0.0.weight"].shape, generator=g),
    }
    model = load_on_weights(files["trained"], tensors, base_weights="layerdiff", deltas=deltas)
    sd = model.unet.state_dict()
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    torch.testing.assert_close(sd[key], trained[key] + deltas[UNET + attn])
    torch.testing.assert_close(sd["unet.conv_in.weight"][:, :4],
                               trained["unet.conv_in.weight"][:, :4] + deltas[UNET + "input_blocks.0.0.weight"])
    assert torch.equal(sd["unet.conv_in.weight"][:, 4:], trained["unet.conv_in.weight"][:, 4:])
    assert torch.equal(sd["unet.time_embedding.linear_1.weight"], trained["unet.time_embedding.linear_1.weight"])
    # without deltas: exactly the file's UNet
    plain = load_on_weights(files["trained"], tensors, base_weights="layerdiff").unet.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in plain.items())


def test_bad_combinations_are_refused_with_the_fix(files, tmp_path):
    tensors = comfyui_saved_state_dict(files["b"])
    with pytest.raises(CheckpointError, match="adapter.*base_weights to 'model'"):
        load_on_weights(files["adapter"], tensors, base_weights="layerdiff")
    with pytest.raises(CheckpointError, match="base_weights 'blend' is unknown"):
        load_on_weights(files["trained"], tensors, base_weights="blend")
    with pytest.raises(CheckpointError, match="'toy'.*Load LayerDiff"):
        load_on_weights("layerdiff/weights/layerdiff-toy.safetensors", tensors)
    with pytest.raises(CheckpointError, match="SD 1.5 UNet does not have"):
        load_on_weights(files["trained"], tensors, base_weights="layerdiff",
                        deltas={UNET + "no_such_block.weight": torch.zeros(2)})
    wrong = dict(tensors)
    wrong[UNET + "out.2.weight"] = torch.zeros(4, 16, 3, 3)  # another width than the file was built on
    with pytest.raises(CheckpointError, match="my MODEL does not fit .*trained.safetensors"):
        load_on_weights(files["trained"], wrong, source="my MODEL")
    sdxl = {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2),
            UNET + "input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}
    with pytest.raises(CheckpointError, match="SDXL"):
        load_on_weights(files["trained"], sdxl, source="my MODEL")


def test_convert_writes_adapters_from_a_layerdiff_file_and_from_a_base(files, tmp_path, capsys):
    out = tmp_path / "from_file.safetensors"
    assert main(["convert", "--layerdiff", str(files["trained"]), "--adapter", "--out", str(out)]) == 0
    from layerdiff.io.files import read_safetensors

    ours, reference = read_safetensors(out)[0], read_safetensors(files["adapter"])[0]
    assert set(ours) == set(reference) and all(torch.equal(ours[k], reference[k]) for k in ours)
    assert layerdiff_kind(out) == "adapter"
    assert main(["convert", "--layerdiff", str(files["trained"]), "--adapter", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--layerdiff", str(out), "--adapter", "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "already an adapter" in capsys.readouterr().err
    assert main(["convert", "--layerdiff", str(files["trained"]), "--out", str(tmp_path / "y.safetensors")]) == 1
    assert "add --adapter" in capsys.readouterr().err
    config = get_preset("sd15", max_layers=3)
    untrained = convert_sd15(files["root"] / "a.safetensors", tmp_path / "base_adapter.safetensors", config=config,
                             base_config=config.replace(**TINY_CONFIGS), adapter=True)
    assert layerdiff_kind(untrained) == "adapter"
    # an untrained adapter on checkpoint B reproduces B's UNet for one layer
    model = load_on_weights(untrained, comfyui_saved_state_dict(files["b"]))
    x, ctx = _inputs()
    with torch.no_grad():
        ref = files["b"]["unet"](x[:, 0, :4], 321, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(_one_layer(model, x, ctx)[:, 0, :4], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base_weights", ["model", "layerdiff"])
def test_shared_weights_are_the_hosts_memory_and_are_never_written(files, base_weights):
    """share=True (Apply LayerDiff to Model): the held weights of the right dtype become the modules'
    own tensors, not copies, and loading, LoRA deltas and sampling leave every held tensor as it was."""
    tensors = comfyui_saved_state_dict(files["b"])
    before = {k: v.clone() for k, v in tensors.items()}
    attn = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    deltas = {UNET + attn: torch.ones_like(tensors[UNET + attn])}
    model = load_on_weights(files["trained"], tensors, base_weights=base_weights, deltas=deltas, share=True)
    vae_weight = model.vae.state_dict()["decoder.conv_in.weight"]
    assert vae_weight.data_ptr() == tensors["first_stage_model.decoder.conv_in.weight"].data_ptr()
    shared_unet = model.unet.state_dict()["unet.time_embedding.linear_1.weight"].data_ptr()
    assert (shared_unet == tensors[UNET + "time_embed.0.weight"].data_ptr()) == (base_weights == "model")
    x, ctx = _inputs(layers=2)
    _one_layer(model, x, ctx)
    assert all(torch.equal(tensors[k], before[k]) for k in before)
