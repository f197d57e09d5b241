"""The ComfyUI nodes, called directly (no ComfyUI here): definitions, the full chain with the tiny
model, the flat layer order, PSD save/load through the nodes, host behaviour and bad input."""

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import nodes
from layerdiff.conditioning import LayerPrompts
from layerdiff.errors import CheckpointError, LayerDiffError
from layerdiff.io.checkpoint import save_layerdiff
from layerdiff.settings import SAMPLERS, SCHEDULERS
from layerdiff.stack import LayerStack
from nodes import _host

NODES = nodes.NODE_CLASS_MAPPINGS
SOCKETS = {"LAYERDIFF_MODEL", "LAYERDIFF_PROMPTS", "LAYERDIFF_CONDITIONING", "LAYERDIFF_LAYERS"}
FAST = {"steps": 2, "cfg": 7.5, "sampler_name": "ddim"}


def node(name):
    return NODES[name]()


@pytest.fixture(autouse=True)
def folders(tmp_path):
    """Fallback folders (no ComfyUI): output, input, temp and models in this test's tmp_path."""
    for kind in ("output", "input", "temp", "layerdiff", "checkpoints"):
        _host.set_fallback_folder(kind, tmp_path / kind)
    yield tmp_path
    for kind in ("output", "input", "temp", "layerdiff", "checkpoints"):
        _host.set_fallback_folder(kind, None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the threads'
    contention makes them 5-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    (m,) = node("LayerDiffLoader").load("tiny", "none", "auto", "auto")
    return m


@pytest.fixture(scope="module")
def chain():
    p, i0 = node("LayerDiffLayerPrompt").add("a brick wall")
    p, i1 = node("LayerDiffLayerPrompt").add("a red star", p)
    p, i2 = node("LayerDiffLayerPrompt").add("a blue circle", p)
    return p, (i0, i1, i2)


@pytest.fixture(scope="module")
def layers(model, chain):
    (cond,) = node("LayerDiffPromptEnhancer").encode(model, chain[0], "", "")
    (out,) = node("LayerDiffKSampler").sample(model, cond, 7, 2, 7.5, 0.75, 0.25, "ddim", 64, 64, 2)
    return out


def snapshot(s: LayerStack):
    return [t.clone() for t in (s.images, s.masks, s.latents) if t is not None]


def unchanged(s: LayerStack, snap) -> bool:
    return all(torch.equal(a, b) for a, b in zip([t for t in (s.images, s.masks, s.latents) if t is not None], snap))


# ---------------------------------------------------------------------------- definitions


@pytest.mark.parametrize("name", sorted(NODES))
def test_node_definition(name):
    cls = NODES[name]
    assert name.startswith("LayerDiff") and cls.CATEGORY.startswith("LayerDiff/")
    assert cls.DESCRIPTION.strip() and nodes.NODE_DISPLAY_NAME_MAPPINGS[name]
    assert callable(getattr(cls, cls.FUNCTION))
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for input_name, entry in spec.get(section, {}).items():
            assert len(entry) == 2 and entry[1].get("tooltip", "").strip(), f"{name}.{input_name} has no tooltip"
            kind = entry[0]
            if isinstance(kind, str) and kind.startswith("LAYERDIFF"):
                assert kind in SOCKETS
    if getattr(cls, "OUTPUT_NODE", False):
        assert cls.RETURN_TYPES == ()
    else:
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        assert all(t.strip() for t in cls.OUTPUT_TOOLTIPS)
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    if validate is not None:  # ComfyUI passes only the named inputs: each must exist
        import inspect

        names = set(spec["required"]) | set(spec.get("optional", {}))
        assert set(inspect.signature(validate).parameters) <= names


def test_widget_defaults_are_the_builtin_models_own_settings():
    from layerdiff.io.checkpoint import BUILTIN_FILES, WEIGHTS_DIR
    from layerdiff.io.files import read_safetensors_header
    from layerdiff.settings import SamplerSettings

    meta = read_safetensors_header(WEIGHTS_DIR / BUILTIN_FILES["layerdiff-toy"])[1]
    shipped = json.loads(meta["config"])
    d = SamplerSettings.from_dict(shipped["sampling"])
    req = NODES["LayerDiffKSampler"].INPUT_TYPES()["required"]
    opt = NODES["LayerDiffKSampler"].INPUT_TYPES()["optional"]  # optional: older workflows keep loading
    for name in ("LayerDiffKSampler", "LayerDiffLayerEdit", "LayerDiffLayerInpaint", "LayerDiffLayerStyle"):
        spec = NODES[name].INPUT_TYPES()
        assert spec["required"]["steps"][1]["default"] == d.steps == 20, name
        # one default everywhere: the guidance the model's calibration picked
        assert spec["required"]["cfg"][1]["default"] == d.cfg == json.loads(meta["calibration"])["cfg"], name
        assert spec["required"]["sampler_name"][0] == list(SAMPLERS) and spec["required"]["sampler_name"][1]["default"] == "ddim"
        assert spec["optional"]["scheduler"][0] == list(SCHEDULERS) and spec["optional"]["scheduler"][1]["default"] == "normal"
        assert list(spec["optional"])[-1] == "scheduler", name  # last: earlier workflows' widget values keep their places
    assert f"{d.background_cfg:g}" in opt["background_cfg"][1]["tooltip"] and f"{d.cfg:g}" in req["cfg"][1]["tooltip"]
    assert req["mask_guidance"][1]["default"] == d.mask_guidance
    assert req["mask_guidance_start"][1]["default"] == d.mask_guidance_start
    assert req["seed"][1]["control_after_generate"] is True
    assert req["width"][1]["step"] == 8 and req["width"][1]["max"] == 4096
    assert opt["layout_cleanup"][1]["default"] == d.layout_cleanup and opt["layout_cleanup"][1]["max"] == 1.0
    assert opt["background_cfg"][1]["default"] == 0.0  # 0 = the model's own setting


def test_ksampler_background_cfg_and_layout_cleanup_widgets(model, chain, layers):
    (cond,) = node("LayerDiffPromptEnhancer").encode(model, chain[0], "", "")
    ks = node("LayerDiffKSampler")
    (same,) = ks.sample(model, cond, 7, 2, 7.5, 0.75, 0.25, "ddim", 64, 64, 2, background_cfg=0.0, layout_cleanup=1.0)
    assert torch.equal(same.latents, layers.latents)  # the model's defaults, spelled out
    (strong,) = ks.sample(model, cond, 7, 2, 7.5, 0.75, 0.25, "ddim", 64, 64, 2, background_cfg=15.0)
    assert not torch.equal(strong.latents, layers.latents)


def test_only_host_module_touches_comfyui():
    """nodes/_host.py is the single door to comfy.* / folder_paths / latent_preview."""
    for path in Path(nodes.__file__).parent.glob("*.py"):
        if path.name == "_host.py":
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            for mod in names:
                assert mod.split(".")[0] not in ("comfy", "folder_paths", "latent_preview"), f"{path.name} imports {mod}"


# ---------------------------------------------------------------------------- the chain


def test_layer_prompt_chain(chain, model):
    prompts, indices = chain
    assert isinstance(prompts, LayerPrompts) and prompts.layers == ("a brick wall", "a red star", "a blue circle")
    assert indices == (0, 1, 2)
    out = node("LayerDiffPromptEnhancer").encode(model, prompts, "", "blurry")
    (cond,) = out["result"]  # "blurry" is no word of the tiny model: the node's output text says so
    assert "blurry" in out["ui"]["text"][0]
    assert cond.global_prompts == ("a red star and a blue circle in front of a brick wall",)
    assert cond.negative_prompt == "blurry" and cond.global_tokens.device.type == "cpu"
    (cond,) = node("LayerDiffPromptEnhancer").encode(model, prompts, "a star on a wall", "")
    assert cond.global_prompts == ("a star on a wall",)


def test_sampler_output(layers):
    assert isinstance(layers, LayerStack) and layers.images.shape == (2, 3, 64, 64, 3)
    assert layers.latents.shape == (2, 3, 8, 8, 8) and layers.images.device.type == "cpu"
    assert layers.names[1] == "layer 1: a red star"


def test_split_is_sample_major_background_first(layers):
    all_rgba, all_masks, one, one_mask, count = node("LayerDiffSplitLayers").split(layers, 2)
    B, L = layers.batch_size, layers.num_layers
    assert all_rgba.shape == (B * L, 64, 64, 4) and all_masks.shape == (B * L, 64, 64) and count == L
    for b in range(B):
        for layer in range(L):
            row = b * L + layer
            assert torch.equal(all_rgba[row, ..., :3], layers.images[b, layer])
            alpha = torch.ones(64, 64) if layer == 0 else layers.masks[b, layer - 1]
            assert torch.equal(all_rgba[row, ..., 3], alpha) and torch.equal(all_masks[row], alpha)
    assert torch.equal(one, all_rgba[2::L]) and torch.equal(one_mask, all_masks[2::L])
    (flat,) = node("LayerDiffCompositeLayers").composite(layers)
    assert flat.shape == (B, 64, 64, 3) and torch.equal(flat, layers.composite())


def test_edit_nodes_keep_other_layers(model, layers):
    snap = snapshot(layers)
    (edited,) = node("LayerDiffLayerEdit").edit(model, layers, 1, "a green heart", 3, "image and mask", **FAST)
    for j in (0, 2):
        assert torch.equal(edited.images[:, j], layers.images[:, j])
        assert torch.equal(edited.latents[:, j], layers.latents[:, j])
    assert torch.equal(edited.masks[:, 1], layers.masks[:, 1])
    region = torch.zeros(64, 64)
    region[:16, :16] = 1.0  # a plain (H, W) MASK, shared by both samples
    (inpainted,) = node("LayerDiffLayerInpaint").inpaint(model, layers, 0, region, "a snowy field", 4, 0,
                                                           "image and mask", **FAST)
    assert torch.equal(inpainted.images[:, 0, 16:], layers.images[:, 0, 16:])
    assert torch.equal(inpainted.images[:, 1:], layers.images[:, 1:])
    out = node("LayerDiffLayerStyle").style(model, layers, "watercolor style", 0.5, "2", 5, **FAST)
    (styled,) = out["result"]  # the toy world has no style words: the node also returns the warning as text
    assert "watercolor" in out["ui"]["text"][0]
    assert torch.equal(styled.masks, layers.masks) and torch.equal(styled.images[:, :2], layers.images[:, :2])
    assert node("LayerDiffLayerStyle").style(model, layers, "x", 0.0, "all", 5, **FAST)[0] is layers  # strength 0: nothing encoded
    assert unchanged(layers, snap)


def test_transform_node(model, layers):
    (moved,) = node("LayerDiffTransformLayer").transform(layers, 1, 4, -4, 1.0, 2, False, 0.0, 0)
    assert moved.names == (layers.names[0], layers.names[2], layers.names[1]) and moved.latents is None
    (removed,) = node("LayerDiffTransformLayer").transform(layers, 2, 0, 0, 1.0, 0, True, 0.0, 0)
    assert removed.num_layers == 2
    one = layers.select_batch([0])
    (harmonized,) = node("LayerDiffTransformLayer").transform(one, 1, 8, 0, 1.0, 0, False, 0.25, 1, model=model)
    assert torch.equal(harmonized.images[:, 0], one.images[:, 0]) and harmonized.latents is not None
    with pytest.raises(LayerDiffError, match="needs a model"):
        node("LayerDiffTransformLayer").transform(layers, 1, 0, 0, 1.0, 0, False, 0.3, 0)


def test_layers_from_images(layers):
    all_rgba, all_masks, *_ = node("LayerDiffSplitLayers").split(layers, 1)
    L = layers.num_layers
    backgrounds = all_rgba[0::L, ..., :3]
    foregrounds = torch.cat([all_rgba[1:L], all_rgba[L + 1:]])  # sample-major, RGBA carries the masks
    (rebuilt,) = node("LayerDiffLayersFromImages").build(backgrounds, False, foregrounds)
    assert torch.equal(rebuilt.images, layers.images) and torch.equal(rebuilt.masks, layers.masks)
    assert rebuilt.latents is None
    rgb = foregrounds[..., :3]
    inverted = 1.0 - foregrounds[..., 3]  # Load Image style: 1 = transparent
    (again,) = node("LayerDiffLayersFromImages").build(backgrounds, True, rgb, inverted)
    assert torch.allclose(again.masks, layers.masks)
    p, _ = node("LayerDiffLayerPrompt").add("a wall")
    p, _ = node("LayerDiffLayerPrompt").add("a star", p)
    (named,) = node("LayerDiffLayersFromImages").build(backgrounds[:1], False, rgb[:1], all_masks[1:2], prompts=p)
    assert named.prompts == ("a wall", "a star") and named.names[1] == "layer 1: a star"
    shared = torch.ones(1, 64, 64)  # one mask per foreground, shared by both samples
    (two,) = node("LayerDiffLayersFromImages").build(backgrounds, False, rgb[[0, 2]], shared)
    assert two.masks.shape == (2, 1, 64, 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"foregrounds": torch.rand(2, 64, 64, 3)}, "are RGB and no masks were given"),
        ({"foregrounds": torch.rand(2, 64, 64, 3), "masks": torch.rand(2, 32, 64)},
         r"masks have shape \(2, 32, 64\) but the foreground images are \(2, 64, 64, 3\)"),
        ({"foregrounds": torch.rand(2, 48, 64, 4)}, r"foregrounds have shape \(2, 48, 64, 4\) but the background is \(1, 64, 64, 3\)"),
        ({"foregrounds": torch.rand(3, 64, 64, 3), "masks": torch.rand(2, 64, 64)}, "give one mask per foreground image"),
        ({"masks": torch.rand(1, 64, 64)}, "without foreground images"),
    ],
)
def test_layers_from_images_bad_input(args, message):
    with pytest.raises(LayerDiffError, match=message):
        node("LayerDiffLayersFromImages").build(torch.rand(1, 64, 64, 3), False, **args)


