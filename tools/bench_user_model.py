"""LayerDiff on SD 1.5 weights against ComfyUI's own KSampler on the same weights, side by side.

Each measurement runs in a fresh process of ComfyUI's Python (so its peak memory is its own):

- ``comfy``: Load Checkpoint + KSampler (euler, normal, cfg 7.5), one image;
- ``file``: Load LayerDiff on a full LayerDiff file + Layered KSampler (same sampler, plain CFG);
- ``model``: Load Checkpoint + Apply LayerDiff to Model + Layered KSampler.

Per step: after a warm-up run, the time of a run with ``--steps`` steps less that of a 2-step
run, divided by the difference (prompt encoding, decoding and loading cancel out); LayerDiff's is also given per
layer-image (divided by the layer count). Peak memory: the process's peak resident set, from
start to the end of decoding. Engines alternate, ``--rounds`` times, and the medians are reported.

    python tools/bench_user_model.py --checkpoint A.safetensors --layerdiff FULL.safetensors \\
        --size 256 --layers 1 4 --steps 6 --rounds 2 [--threads 2] [--json OUT]

(the files: tests/sd15_random_files.py writes random ones; ``python -m layerdiff convert --base A
--out FULL --full`` makes the full LayerDiff file.) Needs the ComfyUI checkout and its venv
(COMFYUI_DIR / COMFY_VENV, as the real-ComfyUI tests).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red beach umbrella on a sunny beach"


def child(args) -> dict:
    """One engine in this process (ComfyUI's Python): its timings and peak memory."""
    import importlib.util
    import resource
    import time

    sys.path.insert(0, args.comfy_dir)
    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = not torch.cuda.is_available()  # a GPU when there is one, as ComfyUI picks
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import folder_paths

    torch.set_num_threads(args.threads)
    folder_paths.add_model_folder_path("layerdiff", str(Path(args.layerdiff).parent))
    spec = importlib.util.spec_from_file_location("comfyui_layerdiff", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_layerdiff"] = pack
    spec.loader.exec_module(pack)
    nodes = pack.NODE_CLASS_MAPPINGS
    t0 = time.perf_counter()
    if args.engine in ("comfy", "model"):
        model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)
    if args.engine == "file":
        (ld,) = nodes["LayerDiffLoader"]().load(Path(args.layerdiff).name, "none", "auto", "auto")
    elif args.engine == "model":
        (ld,) = nodes["LayerDiffApplyModel"]().apply(model, clip, vae, Path(args.layerdiff).name, "model", "auto", "auto")
    load = time.perf_counter() - t0
    h = w = args.size // 8

    if args.engine == "comfy":
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = torch.zeros(1, 4, h, w)
        noise = comfy.sample.prepare_noise(latent, 0)

        def run(steps):
            t = time.perf_counter()
            out = comfy.sample.sample(model, noise, steps, 7.5, "euler", "normal", pos, neg, latent, seed=0)
            vae.decode(out)
            return time.perf_counter() - t
    else:
        prompts = None
        for i in range(args.layers):
            out = nodes["LayerDiffLayerPrompt"]().add(f"{PROMPT} {i}", prompts)
            prompts = (out["result"] if isinstance(out, dict) else out)[0]

        from layerdiff.pipeline import generate
        from layerdiff.settings import PLAIN

        host = sys.modules["comfyui_layerdiff.nodes._host"]

        def run(steps):  # what Prompt Enhancer + Layered KSampler do, with plain CFG (no cleanup or retries)
            t = time.perf_counter()
            result = nodes["LayerDiffPromptEnhancer"]().encode(ld, prompts, PROMPT, "")
            cond = result["result"][0] if isinstance(result, dict) else result[0]
            host.ready(ld, host.sampling_memory(ld, 1, args.layers, args.size, args.size))
            generate(ld, cond, PLAIN.replace(steps=steps, cfg=7.5, background_cfg=7.5, sampler="euler",
                                             scheduler="normal"), width=args.size, height=args.size, seed=0)
            return time.perf_counter() - t
    run(2)  # warm-up: first-call costs (allocations, kernel choice) belong to neither run
    short, full = run(2), run(args.steps)
    per_step = (full - short) / (args.steps - 2)
    return {"engine": args.engine, "size": args.size, "layers": args.layers if args.engine != "comfy" else 1,
            "load_s": load, "step_s": per_step, "run_s": full,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--layerdiff", required=True, help="a full LayerDiff file (with VAE and text encoder)")
    ap.add_argument("--size", type=int, nargs="+", default=[256])
    ap.add_argument("--layers", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["comfy", "file", "model"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--comfy-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.size, args.layers = args.size[0], args.layers[0]
        print(json.dumps(child(args)))
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    import comfy_private as harness

    python = str(harness.COMFY_VENV / "bin" / "python")
    rows = []
    for size in args.size:
        for layers in args.layers:
            results: dict[str, list[dict]] = {}
            for _ in range(args.rounds):
                for engine in args.engines:
                    if engine == "comfy" and layers != args.layers[0]:
                        continue  # one image: the same for every layer count
                    cmd = [python, __file__, "--child", "--engine", engine, "--comfy-dir", str(harness.COMFY_DIR),
                           "--checkpoint", args.checkpoint, "--layerdiff", args.layerdiff, "--size", str(size),
                           "--layers", str(layers), "--steps", str(args.steps), "--threads", str(args.threads)]
                    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if run.returncode:
                        print(run.stderr[-3000:], file=sys.stderr)
                        return 1
                    results.setdefault(engine, []).append(json.loads(run.stdout.strip().splitlines()[-1]))
            for engine, runs in results.items():
                row = {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k]
                       for k in runs[0]}
                row["layers"] = layers if engine != "comfy" else 1
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
