"""v-prediction (Salimans & Ho 2022): the training target and its Min-SNR weights, the sampler turning
a v-prediction into the noise it predicts (so a v-model samples exactly like the noise model it
wraps, with every sampler and hook), the config check, and the toy preset's low-resolution schedule."""

from __future__ import annotations

import math

import pytest
import torch
from sampling_support import PROMPTS, sample_with
from torch import nn

from layerdiff.conditioning import encode_prompts
from layerdiff.config import LOW_RES_SCHEDULER, SD_SCHEDULER, get_preset
from layerdiff.config_check import check_config_dict
from layerdiff.errors import LayerDiffError
from layerdiff.training.objective import NoiseSchedule, make_batch
from layerdiff.training.settings import TrainConfig

V_SCHEDULER = {**SD_SCHEDULER, "prediction_type": "v_prediction"}


class VFromNoise(nn.Module):
    """A v-prediction UNet made from a noise-prediction one: with x0 = (x - sqrt(1 - a) eps) / sqrt(a),
    v = sqrt(a) eps - sqrt(1 - a) x0 = (eps - sqrt(1 - a) x) / sqrt(a)."""

    def __init__(self, unet: nn.Module, scheduler_config: dict):
        super().__init__()
        self.inner = unet
        a = NoiseSchedule(scheduler_config).alphas_cumprod.double()
        self.sigmas = ((1 - a) / a).sqrt()  # the VE noise levels of the training timesteps

    @property
    def device(self):
        return self.inner.device

    @property
    def dtype(self):
        return self.inner.dtype

    def forward(self, x, t, glob, lay, valid=None):
        eps = self.inner(x, t, glob, lay, valid=valid)
        # a (fractional) timestep's level as the samplers place it: sigma interpolated linearly
        t = float(t)
        lo = min(int(t), len(self.sigmas) - 2)
        sigma = self.sigmas[lo] + (t - lo) * (self.sigmas[lo + 1] - self.sigmas[lo])
        a = (1 / (1 + sigma**2)).to(x)
        return (eps - (1 - a).sqrt() * x) / a.sqrt()


def test_v_target_recovers_noise_and_clean_latents_and_noise_target_is_unchanged():
    v_sched, eps_sched = NoiseSchedule(V_SCHEDULER), NoiseSchedule(SD_SCHEDULER)
    assert v_sched.v_prediction and not eps_sched.v_prediction
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 8, 4, 4, generator=g), torch.randn(3, 2, 8, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(eps_sched.target(x0, noise, t), noise)
    v = v_sched.target(x0, noise, t)
    xt = v_sched.add_noise(x0, noise, t)
    a = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * v + (1 - a).sqrt() * xt, noise, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=0)
    # at the noisiest step v is almost minus the clean latent: the loss there teaches x0
    assert torch.nn.functional.cosine_similarity(v[2].flatten(), -x0[2].flatten(), dim=0) > 0.99


def test_min_snr_for_v_weighs_the_clean_latent_at_least_once_and_at_most_gamma():
    sched = NoiseSchedule(V_SCHEDULER)
    t = torch.arange(0, 1000, 7)
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    w = sched.snr_weight(t, 5.0)
    x0_weight = w * (snr + 1)  # the v-loss weighs the clean latent's error SNR + 1
    assert x0_weight.ge(1 - 1e-5).all() and x0_weight.le(5 + 1e-4).all()
    assert w[-1] == 1.0 and w[0] < 0.01  # the noisiest steps keep their full weight
    eps_w = NoiseSchedule(SD_SCHEDULER).snr_weight(t, 5.0)  # the noise model's Min-SNR, unchanged
    a_sd = NoiseSchedule(SD_SCHEDULER).alphas_cumprod[t]
    torch.testing.assert_close(eps_w, (a_sd / (1 - a_sd)).clamp(max=5.0) / (a_sd / (1 - a_sd)))