# ---------------------------------------------------------------------------- PSD through the nodes


def test_save_and_load_psd(layers, folders):
    out = folders / "output" / "scenes"
    out.mkdir(parents=True)
    (out / "shot_00001_.psd").write_bytes(b"taken")  # an existing file is never overwritten
    result = node("LayerDiffSavePSD").save(layers, "scenes/shot")
    psd = result["ui"]["psd"]
    assert [p["filename"] for p in psd] == ["shot_00002_.psd", "shot_00003_.psd"]
    assert all(p["subfolder"] == "scenes" and p["type"] == "output" for p in psd)
    assert (out / "shot_00001_.psd").read_bytes() == b"taken"
    assert [i["type"] for i in result["ui"]["images"]] == ["temp", "temp"]
    for i in result["ui"]["images"]:
        assert (folders / "temp" / i["subfolder"] / i["filename"]).is_file()
    second = node("LayerDiffSavePSD").save(layers.select_batch([1]), "scenes/shot")
    assert second["ui"]["psd"][0]["filename"] == "shot_00004_.psd"

    (folders / "input").mkdir()
    (out / "shot_00003_.psd").rename(folders / "input" / "scene.psd")
    assert NODES["LayerDiffLoadPSD"].INPUT_TYPES()["required"]["psd"][0] == ["scene.psd"]
    assert NODES["LayerDiffLoadPSD"].VALIDATE_INPUTS("scene.psd") is True
    assert NODES["LayerDiffLoadPSD"].IS_CHANGED("scene.psd")
    (back,) = node("LayerDiffLoadPSD").load("scene.psd")
    q8 = lambda t: (t * 255).round() / 255  # noqa: E731
    assert back.names == layers.names and back.latents is None
    torch.testing.assert_close(back.images[0], q8(layers.images[1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(back.masks[0], q8(layers.masks[1]), atol=1e-6, rtol=0)


def test_psd_bad_input(folders):
    psd_tools = pytest.importorskip("psd_tools")
    assert "not in the input folder" in NODES["LayerDiffLoadPSD"].VALIDATE_INPUTS("missing.psd")
    assert "not a .psd/.psb file" in NODES["LayerDiffLoadPSD"].VALIDATE_INPUTS("photo.png")
    (folders / "input").mkdir()
    psd_tools.PSDImage.new("RGB", (8, 8)).save(folders / "input" / "empty.psd")
    with pytest.raises(LayerDiffError, match="has no pixel layers"):
        node("LayerDiffLoadPSD").load("empty.psd")


# ---------------------------------------------------------------------------- loading


def test_loader_lists_and_loads_model_files(folders, model):
    models = folders / "layerdiff"
    models.mkdir()
    save_layerdiff(model, models / "mine.safetensors")
    choices = NODES["LayerDiffLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert "tiny" in choices and "mine.safetensors" in choices
    assert NODES["LayerDiffLoader"].VALIDATE_INPUTS("mine.safetensors") is True
    (loaded,) = node("LayerDiffLoader").load("mine.safetensors", "none", "fp32", "cpu")
    assert loaded.max_layers == model.max_layers and loaded.dtype == torch.float32
    message = NODES["LayerDiffLoader"].VALIDATE_INPUTS("gone.safetensors")
    assert "model_name 'gone.safetensors'" in message and "copy the .safetensors file there" in message
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(models / "not_layerdiff.safetensors"))
    with pytest.raises(CheckpointError, match="is not a LayerDiff checkpoint"):
        node("LayerDiffLoader").load("not_layerdiff.safetensors", "none", "auto", "cpu")
    with pytest.raises(CheckpointError, match="base_checkpoint 'sd15.safetensors' is not in models/checkpoints"):
        node("LayerDiffLoader").load("tiny", "sd15.safetensors", "auto", "cpu")


# ---------------------------------------------------------------------------- validation


def test_validate_inputs():
    ks = NODES["LayerDiffKSampler"]
    assert ks.VALIDATE_INPUTS(64, 72) is True and ks.VALIDATE_INPUTS(None, 64) is True
    assert ks.VALIDATE_INPUTS(100, 64) == "width 100 is not a multiple of 8: use 96 or 104"
    assert "height 4104 is outside 8..4096" in ks.VALIDATE_INPUTS(64, 4104)
    assert "prompt is empty" in NODES["LayerDiffLayerPrompt"].VALIDATE_INPUTS("  ")
    assert "strength 1.5 is outside 0..1" in NODES["LayerDiffLayerStyle"].VALIDATE_INPUTS(1.5)
    assert "harmonize -1" in NODES["LayerDiffTransformLayer"].VALIDATE_INPUTS(-1)


def test_bad_input_errors(model, layers, chain):
    p = chain[0]
    for extra in ("a", "b"):
        (p, _) = node("LayerDiffLayerPrompt").add(extra, p)
    with pytest.raises(LayerDiffError, match="5 layer prompts but this model generates at most 4.*remove 1"):
        node("LayerDiffPromptEnhancer").encode(model, p, "", "")
    with pytest.raises(LayerDiffError, match="layer_index 5 is out of range for a stack of 3 layers"):
        node("LayerDiffLayerEdit").edit(model, layers, 5, "x", 0, "image and mask", **FAST)
    with pytest.raises(LayerDiffError, match=r"region mask has shape \(1, 32, 32\).*\(2, 64, 64\)"):
        node("LayerDiffLayerInpaint").inpaint(model, layers, 1, torch.ones(1, 32, 32), "x", 0, 1, "image and mask", **FAST)
    with pytest.raises(LayerDiffError, match="layers_to_style 'stars' is not 'all' or a list"):
        node("LayerDiffLayerStyle").style(model, layers, "x", 0.5, "stars", 0, **FAST)
    with pytest.raises(LayerDiffError, match="layer_index 3 is out of range"):
        node("LayerDiffSplitLayers").split(layers, 3)
    with pytest.raises(LayerDiffError, match="layers must be LayerDiff layers"):
        node("LayerDiffCompositeLayers").composite(torch.rand(1, 64, 64, 3))
    with pytest.raises(LayerDiffError, match="not a multiple of 8: use 96 or 104"):
        cond = node("LayerDiffPromptEnhancer").encode(model, chain[0], "", "")[0]
        node("LayerDiffKSampler").sample(model, cond, 0, 2, 7.5, 0.0, 0.25, "ddim", 100, 64, 1)


# ---------------------------------------------------------------------------- host


def test_host_fallbacks(folders):
    assert not _host.IN_COMFYUI
    assert _host.torch_device("cpu").type == "cpu" and _host.intermediate_device().type == "cpu"
    assert _host.torch_dtype("auto", torch.device("cpu")) == torch.float32
    assert _host.torch_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(LayerDiffError, match="device 'gpu' was chosen but torch sees no GPU"):
            _host.torch_device("gpu")
    assert _host.folder("output") == str(folders / "output")
    full, base, counter, sub = _host.save_path("a/b")
    assert (Path(full), base, counter, sub) == (folders / "output" / "a", "b", 1, "a")
    with pytest.raises(LayerDiffError, match="outside the output folder"):
        _host.save_path("../escape")
    assert _host.Progress(4)(1, 4, torch.zeros(1, 3, 8, 8, 8)) is None  # no-op, never stops sampling


class FakeComfy:
    """Stand-ins for comfy.model_management / comfy.utils: a progress bar that records updates
    and an interrupt flag raised after ``stop_after`` updates."""

    class Interrupted(Exception):
        pass

    def __init__(self, stop_after=None):
        self.updates, self.stop_after = [], stop_after
        fake = self

        class ProgressBar:
            def __init__(self, total):
                self.total = total

            def update_absolute(self, value, total=None, preview=None):
                fake.updates.append((value, total, preview))

        self.ProgressBar = ProgressBar

    def throw_exception_if_processing_interrupted(self):
        if self.stop_after is not None and len(self.updates) >= self.stop_after:
            raise self.Interrupted()

    def intermediate_device(self):
        return torch.device("cpu")

    def minimum_inference_memory(self):
        return 0

    def free_memory(self, *args):
        pass


def test_progress_preview_and_interrupt_inside_comfyui(model, chain, monkeypatch):
    fake = FakeComfy(stop_after=2)
    monkeypatch.setattr(_host, "IN_COMFYUI", True)
    monkeypatch.setattr(_host, "model_management", fake)
    monkeypatch.setattr(_host, "comfy_utils", fake)
    monkeypatch.setattr(_host, "_previews_enabled", lambda: (True, 256))
    (cond,) = node("LayerDiffPromptEnhancer").encode(model, chain[0], "", "")
    with pytest.raises(FakeComfy.Interrupted):
        node("LayerDiffKSampler").sample(model, cond, 0, 6, 7.5, 0.0, 0.25, "ddim", 64, 64, 1)
    assert [u[:2] for u in fake.updates] == [(1, 6), (2, 6)]  # stopped right after the interrupt
    kind, image, size = fake.updates[0][2]
    assert kind == "JPEG" and image.size == (8, 8) and size == 256  # latent-resolution composite
    assert np.asarray(image).dtype == np.uint8


def test_root_init_does_nothing_outside_comfyui():
    import importlib.util

    root = Path(nodes.__file__).parent.parent / "__init__.py"
    spec = importlib.util.spec_from_file_location("layerdiff_pack_root", root)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and os.fspath(root)



def test_model_folder_extends_extra_model_paths(monkeypatch, tmp_path):
    """A 'layerdiff' entry from extra_model_paths.yaml is extended, never replaced."""
    yaml_dir = str(tmp_path / "shared" / "layerdiff")
    table = {"layerdiff": ([yaml_dir], set())}  # what ComfyUI's yaml loader makes: no extensions

    def add_model_folder_path(name, path, is_default=False):
        paths = table.setdefault(name, ([], set()))[0]
        if path not in paths:
            paths.append(path)

    fake = type("FolderPaths", (), {"models_dir": str(tmp_path / "models"), "folder_names_and_paths": table,
                                    "add_model_folder_path": staticmethod(add_model_folder_path)})
    monkeypatch.setattr(_host, "IN_COMFYUI", True)
    monkeypatch.setattr(_host, "folder_paths", fake)
    _host.register_model_folder()
    _host.register_model_folder()  # idempotent
    paths, extensions = table["layerdiff"]
    assert paths == [yaml_dir, str(tmp_path / "models" / "layerdiff")] and extensions == {".safetensors"}


def test_after_a_partial_load_the_tensors_no_layer_casts_are_moved():
    """lowvram: ComfyUI casts the weights of its castable layers per call and leaves the rest where
    it was; parameters held by modules with children and every buffer must follow to the device."""
    from nodes import _host

    class Castable(torch.nn.Linear):
        comfy_cast_weights = True

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Castable(2, 2)
            self.gate = torch.nn.Parameter(torch.zeros(1))
            self.register_buffer("ids", torch.arange(3), persistent=False)

    root = torch.nn.Sequential(Block(), torch.nn.LayerNorm(2))
    moved = _host.place_leftovers(root, torch.device("meta"))
    block = root[0]
    assert block.gate.device.type == "meta" and block.ids.device.type == "meta"
    assert root[1].weight.device.type == "meta"  # a plain layer nothing casts
    assert block.proj.weight.device.type == "cpu"  # cast per call: stays on the offload device
    assert moved == 4 and _host.place_leftovers(root, torch.device("meta")) == 0
