"""SamplerSettings: one frozen object for every sampling knob, resolved against a model's defaults;
sampler and scheduler as separate choices, with the combined names of earlier versions mapped."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import nodes
from layerdiff.config import LayerDiffConfig, get_preset
from layerdiff.errors import LayerDiffError
from layerdiff.settings import DEFAULTS, PLAIN, SamplerSettings, split_sampler


def test_frozen_checked_and_plain_numbers():
    s = SamplerSettings(steps=4, cfg=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.cfg = 2.0
    assert type(s.cfg) is float and s.cfg == 3.0 and s.background_cfg is None
    for name, bad in (("steps", 0), ("cfg", math.nan), ("mask_guidance", -1.0), ("empty_layer_retries", 1.5),
                      ("layout_cleanup", True), ("eta", "0")):
        with pytest.raises(LayerDiffError, match=name):
            SamplerSettings(**{name: bad})
    with pytest.raises(LayerDiffError, match="sampler 'nope' is unknown: choose one of ddim, euler"):
        SamplerSettings(sampler="nope")
    with pytest.raises(LayerDiffError, match="scheduler 'exponential' is unknown: choose one of normal, karras"):
        SamplerSettings(scheduler="exponential")
    with pytest.raises(LayerDiffError, match="no karras schedule"):
        SamplerSettings(sampler="ddim", scheduler="karras")


def test_earlier_combined_sampler_names_are_mapped():
    assert split_sampler("dpmpp_2m_karras") == ("dpmpp_2m", "karras")
    assert split_sampler("dpmpp_2m_karras", "normal") == ("dpmpp_2m", "karras")  # an old workflow's new widget default
    assert split_sampler("unipc") == ("uni_pc", "normal") and split_sampler("euler", None) == ("euler", None)
    s = SamplerSettings(sampler="dpmpp_2m_karras")
    assert (s.sampler, s.scheduler) == ("dpmpp_2m", "karras")
    old_file = {"steps": 20, "cfg": 3.0, "scheduler": "unipc", "mask_guidance_blur_sigma": 2.0}
    s = SamplerSettings.from_dict(old_file)
    assert (s.sampler, s.scheduler, s.mask_guidance_blur) == ("uni_pc", "normal", 2.0)
    assert SamplerSettings.from_dict(s.to_dict()) == s  # round trip
    with pytest.raises(LayerDiffError, match="unknown sampler setting"):
        SamplerSettings.from_dict({"cfgg": 1.0})


def test_resolve_takes_the_models_defaults_then_the_librarys():
    toy = get_preset("toy")
    s = SamplerSettings(cfg=5.0).resolve(toy)
    assert s.cfg == 5.0 and s.steps == toy.sampling.steps == 20 and s.background_cfg == toy.sampling.background_cfg
    assert s.resolved and not SamplerSettings().resolved
    assert SamplerSettings().resolve() == DEFAULTS and SamplerSettings().resolve(None) == DEFAULTS
    bare = dataclasses.replace(toy, sampling=SamplerSettings(steps=7).over(DEFAULTS))
    assert SamplerSettings().resolve(bare).steps == 7 and SamplerSettings().resolve(bare).cfg == DEFAULTS.cfg
    assert PLAIN.mask_guidance == PLAIN.layout_cleanup == PLAIN.empty_layer_retries == 0
    with pytest.raises(LayerDiffError, match="no karras schedule"):
        SamplerSettings(scheduler="karras").resolve(toy)  # the toy model's sampler is ddim


def test_a_model_config_round_trips_its_settings_and_reads_earlier_files():
    toy = get_preset("toy")
    again = LayerDiffConfig.from_json(toy.to_json())
    assert again.sampling == toy.sampling and isinstance(again.sampling, SamplerSettings)
    data = json.loads(toy.to_json())
    data["sampling"] = {"steps": 9, "scheduler": "dpmpp_2m_karras", "mask_guidance_blur_sigma": 1.5}  # an earlier file
    old = LayerDiffConfig.from_dict(data)
    assert (old.sampling.steps, old.sampling.sampler, old.sampling.scheduler) == (9, "dpmpp_2m", "karras")
    assert old.sampling.mask_guidance_blur == 1.5 and old.sampling.cfg == DEFAULTS.cfg
    data["sampling"] = {"scheduler": "exponential"}
    with pytest.raises(LayerDiffError, match="scheduler"):
        LayerDiffConfig.from_dict(data)


@pytest.fixture(scope="module")
def tiny_node_model():
    torch.set_num_threads(1)
    (m,) = nodes.NODE_CLASS_MAPPINGS["LayerDiffLoader"]().load("tiny", "none", "auto", "auto")
    return m


def test_ksampler_maps_earlier_workflow_values(tiny_node_model):
    """A workflow saved before the split carries a combined name in the sampler_name slot and no
    scheduler: it runs as the mapped pair; ComfyUI's list check is left to VALIDATE_INPUTS."""
    model = tiny_node_model
    n = nodes.NODE_CLASS_MAPPINGS
    p, _ = n["LayerDiffLayerPrompt"]().add("a brick wall")
    p, _ = n["LayerDiffLayerPrompt"]().add("a red star", p)
    (cond,) = n["LayerDiffPromptEnhancer"]().encode(model, p, "", "")
    ks = n["LayerDiffKSampler"]()
    args = (model, cond, 7, 2, 7.5, 0.75, 0.25)
    (old,) = ks.sample(*args, "dpmpp_2m_karras", 64, 64, 1)
    (new,) = ks.sample(*args, "dpmpp_2m", 64, 64, 1, scheduler="karras")
    (normal,) = ks.sample(*args, "dpmpp_2m", 64, 64, 1)
    assert torch.equal(old.latents, new.latents) and not torch.equal(new.latents, normal.latents)
    (a,) = ks.sample(*args, "unipc", 64, 64, 1)
    (b,) = ks.sample(*args, "uni_pc", 64, 64, 1)
    assert torch.equal(a.latents, b.latents)
    import inspect

    assert "sampler_name" in inspect.signature(ks.VALIDATE_INPUTS).parameters
    assert ks.VALIDATE_INPUTS(64, 64, sampler_name="dpmpp_2m_karras", scheduler="normal") is True
    assert "unknown" in ks.VALIDATE_INPUTS(64, 64, sampler_name="nope")
    assert "karras" in ks.VALIDATE_INPUTS(64, 64, sampler_name="ddim", scheduler="karras")


