"""``python -m layerdiff data build``: the MLCID builder on the command line (the work is
:func:`layerdiff.data.mlcid.command.run`).

Imports nothing heavy at registration: ``--help`` stays fast and a missing optional dependency
fails only this command, with the line to install it.
"""

from __future__ import annotations

import argparse

from layerdiff.data.mlcid.command import run

_EPILOG = """\
stages: each of --captioner --detector --segmenter --depth --inpainter takes a Hugging Face model id
or a local folder (models come only from local folders or the Hugging Face cache unless
--allow-download), or "fallback" for its classical version (saliency boxes, GrabCut / random
walker, box-bottom depth, Telea / biharmonic inpainting; needs opencv-python-headless or
scikit-image), or "none" (captioner: prompts from sidecars and phrases; detector: only sidecar
boxes). The detector may be OWLv2 / OWL-ViT (the default) or Grounding DINO (e.g.
IDEA-Research/grounding-dino-tiny): the architecture is read from the model's config. --no-models
sets every stage to its fallback; --fallback classical only the stages whose model
is missing (without it, every missing model is listed in one error).

sidecars: IMAGE.json beside an image may give {"caption": str, "phrases": [str],
"objects": [{"phrase": str, "box": [x0, y0, x1, y1]}], "background_prompt": str} (boxes in the
image's pixels win over the detector); IMAGE.txt may list phrases to detect.

screening: before the stages, near-duplicate photos (64-bit dHash within --dedup-distance bits;
the first by path stays) and flat or blurred ones (Laplacian variance under --min-sharpness) are
rejected and counted, by both engines.

engines: --engine local (default) builds in this process (split across processes with --shard
i/N); --engine ray runs on Ray Data (pip install "ray[data]"): loading as tasks, the stages in a
pool of --workers actors (one GPU each on CUDA), on this machine or a cluster (--ray-address auto
or ray://HOST:10001). Its shards are content-addressed (bucket = sha1 of the image's relative
path), so adding images rebuilds only the shards they fall into. Same samples, other grouping.

output: OUT/mlcid-IofN-CCCCCC.tar shards (local) or OUT/mlcid-hashofBBB-CCCCCC.tar (ray), WebDataset
style, read with layerdiff.data.format; a .stats.json beside each, and OUT/summary-IofN.json or
OUT/summary-ray.json. A rerun skips finished shards.
"""


def register(subparsers) -> None:
    """Add the ``build`` sub-command to the ``data`` sub-parsers ``subparsers``."""
    from layerdiff.data.mlcid.factory import DEFAULT_MODELS

    p = subparsers.add_parser(
        "build",
        help="build MLCID-style layered training data from photos (caption, detect, segment, order, inpaint)",
        description="Build layered training samples from ordinary images with the MLCID pipeline "
        "(METHOD.md section 6). Resumable and shardable across processes and machines.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", required=True, help="folder of images (searched recursively) or a .txt list of paths")
    p.add_argument("--out", required=True, help="output folder for the shards and summaries")
    p.add_argument("--shard", default="1/1", help="this process's part, i/N (default 1/1): process i builds every N-th chunk "
                   "(--engine local only)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (default): this process; ray: Ray Data, tasks and a pool of --workers actors")
    p.add_argument("--workers", type=int, default=1, help="--engine ray: actors running the stages (default 1; one per GPU)")
    p.add_argument("--ray-address", default="local",
                   help="--engine ray: local (default: start Ray on this machine), auto (the cluster this machine "
                        "joined) or ray://HOST:10001")
    p.add_argument("--overwrite", action="store_true", help="rebuild shards that already exist in --out")
    p.add_argument("--samples-per-shard", type=int, default=256, help="input images per shard (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="images per captioner batch (default 8)")
    p.add_argument("--device", default="auto", help="torch device for the models: auto (default), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (float16 on CUDA, else float32), float32, float16, bfloat16")
    p.add_argument("--allow-download", action="store_true", help="let missing models download from the Hugging Face Hub")
    for stage in ("captioner", "detector", "segmenter", "depth", "inpainter"):
        p.add_argument(f"--{stage}", default=DEFAULT_MODELS[stage],
                       help=f"model id or folder, 'fallback' or 'none' (default {DEFAULT_MODELS[stage]})")
    p.add_argument("--no-models", action="store_true", help="use every stage's classical fallback (no model at all)")
    p.add_argument("--fallback", choices=["none", "classical"], default="none",
                   help="a stage whose model is in no local folder nor the Hugging Face cache: none (default: one "
                        "error listing every missing model) or classical (that stage's classical version, logged)")
    p.add_argument("--classical-backend", choices=["auto", "cv2", "skimage"], default="auto",
                   help="library for the fallbacks (default auto: OpenCV if installed, else scikit-image)")
    p.add_argument("--phrases", default="",
                   help="fixed phrases to detect instead of the caption's: 'cat, dog' or @FILE (one per line)")
    p.add_argument("--detector-threshold", type=float, default=0.2, help="detector score threshold (default 0.2)")
    p.add_argument("--max-detections", type=int, default=20, help="detections kept per image before filtering (default 20)")
    p.add_argument("--min-area", type=float, default=0.01, help="smallest mask, fraction of the image (default 0.01)")
    p.add_argument("--max-area", type=float, default=0.6, help="largest mask, fraction of the image (default 0.6)")
    p.add_argument("--max-foregrounds", type=int, default=3, help="foreground layers per sample at most (default 3)")
    p.add_argument("--max-overlap", type=float, default=0.2,
                   help="drop the weaker of two masks overlapping more than this fraction of the smaller (default 0.2)")
    p.add_argument("--duplicate-iou", type=float, default=0.7, help="mask IoU above which two detections are one object (default 0.7)")
    p.add_argument("--dilate", type=float, default=0.02,
                   help="grow the foregrounds by this fraction of the longer side before inpainting (default 0.02)")
    p.add_argument("--layer-prompts", choices=["phrase", "caption"], default="phrase",
                   help="foreground prompt: the detected phrase (default) or a caption of the object's crop")
    p.add_argument("--max-side", type=int, default=1024, help="downscale larger images to this longest side (default 1024; 0 = keep)")
    p.add_argument("--min-side", type=int, default=32, help="reject images whose shorter side is below this (default 32)")
    p.add_argument("--dedup-distance", type=int, default=4,
                   help="drop photos whose 64-bit dHash is within this many bits of an earlier kept one "
                        "(default 4; 0 = identical hashes only; -1 = off)")
    p.add_argument("--min-sharpness", type=float, default=0.5,
                   help="reject images whose Laplacian variance at 256 px is below this (default 0.5: only flat "
                        "images; 5 also drops strongly blurred ones; 0 = off)")
    p.add_argument("--inpaint-steps", type=int, default=25, help="SD inpainting steps (default 25)")
    p.add_argument("--inpaint-resolution", type=int, default=512, help="SD inpainting longest side (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the SD inpainting noise (default 0)")
    p.set_defaults(func=run)
