"""Training at scale: gradient checkpointing, the held-out validation loss (one and two gloo
processes), sample grids on every path (``train --init`` included) and their settings' errors.

Everything runs the ``tiny`` preset on CPU with one torch thread, on toy samples of 64 px. The
shuffle buffer of the shard reader is tested in test_data_format.py.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_ranks import launch_forked

from layerdiff.config import get_preset
from layerdiff.errors import LayerDiffError
from layerdiff.io.checkpoint import build_random_model, load_layerdiff, save_layerdiff
from layerdiff.model.layers import LayeredTransformerBlock
from layerdiff.training.loop import _trained_module, enable_gradient_checkpointing, param_groups, train
from layerdiff.training.objective import LayerDiffTrainModule, NoiseSchedule, make_batch
from layerdiff.training.outputs import grid_prompts
from layerdiff.training.settings import TrainConfig
from layerdiff.training.validation import ValidationSet

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 toy training samples at 64 px in two shards."""
    from layerdiff.data.toy_dataset import generate_toy_dataset

    out = tmp_path_factory.mktemp("toydata") / "data"
    generate_toy_dataset(out, 16, seed=0, size=SIZE, samples_per_shard=8, workers=1)
    return out


@pytest.fixture(scope="module")
def val_data(tmp_path_factory) -> Path:
    """6 held-out toy samples (another seed) in two shards."""
    from layerdiff.data.toy_dataset import generate_toy_dataset

    out = tmp_path_factory.mktemp("toyval") / "val"
    generate_toy_dataset(out, 6, seed=1, size=SIZE, samples_per_shard=3, workers=1)
    return out


def settings(**kw) -> dict:
    base = dict(steps=2, batch_size=2, size=SIZE, warmup_steps=1, lr_base=1e-3, lr_new=2e-3, lr_text=1e-3,
                ema_decay=0.9, checkpoint_every=2, log_every=1, num_workers=0, cache_latents=True, seed=3)
    return {**base, **kw}


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- 1. gradient checkpointing
def _inner_calls(module: torch.nn.Module) -> list[int]:
    """Counts calls of a sub-module inside each of ``module``'s layers (recomputation calls it
    again; hooks on the checkpointed module itself may sit outside the checkpoint)."""
    calls = [0]
    for sub in module.modules():
        if sub.__class__.__name__ == "CLIPMLP" or isinstance(sub, LayeredTransformerBlock):
            inner = sub.inter_layer_attn if isinstance(sub, LayeredTransformerBlock) else sub
            inner.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_recomputes_our_blocks_and_keeps_loss_and_gradients(trained_like_tiny_model):
    """One training step's loss and every gradient (UNet, layer modules, prompt enhancer, text
    encoder) are those without checkpointing, while the layer modules inside our transformer blocks
    and the text encoder's layers really run a second time in the backward pass."""
    config = TrainConfig(lr_text=1e-3, drop_all=0.0, drop_layers=0.0)
    schedule = NoiseSchedule(trained_like_tiny_model.config.scheduler)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 8, 8, 8, generator=gen)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    batch = make_batch(latents, valid, ["a red star in front of a brick wall", "a blue sky"],
                       [["a brick wall", "a red star", "a blue circle"], ["a blue sky", "a red star", ""]],
                       trained_like_tiny_model.tokenizer, schedule, config, gen)

    def step(checkpointing: bool):
        model = copy.deepcopy(trained_like_tiny_model)
        module = LayerDiffTrainModule(model).train()
        param_groups(module, config)
        if checkpointing:
            enable_gradient_checkpointing(model, text_encoder=True)
        unet_calls, text_calls = _inner_calls(module.unet), _inner_calls(module.text_encoder)
        loss = module(**batch)
        forward = (unet_calls[0], text_calls[0])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        return loss.detach(), grads, forward, (unet_calls[0], text_calls[0])

    loss, grads, forward, after = step(False)
    loss_ck, grads_ck, forward_ck, after_ck = step(True)
    blocks, text_layers = forward
    assert blocks == 7 and text_layers == 2 * 2  # 7 transformer blocks; 2 text layers x (global, layer prompts)
    assert after == forward, "without checkpointing the backward pass must not run a forward"
    assert forward_ck == forward and after_ck == (2 * blocks, 2 * text_layers), after_ck
    torch.testing.assert_close(loss_ck, loss, rtol=0, atol=0)
    assert sorted(grads_ck) == sorted(grads)
    assert any(n.startswith("text_encoder.") for n in grads) and any("prompt_enhancer" in n for n in grads)
    assert any("inter_layer_attn" in n and grads[n].abs().max() > 0 for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ck[name], g, rtol=1e-6, atol=1e-9, msg=name)


