"""``python -m layerdiff data build``: the MLCID builder on the command line.

Imports nothing heavy at registration: ``--help`` stays fast and a missing optional dependency
fails only this command, with the line to install it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data.mlcid")

_EPILOG = """\
stages: each of --captioner --detector --segmenter --depth --inpainter takes a Hugging Face model id
or a local folder (models come only from local folders or the Hugging Face cache unless
--allow-download), or "fallback" for its classical version (saliency boxes, GrabCut / random
walker, box-bottom depth, Telea / biharmonic inpainting; needs opencv-python-headless or
scikit-image), or "none" (captioner: prompts from sidecars and phrases; detector: only sidecar
boxes). --no-models sets every stage to its fallback.

sidecars: IMAGE.json beside an image may give {"caption": str, "phrases": [str],
"objects": [{"phrase": str, "box": [x0, y0, x1, y1]}], "background_prompt": str} (boxes in the
image's pixels win over the detector); IMAGE.txt may list phrases to detect.

output: OUT/mlcid-IofN-CCCCCC.tar shards (WebDataset style, read with layerdiff.data.format),
a .stats.json beside each, and OUT/summary-IofN.json. A rerun skips finished shards.
"""


def register(subparsers) -> None:
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
    p.add_argument("--shard", default="1/1", help="this process's part, i/N (default 1/1): process i builds every N-th chunk")
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
    p.add_argument("--inpaint-steps", type=int, default=25, help="SD inpainting steps (default 25)")
    p.add_argument("--inpaint-resolution", type=int, default=512, help="SD inpainting longest side (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the SD inpainting noise (default 0)")
    p.set_defaults(func=run)


def _phrases(text: str) -> tuple[str, ...]:
    from layerdiff.data.input_files import InputFileError, read_regular_file
    from layerdiff.data.mlcid.phrases import parse_phrase_list

    if text.startswith("@"):
        try:
            raw = read_regular_file(Path(text[1:]), 2**20)
        except InputFileError as exc:
            raise LayerDiffError(f"--phrases {exc}: give @FILE with one phrase per line, or 'cat, dog'") from None
        text = raw.decode("utf-8", errors="replace")
    phrases = tuple(parse_phrase_list(text))
    if len(phrases) > 1000:
        raise LayerDiffError(f"--phrases lists {len(phrases)} phrases: give at most 1000 (each one is searched for in every image)")
    return phrases


def run(args) -> int:
    from layerdiff.data.mlcid import builder
    from layerdiff.data.mlcid.factory import StageOptions, StageSpecs, make_stages
    from layerdiff.data.mlcid.filters import FilterConfig
    from layerdiff.data.mlcid.pipeline import MLCIDPipeline, PipelineConfig

    # everything cheap is checked before any model loads
    config = builder.BuildConfig(
        images=Path(args.images),
        out=Path(args.out),
        shard=builder.parse_shard(args.shard),
        samples_per_shard=args.samples_per_shard,
        batch_size=args.batch_size,
        max_side=args.max_side,
        min_side=args.min_side,
        overwrite=args.overwrite,
    )
    inputs = builder.list_inputs(config.images)  # the --images error before minutes of model loading
    if not inputs:
        raise LayerDiffError(f"--images {str(config.images)!r} lists no files: give a folder of images "
                             "(searched recursively) or a .txt list of image paths")
    chunks = -(-len(inputs) // config.samples_per_shard)
    if config.shard[0] > chunks:
        raise LayerDiffError(f"--shard {config.shard[0]}/{config.shard[1]} gets no work: {len(inputs)} images make "
                             f"{chunks} chunks of --samples-per-shard {config.samples_per_shard}; use at most "
                             f"{chunks} processes, or a smaller --samples-per-shard")
    pconf = PipelineConfig(
        filters=FilterConfig(min_area=args.min_area, max_area=args.max_area, max_foregrounds=args.max_foregrounds,
                             max_overlap=args.max_overlap, duplicate_iou=args.duplicate_iou),
        phrases=_phrases(args.phrases),
        layer_prompts=args.layer_prompts,
        dilate=args.dilate,
        nms_iou=0.5,
    )
    specs = StageSpecs.all_fallbacks() if args.no_models else StageSpecs(
        captioner=args.captioner, detector=args.detector, segmenter=args.segmenter, depth=args.depth, inpainter=args.inpainter
    )
    options = StageOptions(
        device=args.device,
        dtype=args.dtype,
        allow_download=args.allow_download,
        batch_size=args.batch_size,
        detector_threshold=args.detector_threshold,
        max_detections=args.max_detections,
        inpaint_steps=args.inpaint_steps,
        inpaint_resolution=args.inpaint_resolution,
        seed=args.seed,
        classical_backend=None if args.classical_backend == "auto" else args.classical_backend,
    )
    pipe = MLCIDPipeline(make_stages(specs, options), pconf)
    summary = builder.build(config, pipe)
    print(_report(summary, config))
    if not summary["kept"]:
        raise LayerDiffError(_nothing_kept(summary, pipe, args))
    return 0


def _nothing_kept(s: dict, pipe, args) -> str:
    """One line: why no image gave a sample, and what to change."""
    reasons = {**s["unreadable"], **s["rejected"]}
    top = max(reasons, key=reasons.get) if reasons else ""
    stages = pipe.stages
    if top == "no_phrases":
        if stages.captioner is None:
            fix = ("there is no captioner (--no-models or --captioner none), so phrases must be given: "
                   "--phrases 'person, dog' (or @FILE), or IMAGE.txt / IMAGE.json sidecars beside the images")
        else:
            fix = "the captions named no objects: give --phrases 'person, dog' (or @FILE) or IMAGE.txt sidecars"
    elif top == "no_detections":
        fix = (f"the detector found nothing: lower --detector-threshold (now {args.detector_threshold}), "
               "or give boxes in IMAGE.json sidecars")
        if stages.detector is None:
            fix = "there is no detector (--detector none): give boxes in IMAGE.json sidecars, or a detector"
    elif top == "no_foregrounds":
        fix = (f"every detection was filtered out ({json.dumps(s['dropped_detections'])}): widen --min-area "
               f"{args.min_area} / --max-area {args.max_area} or raise --max-overlap {args.max_overlap}")
    elif top == "image_too_small":
        fix = f"the images are smaller than --min-side {args.min_side}: lower it"
    elif top == "error":
        fix = "a stage failed on every readable image: see the errors logged above"
    else:
        fix = f"no image could be read: check --images {args.images}"
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f"nothing kept: none of {s['images_seen']} images gave a sample ({counts}): {fix}"


def _report(s: dict, config) -> str:
    lines = [
        f"MLCID shard {s['shard']}: {s['images_seen']} images seen, {s['kept']} samples kept "
        f"(chunks built {s['chunks']['built']}, skipped as finished {s['chunks']['skipped']})",
        f"  unreadable {s['unreadable_total']} {json.dumps(s['unreadable'])}",
        f"  rejected   {s['rejected_total']} {json.dumps(s['rejected'])}",
        f"  detections dropped {json.dumps(s['dropped_detections'])}",
        f"  samples by layer count {json.dumps(s['samples_by_layers'])}",
    ]
    rate = s["this_run"]["images_per_s"]
    if rate:
        lines.append(f"  {rate:.2f} images/s this run")
    i, n = config.shard
    lines.append(f"  summary: {config.out / f'summary-{i}of{n}.json'}")
    return "\n".join(lines)
