"""The real path at SD 1.5 scale, end to end on a CPU, with random weights: from a folder of photos
and a user's SD 1.5 checkpoint to a trained LayerDiff loaded in the nodes.

1. a real-size SD 1.5 checkpoint (random fp16 weights, the keys ComfyUI's CheckpointSave writes);
2. ``convert --base --fp16`` turns it into an untrained SD 1.5 LayerDiff (923 M parameters);
3. ``data build`` makes layered shards from photos with the MLCID stages' real model classes
   (BLIP, OWLv2, SAM, DPT, SD inpainting), tiny and random (a real-size set would be gigabytes);
4. ``train --init ... --base ...``: 2 optimizer steps of 2 accumulated micro-batches each, with
   gradient checkpointing, at 64 px (the new modules train; the SD weights stay frozen, which keeps
   the optimizer state to the 64 M new weights on this machine);
5. ``generate`` with the trained file on the base;
6. the nodes load it with the base from ComfyUI's checkpoints folder and sample it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlcid_tiny_models
import numpy as np
import pytest
import torch
from PIL import Image
from sd15_random_files import random_sd15_state_dict

from layerdiff.cli import main
from layerdiff.data.format import list_shards, read_shard
from layerdiff.io.files import read_safetensors, save_safetensors_atomic

PHOTOS = ("astronaut", "coffee", "chelsea")


@pytest.fixture(autouse=True, scope="module")
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _photos(folder: Path) -> Path:
    from skimage import data as skdata

    folder.mkdir(parents=True)
    for name in PHOTOS:
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        img.thumbnail((128, 128), Image.LANCZOS)
        img.save(folder / f"{name}.png")
    return folder


def test_photos_and_an_sd15_checkpoint_to_a_trained_layerdiff_in_the_nodes(tmp_path, capsys):
    # 1. the user's checkpoint
    base = tmp_path / "checkpoints" / "sd15.safetensors"
    save_safetensors_atomic(random_sd15_state_dict(0), base,
                            metadata={"prompt": json.dumps({"4": {"class_type": "CheckpointLoaderSimple"}})})
    # 2. convert
    init = tmp_path / "init.safetensors"
    assert main(["convert", "--base", str(base), "--out", str(init), "--fp16"]) == 0
    init_tensors, init_meta = read_safetensors(init)
    assert json.loads(init_meta["config"])["name"] == "sd15"
    assert sum(v.numel() for v in init_tensors.values()) > 800_000_000  # the UNet at its real width
    # 3. data build on photos with the stages' real model classes
    stages = mlcid_tiny_models.save_all(tmp_path / "mlcid")
    data = tmp_path / "data"
    argv = ["data", "build", "--images", str(_photos(tmp_path / "photos")), "--out", str(data), "--device", "cpu",
            "--dtype", "float32", "--detector-threshold", "0", "--inpaint-steps", "2", "--inpaint-resolution", "64",
            "--batch-size", "2"]
    for stage, path in stages.items():
        argv += [f"--{stage}", str(path)]
    assert main(argv) == 0
    samples = [s for p in list_shards(data) for s in read_shard(p)]
    assert samples and all(len(s.foregrounds) >= 1 for s in samples)
    # 4. train: checkpointing + accumulation, 2 steps
    config = tmp_path / "train.json"
    config.write_text(json.dumps({
        "size": 64, "gradient_checkpointing": True, "gradient_accumulation_steps": 2, "freeze_base": True,
        "lr_text": 0.0, "lr_new": 1e-4, "warmup_steps": 0, "ema_decay": 0.0, "checkpoint_every": 2,
        "log_every": 1, "sample_every": 0, "num_workers": 0, "cache_latents": False, "shuffle_buffer": 4,
    }))
    run = tmp_path / "run"
    assert main(["train", "--init", str(init), "--base", str(base), "--data", str(data), "--out", str(run),
                 "--steps", "2", "--batch-size", "1", "--config", str(config)]) == 0
    trained = run / "model.safetensors"
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    after, _ = read_safetensors(trained)
    moved = [k for k in after if k in init_tensors and not torch.equal(after[k].float(), init_tensors[k].float())]
    assert moved and all(any(m in k for m in ("inter_layer_attn", "intra_layer_attn", "prompt_enhancer", "conv_in",
                                               "conv_out")) for k in moved)
    del init_tensors, after
    # 5. generate with it on the base
    out = tmp_path / "generated"
    assert main(["generate", "--model", str(trained), "--base", str(base), "--prompt", "a cat on a table",
                 "--layer", "a table", "--layer", "a cat", "--out", str(out), "--steps", "2", "--width", "64",
                 "--height", "64", "--seed", "3"]) == 0
    pngs = sorted(p.name for p in out.rglob("*.png"))
    assert pngs, "generate wrote no images"
    # 6. the nodes: the file in models/layerdiff, the base in models/checkpoints
    import nodes
    from nodes import _host

    (tmp_path / "layerdiff").mkdir()
    os.link(trained, tmp_path / "layerdiff" / "rehearsal.safetensors")  # the same file, no 4 GB copy
    for kind in ("layerdiff", "checkpoints", "output", "input", "temp"):
        _host.set_fallback_folder(kind, tmp_path / kind)
    try:
        n = nodes.NODE_CLASS_MAPPINGS
        (model,) = n["LayerDiffLoader"]().load("rehearsal.safetensors", "sd15.safetensors", "fp32", "cpu")
        assert model.config.name == "sd15" and model.max_layers == 4
        p, _ = n["LayerDiffLayerPrompt"]().add("a table")
        p, _ = n["LayerDiffLayerPrompt"]().add("a cat", p)
        (cond,) = n["LayerDiffPromptEnhancer"]().encode(model, p, "", "")
        (stack,) = n["LayerDiffKSampler"]().sample(model, cond, 5, 2, 5.0, 0.0, 0.25, "ddim", 64, 64, 1)
        assert stack.num_layers == 2 and tuple(stack.images.shape[2:4]) == (64, 64)
        assert torch.isfinite(stack.images).all()
    finally:
        for kind in ("layerdiff", "checkpoints", "output", "input", "temp"):
            _host.set_fallback_folder(kind, None)
