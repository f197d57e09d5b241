"""The work of ``python -m layerdiff data build`` (its flags: :mod:`layerdiff.cli.build`): the settings
checked before any model loads (or Ray starts), the stages made, the build run on the chosen engine
(``local``: :mod:`builder` in this process; ``ray``: :mod:`ray_engine`), its report.
"""

from __future__ import annotations

import json
from pathlib import Path

from layerdiff.errors import LayerDiffError


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
    from layerdiff.data.mlcid.factory import StageOptions, StageSpecs, make_stages, with_fallbacks
    from layerdiff.data.mlcid.filters import FilterConfig
    from layerdiff.data.mlcid.pipeline import MLCIDPipeline, PipelineConfig
    from layerdiff.data.mlcid.screening import ScreenConfig

    # everything cheap is checked before any model loads
    ray_options = _ray_options(args)
    config = builder.BuildConfig(
        images=Path(args.images),
        out=Path(args.out),
        shard=builder.parse_shard(args.shard),
        samples_per_shard=args.samples_per_shard,
        batch_size=args.batch_size,
        max_side=args.max_side,
        min_side=args.min_side,
        overwrite=args.overwrite,
        screen=ScreenConfig(dedup_distance=args.dedup_distance, min_sharpness=args.min_sharpness),
    )
    inputs = builder.list_inputs(config.images)  # the --images error before minutes of model loading
    if not inputs:
        raise LayerDiffError(f"--images {str(config.images)!r} lists no files: give a folder of images "
                             "(searched recursively) or a .txt list of image paths")
    chunks = -(-len(inputs) // config.samples_per_shard)
    if ray_options is None and config.shard[0] > chunks:
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
    specs = with_fallbacks(specs, options, args.fallback)  # every missing model named at once
    if not pconf.phrases:
        _check_something_names_objects(specs, inputs)
    if ray_options is not None:  # models checked above; Ray starts only now
        from layerdiff.data.mlcid.ray_engine import build_with_ray, import_ray

        import_ray()
        summary = build_with_ray(config, specs, options, pconf, ray_options)
    else:
        summary = builder.build(config, MLCIDPipeline(make_stages(specs, options), pconf))
    print(_report(summary, config))
    if not summary["kept"]:
        raise LayerDiffError(_nothing_kept(summary, specs, args))
    return 0


def _ray_options(args):
    """RayOptions for --engine ray (None for local), with the flags that belong to one engine only."""
    if args.engine == "local":
        if args.workers != 1 or args.ray_address != "local":
            raise LayerDiffError("--workers and --ray-address need --engine ray: add --engine ray, or drop them "
                                 "(--engine local runs in this process; split it with --shard i/N)")
        return None
    if args.engine != "ray":
        raise LayerDiffError(f"--engine {args.engine!r} is unknown: use local or ray")
    if args.shard.strip() != "1/1":
        raise LayerDiffError(f"--shard {args.shard} is for --engine local: with --engine ray, Ray spreads the work; "
                             "give --workers N (and --ray-address for a cluster) instead")
    from layerdiff.data.mlcid.ray_engine import RayOptions

    return RayOptions(workers=args.workers, address=args.ray_address)


SIDECAR_PROBE = 1000  # inputs whose sidecars are looked for before a build without captioner or phrases


def _check_something_names_objects(specs, inputs) -> None:
    """Without a captioner and without --phrases only sidecars name objects: refuse up front (instead
    of building nothing) when none of the first inputs has one."""
    from layerdiff.data.mlcid.factory import FALLBACK_WORDS, NONE_WORDS

    if specs.captioner.strip().lower() not in NONE_WORDS + FALLBACK_WORDS:
        return
    for _, path in inputs[:SIDECAR_PROBE]:
        for suffix in (".json", ".txt"):
            try:
                if path.with_suffix(suffix).is_file():
                    return
            except (OSError, ValueError):  # unreadable or odd names: the build counts them
                continue
    raise LayerDiffError(
        f"nothing would name the objects to find: there is no captioner (--captioner {specs.captioner}, --no-models "
        f"or --fallback classical), no --phrases, and none of the first {min(len(inputs), SIDECAR_PROBE)} images has "
        "an IMAGE.txt or IMAGE.json sidecar: give --phrases 'person, dog' (or @FILE), sidecars, or a captioner model")


def _nothing_kept(s: dict, specs, args) -> str:
    """One line: why no image gave a sample, and what to change."""
    from layerdiff.data.mlcid.factory import NONE_WORDS, model_stages

    reasons = {**s["unreadable"], **s["rejected"]}
    top = max(reasons, key=reasons.get) if reasons else ""
    if top == "no_phrases":
        if "captioner" not in model_stages(specs):
            fix = ("there is no captioner (--no-models or --captioner none), so phrases must be given: "
                   "--phrases 'person, dog' (or @FILE), or IMAGE.txt / IMAGE.json sidecars beside the images")
        else:
            fix = "the captions named no objects: give --phrases 'person, dog' (or @FILE) or IMAGE.txt sidecars"
    elif top == "no_detections":
        fix = (f"the detector found nothing: lower --detector-threshold (now {args.detector_threshold}), "
               "or give boxes in IMAGE.json sidecars")
        if specs.detector.strip().lower() in NONE_WORDS:
            fix = "there is no detector (--detector none): give boxes in IMAGE.json sidecars, or a detector"
    elif top == "no_foregrounds":
        fix = (f"every detection was filtered out ({json.dumps(s['dropped_detections'])}): widen --min-area "
               f"{args.min_area} / --max-area {args.max_area} or raise --max-overlap {args.max_overlap}")
    elif top == "image_too_small":
        fix = f"the images are smaller than --min-side {args.min_side}: lower it"
    elif top == "too_blurry":
        fix = f"the images are flatter or more blurred than --min-sharpness {args.min_sharpness}: lower it (0 = off)"
    elif top == "duplicate":
        fix = f"the images are near-duplicates of each other: lower --dedup-distance {args.dedup_distance} (-1 = off)"
    elif top == "error":
        fix = "a stage failed on every readable image: see the errors logged above"
    else:
        fix = f"no image could be read: check --images {args.images}"
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f"nothing kept: none of {s['images_seen']} images gave a sample ({counts}): {fix}"


def _report(s: dict, config) -> str:
    if s.get("engine") == "ray":
        head = (f"MLCID on Ray (--workers {s['workers']}): {s['images_seen']} images seen, {s['kept']} samples kept "
                f"(shards built {s['shards']['built']}, skipped as finished {s['shards']['skipped']}, "
                f"{s['layout']['buckets']} buckets)")
    else:
        head = (f"MLCID shard {s['shard']}: {s['images_seen']} images seen, {s['kept']} samples kept "
                f"(chunks built {s['chunks']['built']}, skipped as finished {s['chunks']['skipped']})")
    lines = [
        head,
        f"  unreadable {s['unreadable_total']} {json.dumps(s['unreadable'])}",
        f"  rejected   {s['rejected_total']} {json.dumps(s['rejected'])}",
        f"  detections dropped {json.dumps(s['dropped_detections'])}",
        f"  samples by layer count {json.dumps(s['samples_by_layers'])}",
    ]
    rate = s["this_run"]["images_per_s"]
    if rate:
        startup = f" (after {s['this_run']['startup_s']:.1f} s starting Ray)" if "startup_s" in s["this_run"] else ""
        lines.append(f"  {rate:.2f} images/s this run{startup}")
    steps = [f"{name} {v['seconds']:.1f} s" + (f" ({v['items_per_s']:.2f}/s)" if v["items_per_s"] else "")
             for name, v in s.get("steps", {}).items() if v["seconds"] or v["items"]]
    if steps:
        lines.append(f"  busy time by step: {', '.join(steps)}")
    i, n = config.shard
    name = "summary-ray.json" if s.get("engine") == "ray" else f"summary-{i}of{n}.json"
    lines.append(f"  summary: {config.out / name}")
    return "\n".join(lines)