def test_training_batch_of_a_v_model_targets_v(tiny_model):
    sched = NoiseSchedule(V_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2, 8, 4, 4, generator=g)
    valid = torch.ones(2, 2, dtype=torch.bool)
    batch = make_batch(latents, valid, ["a red star", "a blue sky"], [["a", "b"], ["c", "d"]], tiny_model.tokenizer,
                       sched, TrainConfig(drop_all=0.0, drop_layers=0.0), torch.Generator().manual_seed(1))
    a = sched.alphas_cumprod[batch["t"]].view(-1, 1, 1, 1, 1)
    x0_back = a.sqrt() * batch["noisy"] - (1 - a).sqrt() * batch["target"]
    torch.testing.assert_close(x0_back, latents, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_ancestral", "dpmpp_2m", "uni_pc"])
def test_a_v_model_samples_exactly_like_the_noise_model_it_wraps(trained_like_tiny_model, sampler):
    model = trained_like_tiny_model
    cond = encode_prompts(model, PROMPTS)
    kw = dict(sampler=sampler, steps=6, cfg=3.0, mask_guidance=0.5, mask_guidance_start=0.0,
              layout_cleanup=1.0, empty_latent=model.empty_layer_latent())
    eps = sample_with(model, cond, **kw)
    wrapped = VFromNoise(model.unet, V_SCHEDULER)
    from layerdiff.sampling import sample
    from layerdiff.settings import SamplerSettings

    settings = SamplerSettings(sampler=sampler, steps=6, cfg=3.0, mask_guidance=0.5, mask_guidance_start=0.0,
                               layout_cleanup=1.0)
    v = sample(wrapped, cond, 8, 8, [0], settings, scheduler_config=V_SCHEDULER, mask_axis=model.mask_axis(),
               empty_latent=model.empty_layer_latent())
    torch.testing.assert_close(v, eps, atol=2e-4, rtol=1e-4)
    # control: the same v-model read as a noise model samples something else
    wrong = sample(wrapped, cond, 8, 8, [0], settings, scheduler_config=SD_SCHEDULER, mask_axis=model.mask_axis(),
                   empty_latent=model.empty_layer_latent())
    assert (wrong - eps).abs().max() > 0.1


def test_config_check_takes_v_prediction_and_names_an_unknown_prediction_type():
    config = get_preset("tiny").to_dict()
    config["scheduler"] = {**config["scheduler"], "prediction_type": "v_prediction"}
    check_config_dict(config)
    config["scheduler"]["prediction_type"] = "sample"
    with pytest.raises(LayerDiffError) as e:
        check_config_dict(config)
    assert "prediction_type" in str(e.value) and "sample" in str(e.value) and "v_prediction" in str(e.value)


def test_low_res_schedule_hides_a_16x16_layout_at_its_noisiest_step():
    """The small-latent schedule ends far noisier than SD's, which was made for 64x64 latents: its
    last signal-to-noise ratio is below SD's divided by 16 (the resolution shift for a quarter of the side)."""
    assert LOW_RES_SCHEDULER["prediction_type"] == "v_prediction"
    last = [NoiseSchedule(c).alphas_cumprod[-1].item() for c in (LOW_RES_SCHEDULER, SD_SCHEDULER)]
    snr = [a / (1 - a) for a in last]
    assert snr[0] < snr[1] / 16
    assert math.isclose(snr[1], 0.0047, rel_tol=0.05)


def test_toy_recipe_takes_a_scheduler_setting_into_the_model_config(tmp_path):
    """The recipe's "scheduler" setting reaches the config of the model it trains (the toy preset
    itself keeps SD's schedule)."""
    from argparse import Namespace

    from layerdiff.training.recipes import _toy_recipe, recipe_config

    assert get_preset("toy").scheduler == SD_SCHEDULER
    args = Namespace(steps=None, batch_size=None, vae_steps=None, seed=0, samples=None)
    assert recipe_config(_toy_recipe(args, {})[0]).scheduler == SD_SCHEDULER
    recipe, _ = _toy_recipe(args, {"scheduler": {"beta_schedule": "linear", "prediction_type": "v_prediction"}})
    config = recipe_config(recipe)
    check_config_dict(config.to_dict())
    assert config.scheduler == {**SD_SCHEDULER, "beta_schedule": "linear", "prediction_type": "v_prediction"}
    assert NoiseSchedule(config.scheduler).v_prediction
