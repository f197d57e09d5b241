"""Random real-size SD 1.5 files as a user has them, for the real-ComfyUI tests of issue 27.

    python tests/sd15_random_files.py ROOT

writes ROOT/a.safetensors and ROOT/b.safetensors (two SD 1.5 checkpoints, random fp16 weights, with
the keys ComfyUI's CheckpointSave writes), ROOT/lora.safetensors (a kohya-named LoRA, a LoCon on
conv_in among it) and ROOT/layerdiff/untrained_sd15.safetensors (an untrained LayerDiff built on A).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm_layout import sd15_full_size_header  # noqa: E402

from layerdiff.config import get_preset  # noqa: E402
from layerdiff.io.convert import convert_sd15  # noqa: E402
from layerdiff.io.files import save_safetensors_atomic  # noqa: E402


def random_sd15_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A real-size SD 1.5 checkpoint with random fp16 weights scaled so activations stay O(1), with
    CheckpointSave's keys (no position_ids, no text projection)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (_, shape) in sd15_full_size_header().items():
        if name.endswith("position_ids"):
            continue
        if len(shape) == 1:
            norm = "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight")) or ".in_layers.0." in name
            norm = norm or ".out_layers.0." in name or name.endswith(("norm_out.weight", "out.0.weight"))
            t = torch.randn(shape, generator=g) * 0.02 + (1.0 if norm and name.endswith("weight") else 0.0)
        else:
            fan_in = math.prod(shape[1:]) if "embedding" not in name else 50.0
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[name] = t.to(torch.float16)
    return out


def random_lora(seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya-named LoRA on a few UNet attention weights, a LoCon on conv_in and one CLIP layer."""
    g = torch.Generator().manual_seed(seed)
    targets = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (320, 768),
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q": (1280, 1280),
        "lora_unet_output_blocks_11_1_proj_out": (320, 320),
        "lora_te_text_model_encoder_layers_11_self_attn_q_proj": (768, 768),
        "lora_te_text_model_encoder_layers_3_mlp_fc1": (3072, 768),
    }
    out = {}
    for name, (n_out, n_in) in targets.items():
        out[f"{name}.lora_down.weight"] = torch.randn(rank, n_in, generator=g) / math.sqrt(n_in)
        out[f"{name}.lora_up.weight"] = torch.randn(n_out, rank, generator=g) * 0.5
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    conv = "lora_unet_input_blocks_0_0"
    out[f"{conv}.lora_down.weight"] = torch.randn(rank, 4, 3, 3, generator=g) / 6.0
    out[f"{conv}.lora_up.weight"] = torch.randn(320, rank, 1, 1, generator=g) * 0.5
    out[f"{conv}.alpha"] = torch.tensor(float(rank))
    return out


def main(root: Path) -> None:
    meta = {"prompt": json.dumps({"4": {"class_type": "CheckpointLoaderSimple"}})}
    for name, seed in (("a", 0), ("b", 1)):
        save_safetensors_atomic(random_sd15_state_dict(seed), root / f"{name}.safetensors", metadata=meta)
    save_safetensors_atomic(random_lora(2), root / "lora.safetensors", metadata={"ss_network_module": "networks.lora"})
    layerdiff = root / "layerdiff" / "untrained_sd15.safetensors"
    layerdiff.parent.mkdir(exist_ok=True)
    convert_sd15(root / "a.safetensors", layerdiff, config=get_preset("sd15"), dtype=torch.float16,
                 overwrite=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