def test_gradient_checkpointing_setting_turns_it_on_in_the_trainer():
    def flags(model) -> set:
        return {m.gradient_checkpointing for m in model.unet.unet.modules() if hasattr(m, "gradient_checkpointing")}

    model = build_random_model(get_preset("tiny"), seed=0)
    _trained_module(model, TrainConfig(gradient_checkpointing=True, lr_text=1e-3), "cpu")
    assert flags(model) == {True} and model.text_encoder.is_gradient_checkpointing
    model = build_random_model(get_preset("tiny"), seed=0)
    _trained_module(model, TrainConfig(gradient_checkpointing=True), "cpu")  # frozen text encoder: left alone
    assert flags(model) == {True} and not model.text_encoder.is_gradient_checkpointing
    model = build_random_model(get_preset("tiny"), seed=0)
    _trained_module(model, TrainConfig(), "cpu")
    assert flags(model) == {False}


# ----------------------------------------------------------------------------- 2. validation
def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_validation_loss_is_fixed_for_fixed_weights_and_moves_with_them(val_data):
    """Two sets built apart give the same number for the same weights (fixed samples, timesteps
    spread over the schedule and noise); another weight, another number; with EMA the EMA weights
    are evaluated and the live ones restored."""
    model = build_random_model(get_preset("tiny"), seed=0)
    config = TrainConfig(**settings(validation_data=str(val_data), val_every=1, val_samples=5))
    module = LayerDiffTrainModule(model).train()
    trained = {n: p for n, p in module.named_parameters()}
    accelerator = _accelerator()
    first = ValidationSet.build(model, val_data, config)
    assert len(first) == 5 and all(len(set(b["valid"].sum(1).tolist())) == 1 for b in first.batches)
    n = 5
    expected_t = sorted(int((i + 0.5) * 1000 / n) for i in range(n))
    assert sorted(torch.cat([b["t"] for b in first.batches]).tolist()) == expected_t
    value, samples = first.loss(module, accelerator, None, trained)
    assert samples == 5 and np.isfinite(value) and value > 0
    assert module.training and all(m.training for m in module.modules())
    again = ValidationSet.build(model, val_data, config).loss(module, accelerator, None, trained)
    assert again == (value, 5)

    with torch.no_grad():
        moved = {k: v.detach().clone() for k, v in trained.items()}
        key = next(k for k in moved if k.endswith("conv_out.weight"))
        moved[key] += 0.01
    before = {k: v.detach().clone() for k, v in trained.items()}
    with_ema, _ = first.loss(module, accelerator, moved, trained)
    assert with_ema != value
    assert all(torch.equal(before[k], v) for k, v in trained.items()), "the live weights must come back"
    with torch.no_grad():
        trained[key].add_(0.01)
    assert first.loss(module, accelerator, None, trained)[0] == with_ema


