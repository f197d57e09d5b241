"""Generate composable images into a folder of files: what ``python -m layerdiff generate`` runs.

Layer PNGs, masks, the composite, a PSD and ``meta.json`` (the prompts, the resolved
:class:`~layerdiff.settings.SamplerSettings` and where the model came from), written as one result set
(:mod:`layerdiff.io.resultset`): a failed or killed run leaves nothing half-written.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from layerdiff.conditioning import LayerPrompts
from layerdiff.errors import LayerDiffError
from layerdiff.settings import SamplerSettings


def generate_to_folder(out: Path, prompts: LayerPrompts, settings: SamplerSettings, *, model_name=None, base=None,
                       device="cpu", width=None, height=None, seed: int = 0, batch: int = 1, psd: bool = True,
                       dtype=None,
                       overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Generate ``batch`` images (seeds seed, seed + 1, ...) into ``out`` (sample_000, ... for a batch);
    files already there are refused before the generation unless ``overwrite``. Returns the files."""
    import torch

    from layerdiff.io.checkpoint import check_model, load_model
    from layerdiff.io.export import layer_set_files, sample_dir, write_layer_sets
    from layerdiff.io.resultset import clean_stale
    from layerdiff.pipeline import generate

    check_model(model_name)  # headers only: a wrong model fails before --out is made and the load starts
    out = Path(out)
    check_writable(out)
    clean_stale(out)  # what a killed or failed earlier run left in --out (never a live run's)
    if not overwrite:  # refuse before the (slow) generation, not after
        dirs = [out] if batch == 1 else [sample_dir(out, b) for b in range(batch)]
        taken = [str(f) for d in dirs for f in _expected_files(d, len(prompts.layers), psd, layer_set_files)
                 if f.exists()]
        if taken:
            raise LayerDiffError(f"{taken[0]} already exists: pass --overwrite or choose another --out")
    model = load_model(model_name, base=base, device=device, dtype=dtype or torch.float32)
    stack = generate(model, prompts, settings, width=width, height=height, seed=seed, batch=batch,
                     callback=progress_bar() if progress else None)
    resolved = settings.resolve(model)
    meta = {  # sizes and the global prompt are added by the writer from the stack itself
        "layer_prompts": list(prompts.layers),
        "negative_prompt": prompts.negative,
        "seed": seed,
        **resolved.to_dict(),
        "background_cfg": resolved.cfg if resolved.background_cfg is None else resolved.background_cfg,
        "model": model.source,
        "batch": batch,
        "torch": torch.__version__,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    return write_layer_sets(stack, out, meta, overwrite=overwrite, psd=psd)


def _expected_files(folder, n_layers, psd, layer_set_files):
    import torch

    from layerdiff.stack import LayerStack

    dummy = LayerStack(torch.zeros(1, n_layers, 1, 1, 3), torch.zeros(1, n_layers - 1, 1, 1))
    return layer_set_files(dummy, folder, psd)


def check_writable(out: Path) -> None:
    """Create ``out`` now and prove it writable, so a bad folder fails before the generation."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise LayerDiffError(f"--out {out} is not a writable folder ({exc.strerror}): choose another --out") from None


def progress_bar():
    """A sampler callback drawing a tqdm bar on stderr."""
    from tqdm.auto import tqdm

    state = {}

    def callback(step: int, total: int, preview) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc="sampling", unit="step", file=sys.stderr, leave=False)
        bar.update(step - bar.n)
        if step >= total:
            bar.close()

    return callback
