"""Position features of the transformer blocks: the grid each block sees, the fixed features, the
zero start (an exact no-op), their effect once trained, the config field and checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from layerdiff.config import LayerDiffConfig, get_preset
from layerdiff.errors import LayerDiffError
from layerdiff.io.checkpoint import build_random_model, load_layerdiff, save_layerdiff
from layerdiff.model import LayerDiffUNet
from layerdiff.model.layers import block_grid, position_features


@pytest.mark.parametrize("tokens, latent, grid", [
    (256, (16, 16), (16, 16)), (64, (16, 16), (8, 8)), (16, (16, 16), (4, 4)),
    (60, (12, 20), (6, 10)), (25, (9, 10), (5, 5)), (9, (9, 10), (3, 3)), (1, (3, 5), (1, 1)),
])
def test_block_grid_follows_the_unets_downsampling(tokens, latent, grid):
    assert block_grid(tokens, latent) == grid


def test_block_grid_names_an_impossible_grid():
    with pytest.raises(LayerDiffError, match="15 positions.*9x10 latent"):
        block_grid(15, (9, 10))


def test_features_are_monotone_across_and_peak_in_the_centre():
    f = position_features(6, 8, 3)
    assert f.shape == (48, 12) and f.abs().max() <= 1
    sin_u, cos_u = f[:, 0].view(6, 8), f[:, 3].view(6, 8)  # the lowest frequency of u
    assert (sin_u[:, 1:] > sin_u[:, :-1]).all() and torch.equal(sin_u[0], sin_u[5])  # left to right, any row
    assert cos_u[0, 3] == cos_u[0, 4] == cos_u[0].max() and cos_u[0, 0] == cos_u[0].min()
    sin_v = f[:, 6].view(6, 8)
    assert (sin_v[1:] > sin_v[:-1]).all()  # top to bottom
    assert position_features(6, 8, 3, dtype=torch.float16).dtype == torch.float16


def _layered(frequencies: int):
    config = get_preset("tiny").replace(position_features=frequencies)
    torch.manual_seed(0)
    return LayerDiffUNet.from_base(UNet2DConditionModel(**config.unet), config).eval()


def _inputs(seed=0, layers=3, h=8, w=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, layers, 8, h, w, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g),
            torch.randn(2, layers, 5, 32, generator=g))


def test_untrained_position_features_are_an_exact_no_op():
    plain, with_pos = _layered(0), _layered(3)
    keys = [k for k in with_pos.state_dict() if ".position." in k]
    assert keys and all(with_pos.state_dict()[k].abs().sum() == 0 for k in keys)
    missing, unexpected = with_pos.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(keys) and not unexpected
    with torch.no_grad():
        x, t, glob, lay = _inputs()
        assert torch.equal(with_pos(x, t, glob, lay), plain(x, t, glob, lay))


def test_trained_position_features_make_the_output_depend_on_where():
    model = _layered(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".position." in name:
                p.normal_(0, 0.5)
        # a uniform input: without position features every interior cell would get the same output
        x = torch.zeros(1, 2, 8, 8, 8)
        glob, lay = torch.zeros(1, 7, 32), torch.zeros(1, 2, 5, 32)
        out = model(x, torch.tensor([500]), glob, lay)
        plain = copy.deepcopy(model)
        for name, p in plain.named_parameters():
            if ".position." in name:
                p.zero_()
        base = plain(x, torch.tensor([500]), glob, lay)
        assert not torch.allclose(out, base)
        # non-square latents take the same weights
        assert model(*_inputs(1, 2, 6, 10)).shape == (2, 2, 8, 6, 10)


def test_config_field_is_checked_and_old_configs_have_none():
    assert get_preset("toy").position_features == 3 and get_preset("sd15").position_features == 0
    data = get_preset("tiny").to_dict()
    data.pop("position_features")
    assert LayerDiffConfig.from_dict(data).position_features == 0  # files written before the field
    for bad in (-1, 17, 2.5, "3"):
        with pytest.raises(LayerDiffError, match="position_features"):
            LayerDiffConfig.from_dict({**data, "position_features": bad})
    with pytest.raises(LayerDiffError, match="position_features 99 is out of range"):
        get_preset("tiny").replace(position_features=99)


def test_checkpoint_round_trip_keeps_the_position_weights(tmp_path):
    model = build_random_model(get_preset("tiny").replace(position_features=2), seed=1)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if ".position." in name:
                p.normal_(0, 0.1)
    path = save_layerdiff(model, tmp_path / "m.safetensors")
    loaded = load_layerdiff(path)
    assert loaded.config.position_features == 2
    json.dumps(loaded.config.to_dict())
    a = {k: v for k, v in model.unet.state_dict().items() if ".position." in k}
    b = {k: v for k, v in loaded.unet.state_dict().items() if ".position." in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