def test_training_logs_the_validation_loss_of_its_ema_weights(data, val_data, tmp_path):
    """val_every 2 over 4 steps: records at steps 2 and 4 with val_loss; the last is the loss of
    the exported (EMA) model, recomputed from the file."""
    out = tmp_path / "run"
    cfg = TrainConfig(**settings(steps=4, validation_data=str(val_data), val_every=2, val_samples=4))
    train(build_random_model(get_preset("tiny"), seed=0), data, out, cfg, progress=False)
    records = [r for r in log_of(out) if "val_loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["val_samples"] == 4 and r["weights"] == "ema" for r in records)
    assert records[0]["val_loss"] != records[1]["val_loss"]
    exported = load_layerdiff(out / "model.safetensors")
    module = LayerDiffTrainModule(exported)
    value, _ = ValidationSet.build(exported, val_data, cfg).loss(module, _accelerator(), None, dict(module.named_parameters()))
    assert records[1]["val_loss"] == pytest.approx(value, abs=2e-6)


def test_two_ranks_evaluate_their_shares_and_report_one_mean(data, val_data, tmp_path):
    """Two gloo ranks, 5 validation samples (3 on rank 0, 2 on rank 1): both log the same mean,
    which is the one process's mean over all 5 with the same (exported, EMA) weights."""
    out = tmp_path / "two"
    cfg = settings(validation_data=str(val_data), val_every=2, val_samples=5)
    launch_forked(2, [{"data": str(data), "out": str(out), "config": cfg}], tmp_path)
    found = []
    for rank in range(2):
        text = (out / f"rank-{rank}.log").read_text()
        found.append(re.findall(r"step 2 validation loss ([0-9.]+) \((\d+) held-out samples, EMA weights\)", text))
    assert found[0] == found[1] and len(found[0]) == 1, found
    value, samples = float(found[0][0][0]), int(found[0][0][1])
    assert samples == 5
    record = next(r for r in log_of(out) if "val_loss" in r)
    assert record["val_loss"] == pytest.approx(value, abs=1e-6)
    exported = load_layerdiff(out / "model.safetensors")
    module = LayerDiffTrainModule(exported)
    one, _ = ValidationSet.build(exported, val_data, TrainConfig(**cfg)).loss(
        module, _accelerator(), None, dict(module.named_parameters()))
    assert value == pytest.approx(one, abs=2e-6)
    share = ValidationSet.build(exported, val_data, TrainConfig(**cfg), rank=1, world=2)
    assert len(share) == 2
    assert share.loss(module, _accelerator(), None, dict(module.named_parameters()))[0] != pytest.approx(one, abs=1e-4)


# ----------------------------------------------------------------------------- 3. sample grids on every path
def test_grid_prompts_come_from_the_settings_else_validation_else_training_data(data, val_data):
    from layerdiff.data.reader import first_records

    model = build_random_model(get_preset("tiny"), seed=0)
    given = [{"global": "a red star in front of a brick wall", "layers": ["a brick wall", "a red star"]}]
    prompts = grid_prompts(model, data, TrainConfig(sample_prompts=given, validation_data=str(val_data)))
    assert [(p.global_prompt, p.layers) for p in prompts] == [(given[0]["global"], tuple(given[0]["layers"]))]
    assert grid_prompts(model, data, TrainConfig()) == []  # no sample_every: no grids

    def expected(folder) -> list:
        _, metas, _ = first_records(folder, 4, model.config.max_layers)
        return [(m["global_prompt"], (m["background_prompt"], *m["foreground_prompts"])) for m in metas]

    from_val = grid_prompts(model, data, TrainConfig(sample_every=5, validation_data=str(val_data)))
    from_train = grid_prompts(model, data, TrainConfig(sample_every=5))
    assert [(p.global_prompt, p.layers) for p in from_val] == expected(val_data)
    assert [(p.global_prompt, p.layers) for p in from_train] == expected(data)
    assert from_val != from_train
    five = [{"global": "a scene", "layers": ["sky", "a", "b", "c", "d"]}]
    with pytest.raises(LayerDiffError, match=r"sample_prompts\[0\] .*5 layers but this model makes at most 4"):
        grid_prompts(model, data, TrainConfig(sample_prompts=five))


def test_train_init_writes_a_sample_grid_every_sample_every_steps(data, val_data, tmp_path, capsys):
    """``train --init FILE`` (the SD 1.5 path) with sample_every and no sample_prompts: a grid per
    sample_every steps, one row per prompt of the first validation samples; validation runs too."""
    from layerdiff.cli import main

    init = tmp_path / "init.safetensors"
    save_layerdiff(build_random_model(get_preset("tiny"), seed=0), init, include_vae_and_text_encoder=True)
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"sample_every": 2, "num_workers": 0, "checkpoint_every": 2, "log_every": 1,
                                  "cache_latents": True, "validation_data": str(val_data), "val_every": 2,
                                  "val_samples": 3, "shuffle_buffer": 8, "gradient_checkpointing": True}))
    out = tmp_path / "run"
    assert main(["train", "--init", str(init), "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--config", str(config)]) == 0
    grid = out / "samples" / "step-000002.png"
    assert grid.is_file() and not (out / "samples" / "step-000001.png").exists()
    rows = len(grid_prompts(load_layerdiff(init), data, TrainConfig(sample_every=2, validation_data=str(val_data))))
    with Image.open(grid) as img:
        assert img.height == rows * SIZE and rows == 4
    assert [r["step"] for r in log_of(out) if "val_loss" in r] == [2]


@pytest.mark.parametrize(("settings_json", "words"), [
    ({"val_every": 10}, ["val_every 10", "validation_data"]),
    ({"validation_data": "{tmp}/missing", "val_every": 5}, ["validation_data", "missing", "neither a folder"]),
    ({"sample_prompts": [{"global": "a star", "layers": ["a wall", ""]}]}, ["sample_prompts[0]", '"layers"[1]', "foreground 1"]),
    ({"sample_prompts": [{"global": "a", "layers": ["b", "c", "d", "e", "f"]}]},
     ["sample_prompts[0]", "5 layers", "at most 4", "remove 1"]),
    ({"sample_prompts": {"global": "a"}}, ["sample_prompts", "list of 1 to 64 prompt sets"]),
    ({"shuffle_buffer": -1}, ["shuffle_buffer -1", "0 or more"]),
    ({"gradient_checkpointing": "yes"}, ["gradient_checkpointing 'yes'", "true or false"]),
    ({"val_samples": 0}, ["val_samples 0", "1 or more"]),
], ids=["val-without-data", "missing-val-data", "empty-layer-prompt", "too-many-layers", "not-a-list",
        "negative-buffer", "not-a-bool", "no-val-samples"])
def test_train_names_a_bad_new_setting_in_one_line(data, tmp_path, capsys, settings_json, words):
    from layerdiff.cli import main

    config = tmp_path / "train.json"
    config.write_text(json.dumps(settings_json).replace("{tmp}", str(tmp_path)))
    out = tmp_path / "out"
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--config", str(config)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert not out.exists(), "a failed start must leave no output folder behind"
