"""Training under FSDP2 through accelerate, on CPU: two gloo ranks started with the variables that
``accelerate launch --config_file layerdiff/presets/accelerate/fsdp.yaml`` sets (computed by
accelerate's own launcher code from the shipped file).

One set of runs serves every test (module fixture): an FSDP run of 4 steps, one stopped at step 2
and resumed in two new processes, a DDP run of the same settings and a one-process run. Each step
accumulates two micro-batches (FSDP2's gradient sync is off for the first), clips the gradient
norm, updates the EMA and, every 2 steps, evaluates 5 held-out samples (3 on rank 0, 2 on rank 1);
the UNet blocks and text encoder layers recompute their activations (gradient checkpointing).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_ranks import launch_forked, launcher_env

from layerdiff.config import get_preset
from layerdiff.io.checkpoint import build_random_model
from layerdiff.io.files import read_safetensors
from layerdiff.training.loop import train
from layerdiff.training.settings import TrainConfig
from layerdiff.training.sharding import FSDP_UNITS

CONFIG = Path(__file__).resolve().parents[1] / "layerdiff" / "presets" / "accelerate" / "fsdp.yaml"
SIZE = 64
# FSDP's reduce-scatter sums the ranks' gradients in another order than DDP's all-reduce, so the
# two runs agree to float rounding, not bit for bit: measured after 4 steps, at most 2e-6 in any
# weight, EMA or AdamW moment, except the attention key biases, whose exact gradient is zero (softmax
# ignores a shift shared by all keys): AdamW scales their rounding noise up to lr-sized steps (1.1e-5).
DDP_ATOL = 1e-5
KEY_BIAS_ATOL = 1e-4


def settings(**kw) -> dict:
    base = dict(steps=4, batch_size=2, size=SIZE, warmup_steps=1, lr_base=1e-3, lr_new=2e-3, lr_text=1e-3,
                ema_decay=0.9, checkpoint_every=2, log_every=1, num_workers=0, cache_latents=True, seed=3,
                gradient_accumulation_steps=2, val_every=2, val_samples=5, gradient_checkpointing=True)
    return {**base, **kw}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from layerdiff.data.toy_dataset import generate_toy_dataset

    root = tmp_path_factory.mktemp("fsdp")
    data, val = root / "data", root / "val"
    generate_toy_dataset(data, 16, seed=0, size=SIZE, samples_per_shard=8, workers=1)
    generate_toy_dataset(val, 6, seed=1, size=SIZE, samples_per_shard=3, workers=1)
    job = {"data": str(data), "config": settings(validation_data=str(val))}
    out = {name: root / name for name in ("fsdp", "resumed", "ddp", "one")}
    env = launcher_env(CONFIG, 2)
    launch_forked(2, [{**job, "out": str(out["fsdp"])}, {**job, "out": str(out["resumed"]), "stop_after": 2}],
                  root, env=env, timeout=240)
    assert not (out["resumed"] / "model.safetensors").exists()
    launch_forked(2, [{**job, "out": str(out["resumed"])}], root, env=env, timeout=240)  # resume, new processes
    launch_forked(2, [{**job, "out": str(out["ddp"])}], root, timeout=240)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(build_random_model(get_preset("tiny"), seed=0), data, out["one"], TrainConfig(**job["config"]),
              progress=False)
    finally:
        torch.set_num_threads(torch_threads)
    return out


def state(run: Path, step: int) -> tuple[dict, dict]:
    return read_safetensors(run / "checkpoints" / f"step-{step:06d}" / "state.safetensors")


def shapes(tensors: dict) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def without_rate(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "steps_per_s"}


def log_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_shipped_config_parses_and_names_the_settings_we_rely_on():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIG))
    assert config.distributed_type == "FSDP" and not config.use_cpu
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FULL_SHARD
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp["fsdp_activation_checkpointing"] is False
    assert tuple(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) == FSDP_UNITS
    from layerdiff.training.objective import LayerDiffTrainModule

    module = LayerDiffTrainModule(build_random_model(get_preset("tiny"), seed=0))
    assert set(FSDP_UNITS) <= {type(m).__name__ for m in module.modules()}  # accelerate refuses a missing class
    env = launcher_env(CONFIG, 2)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == ",".join(FSDP_UNITS)


def test_fsdp_run_shards_and_writes_the_files_of_a_one_process_run(runs):
    """Every trained weight was a shard; the checkpoint (model, EMA, optimizer moments) and the
    exported model hold full tensors with the keys, shapes and optimizer layout of one process."""
    log = (runs["fsdp"] / "rank-1.log").read_text()
    assert "FSDP2: " in log and " sharded across 2 processes" in log, log
    sharded, total = map(int, log.split("FSDP2: ")[1].split(" weights")[0].split(" of "))
    assert sharded == total > 100
    fsdp, meta = state(runs["fsdp"], 4)
    one, one_meta = state(runs["one"], 4)
    assert shapes(fsdp) == shapes(one)
    assert json.loads(meta["extra"]) == {"rank_count": 2, "fsdp": True}
    groups = json.loads(meta["optimizer"])["param_groups"]
    assert groups == json.loads(one_meta["optimizer"])["param_groups"]  # names, lrs, weight indices
    model, _ = read_safetensors(runs["fsdp"] / "model.safetensors")
    assert shapes(model) == shapes(read_safetensors(runs["one"] / "model.safetensors")[0])
    losses = [r["loss"] for r in log_of(runs["fsdp"]) if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    # both ranks gathered the same full weights after training
    r0, _ = read_safetensors(runs["fsdp"] / "rank-0.safetensors")
    r1, _ = read_safetensors(runs["fsdp"] / "rank-1.safetensors")
    assert max_diff(r0, r1) == 0


def test_fsdp_trains_what_ddp_trains(runs):
    """Sharded gradients, clipping, AdamW and EMA end where replicated ones do (to float rounding),
    with the same losses and validation losses; the export holds the EMA weights."""
    fsdp, _ = state(runs["fsdp"], 4)
    ddp, _ = state(runs["ddp"], 4)
    key_bias = {k for k in fsdp if k.endswith("k_proj.bias")}  # text encoder keys' biases: see KEY_BIAS_ATOL
    assert key_bias and max_diff({k: fsdp[k] for k in key_bias}, {k: ddp[k] for k in key_bias}) < KEY_BIAS_ATOL
    rest = set(fsdp) - key_bias
    assert max_diff({k: fsdp[k] for k in rest}, {k: ddp[k] for k in rest}) < DDP_ATOL
    ours = log_of(runs["fsdp"])
    theirs = log_of(runs["ddp"])
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        key = "loss" if "loss" in a else "val_loss"
        assert a[key] == pytest.approx(b[key], abs=1e-4), (a, b)
    assert [r["val_samples"] for r in ours if "val_loss" in r] == [5, 5]
    model, _ = read_safetensors(runs["fsdp"] / "model.safetensors")
    ema = {k[4:]: v for k, v in fsdp.items() if k.startswith("ema.")}
    name = next(k for k in ema if k.endswith("conv_out.weight"))
    assert torch.equal(model[name.removeprefix("unet.")], ema[name])  # the file's keys drop the module's "unet."


def test_fsdp_resume_continues_the_run_bit_identically(runs):
    """Stopped after step 2 and resumed in two new processes: the weights, EMA, optimizer state
    (every moment and step count), losses and exported file equal the uninterrupted run's."""
    resumed, meta = state(runs["resumed"], 4)
    straight, straight_meta = state(runs["fsdp"], 4)
    assert max_diff(resumed, straight) == 0
    assert json.loads(meta["optimizer"]) == json.loads(straight_meta["optimizer"])
    assert [without_rate(r) for r in log_of(runs["resumed"])] == [without_rate(r) for r in log_of(runs["fsdp"])]
    a, _ = read_safetensors(runs["resumed"] / "model.safetensors")
    b, _ = read_safetensors(runs["fsdp"] / "model.safetensors")
    assert max_diff(a, b) == 0