def test_api_prompts_of_earlier_versions_are_upgraded_before_validation():
    from nodes.upgrade import upgrade_request

    body = {"client_id": "x", "prompt": {
        "1": {"class_type": "LayerDiffKSampler", "inputs": {"scheduler": "dpmpp_2m_karras", "steps": 3}},
        "2": {"class_type": "LayerDiffLayerEdit", "inputs": {"scheduler": "ddim"}},
        "3": {"class_type": "LayerDiffLayerStyle", "inputs": {"sampler_name": "euler", "scheduler": "karras"}},
        "4": {"class_type": "KSampler", "inputs": {"scheduler": "normal", "sampler_name": "euler"}},
        "5": {"class_type": "LayerDiffLayerInpaint", "inputs": {"scheduler": ["9", 0]}},  # linked: left alone
        "6": "junk", "7": {"class_type": "LayerDiffKSampler"}}}
    out = upgrade_request(body)
    p = out["prompt"]
    assert p["1"]["inputs"] == {"sampler_name": "dpmpp_2m", "scheduler": "karras", "steps": 3}
    assert p["2"]["inputs"] == {"sampler_name": "ddim", "scheduler": "normal"}
    assert p["3"]["inputs"] == {"sampler_name": "euler", "scheduler": "karras"}
    assert p["4"]["inputs"] == {"scheduler": "normal", "sampler_name": "euler"}
    assert p["5"]["inputs"] == {"scheduler": ["9", 0]} and p["6"] == "junk"
    assert upgrade_request(None) is None and upgrade_request({"prompt": 5}) == {"prompt": 5}


def test_sampler_choice_reads_earlier_values_in_either_input():
    from layerdiff.settings import sampler_choice

    assert sampler_choice("ddim", "normal") == ("ddim", "normal")
    assert sampler_choice("ddim", "dpmpp_2m_karras") == ("dpmpp_2m", "karras")  # an old API prompt loaded in the editor
    assert sampler_choice("ddim", "euler") == ("euler", "normal")
    assert sampler_choice("unipc", None) == ("uni_pc", "normal") and sampler_choice(None, None) == (None, None)
    assert sampler_choice("ddim", "nope") == ("ddim", "nope")  # left for the settings' check to name
    ks = nodes.NODE_CLASS_MAPPINGS["LayerDiffKSampler"]
    assert ks.VALIDATE_INPUTS(64, 64, sampler_name="ddim", scheduler="dpmpp_2m_karras") is True
    assert "scheduler 'nope' is unknown" in ks.VALIDATE_INPUTS(64, 64, sampler_name="ddim", scheduler="nope")
