"""``data build --engine ray``: the MLCID build on Ray Data, on this machine or a cluster.

The dataset graph (Ray Data streams between the steps, in input order):

1. **hash** (tasks, skipped with ``--dedup-distance -1``): the dHash of every input
   (:mod:`layerdiff.data.mlcid.screening`); duplicates are then decided on the driver over the
   whole set, sorted by path, exactly as the local engine does.
2. **load** (tasks, half a CPU each): :func:`layerdiff.data.mlcid.builder.prepare_input` per image:
   decode, size and sharpness checks, sidecar.
3. **pipeline** (an actor pool of ``workers`` actors, ``num_gpus=1`` each when the stages run on
   CUDA): each actor builds the stages once and calls :meth:`MLCIDPipeline.process` on batches of
   ``batch_size`` images. Within a batch the captioner sees all images at once (photos, then
   backgrounds, then crops); detector, segmenter, depth and inpainter run image by image, as in
   the local engine: the stage classes take one image.
4. **write** (the driver): samples are regrouped by shard bucket (:mod:`hash_layout`), sorted by
   key and written with :func:`layerdiff.data.shard_writer.write_shard`, one shard as soon as
   its bucket's last image is through, then its ``.stats.json``. PNG encoding happens here, in
   one process.

The same functions as the local engine run on the same inputs, so a sample's bytes do not depend
on the engine; only the grouping into shards differs. The driver checks the models in one Ray
task before the pool starts (one extra model load), so a stage that cannot load fails there with
its own message. Cluster workers need layerdiff's dependencies installed; the ``layerdiff``
package itself travels with the job, and ``--images`` must be the same path on every node.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import time
from pathlib import Path

import numpy as np

from layerdiff.data.mlcid import builder as B
from layerdiff.data.mlcid import hash_layout as H
from layerdiff.data.mlcid import pipeline as P
from layerdiff.data.mlcid.screening import CACHE_NAME, DUPLICATE_IMAGE, duplicates_of, image_hash
from layerdiff.data.mlcid.timing import StepClock
from layerdiff.data.shard_writer import write_shard
from layerdiff.errors import LayerDiffError

logger = logging.getLogger("layerdiff.data.mlcid")

RAY_HINT = 'pip install "ray[data]"'
HASH_BATCH = 64  # images per hashing task
# CPUs a loading or hashing task asks for: decoding one photo and its sidecar is a fraction of a
# stage's work, so two share a core; also, a request unlike the actors' keeps Ray Data from fusing
# the loading into the actors (it fuses steps with equal requests), so decoding overlaps the stages
LOAD_CPUS = 0.5
LOCAL = "local"  # --ray-address: start Ray on this machine


@dataclasses.dataclass(frozen=True)
class RayOptions:
    workers: int = 1  # actors in the pipeline pool
    address: str = LOCAL  # "local", "auto" or ray://host:10001

    def __post_init__(self):
        if type(self.workers) is not int or not 1 <= self.workers <= 4096:
            raise LayerDiffError(f"--workers {self.workers!r} must be an integer from 1 to 4096 (actors running the "
                                 "stages; one per GPU is usual)")
        if not isinstance(self.address, str) or not self.address.strip():
            raise LayerDiffError(f"--ray-address {self.address!r} is empty: use 'local', 'auto' or ray://HOST:10001")


def import_ray():
    """The ``ray`` module with Ray Data, or one error naming the install line."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray core alone lacks it)
    except ImportError as exc:
        raise LayerDiffError(f"--engine ray needs Ray Data, which is not installed ({exc}): {RAY_HINT} "
                             "(or pip install '.[train]'), or use --engine local") from None
    return ray


def _start(ray, address: str) -> bool:
    """Connect to (or start) Ray; True when this call started it (and so shuts it down)."""
    if ray.is_initialized():
        logger.info("MLCID: using the Ray session already running (--ray-address %s not used)", address)
        return False
    kwargs = {"include_dashboard": False, "configure_logging": False}
    if address != LOCAL:  # a cluster: ship this layerdiff with the job so workers run the same code
        import layerdiff

        kwargs["runtime_env"] = {"py_modules": [str(Path(layerdiff.__file__).parent)]}
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise LayerDiffError(f"--ray-address {address!r}: cannot connect to Ray ({' '.join(str(exc).split())}): "
                             "start the cluster (ray start --head), check the address, or use --ray-address local") from None
    return True


def _unwrap(exc: BaseException) -> LayerDiffError | None:
    """The LayerDiffError a Ray task or actor raised, found through Ray's wrappers."""
    seen = 0
    while exc is not None and seen < 10:
        cause = getattr(exc, "cause", None)
        if isinstance(exc, LayerDiffError) and type(exc).__module__.startswith("layerdiff"):
            return exc
        if isinstance(cause, LayerDiffError):
            return LayerDiffError(str(cause))
        exc, seen = exc.__cause__ or cause, seen + 1
    return None


# ---------------------------------------------------------------------------------------------
# the steps (run in Ray workers; module-level so workers import them by name)


def _stage_fingerprint(specs, options, pconf) -> tuple[str, dict]:
    from layerdiff.data.mlcid.factory import make_stages

    return P.MLCIDPipeline(make_stages(specs, options), pconf).fingerprint()


def hash_batch(batch: dict) -> dict:
    """{"rel", "path"} -> {"rel", "hash" (16 hex digits, "" = undecodable), "seconds"}."""
    start = time.perf_counter()
    hashes = [image_hash(Path(p)) for p in batch["path"]]
    seconds = np.zeros(len(hashes))
    if len(hashes):
        seconds[0] = time.perf_counter() - start  # the batch's time on its first row: sums stay exact
    return {"rel": batch["rel"], "hash": np.array(["" if h is None else f"{h:016x}" for h in hashes], dtype=object),
            "seconds": seconds}


def load_batch(batch: dict, config: B.BuildConfig) -> dict:
    """{"bucket", "rel", "path"} -> the prepared image (pickled) or why there is none."""
    out = {"bucket": batch["bucket"], "rel": batch["rel"], "table": [], "reason": [], "payload": [], "load_s": []}
    for rel, path in zip(batch["rel"], batch["path"]):
        start = time.perf_counter()
        item, table, reason = B.prepare_input(str(rel), Path(path), config, {})
        out["payload"].append(b"" if item is None else pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
        out["table"].append(table)
        out["reason"].append(reason)
        out["load_s"].append(time.perf_counter() - start)
    return {k: np.asarray(v, dtype=object) if k in ("table", "reason", "payload") else np.asarray(v)
            for k, v in out.items()}


class PipelineWorker:
    """One actor of the pool: builds the stages once, then runs whole batches through them.

    A LayerDiffError (a setup problem: a package missing on this node, a bad setting) comes back
    as the rows' ``fatal`` text, which the driver raises: Ray Data keeps only the text of an
    actor's exception, wrapped in its own."""

    def __init__(self, specs, options, pconf, gpus: float):
        from layerdiff.data.mlcid.factory import make_stages

        if gpus and options.device.startswith("cuda:"):  # Ray hands each actor its own GPU as cuda:0
            options = dataclasses.replace(options, device="cuda")
        self.clock = StepClock()
        self.fatal = ""
        try:
            self.pipe = P.MLCIDPipeline(make_stages(specs, options), pconf)
        except LayerDiffError as exc:
            self.fatal = str(exc)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["rel"])
        ready = [i for i in range(n) if batch["table"][i] == "" and len(batch["payload"][i])]
        before_s, before_n = dict(self.clock.seconds), dict(self.clock.items)
        outcomes: dict[int, P.Outcome] = {}
        if ready and not self.fatal:
            try:
                with self.clock.timing_stages(self.pipe), self.clock.step("pipeline", len(ready)):
                    results = self.pipe.process([pickle.loads(batch["payload"][i]) for i in ready])
                outcomes = dict(zip(ready, results))
            except LayerDiffError as exc:
                self.fatal = str(exc)
        table, reason, sample, dropped, clock = [], [], [], [], [""] * n
        for i in range(n):
            o = outcomes.get(i)
            if o is None:
                table.append(batch["table"][i])
                reason.append(batch["reason"][i])
                sample.append(b"")
                dropped.append("{}")
                continue
            kept = o.status == P.KEPT
            table.append("" if kept else B.REJECTED_TABLE)
            reason.append(o.status)
            sample.append(pickle.dumps(o.sample, protocol=pickle.HIGHEST_PROTOCOL) if kept else b"")
            dropped.append(json.dumps(dict(o.dropped)))
        if n:
            seconds = {k: v - before_s.get(k, 0.0) for k, v in self.clock.seconds.items()}
            items = {k: v - before_n.get(k, 0) for k, v in self.clock.items.items()}
            clock[0] = json.dumps({"seconds": seconds, "items": items})
        obj = {"dtype": object}
        return {"bucket": batch["bucket"], "rel": batch["rel"], "table": np.asarray(table, **obj),
                "reason": np.asarray(reason, **obj), "sample": np.asarray(sample, **obj),
                "dropped": np.asarray(dropped, **obj), "load_s": batch["load_s"], "clock": np.asarray(clock, **obj),
                "fatal": np.asarray([self.fatal] * n, **obj)}


# ---------------------------------------------------------------------------------------------
# the driver


def _hash_with_ray(ray, inputs: list[tuple[str, Path]], clock: StepClock) -> dict[str, int]:
    rows = ray.data.from_items([{"rel": rel, "path": os.path.abspath(path)} for rel, path in inputs]).map_batches(
        hash_batch, batch_size=HASH_BATCH, num_cpus=LOAD_CPUS).iter_rows()
    hashes = {}
    for row in rows:
        clock.add("hash", float(row["seconds"]), 1)
        if row["hash"]:
            hashes[str(row["rel"])] = int(row["hash"], 16)
    return hashes


def _resources(ray, specs, options, workers: int) -> tuple[float, float]:
    """(GPUs, CPUs) per pipeline actor: a GPU each when models run on CUDA; CPUs left so the load
    tasks always find one (else the pool takes every CPU and the build waits for ever)."""
    from layerdiff.data.mlcid.factory import model_stages

    res = ray.cluster_resources()
    gpus = 0.0
    if model_stages(specs) and (options.device.startswith("cuda") or (options.device == "auto" and res.get("GPU", 0) > 0)):
        gpus = 1.0
        if workers > res.get("GPU", 0):
            logger.warning("MLCID: --workers %d asks for more GPUs than the cluster has now (%s); the pool waits "
                           "for them", workers, res.get("GPU", 0))
    cpus = float(res.get("CPU", 1))
    per_actor = 1.0 if cpus >= workers + LOAD_CPUS else max(0.0, (cpus - LOAD_CPUS) / workers)
    if per_actor < 1:
        logger.info("MLCID: %d CPUs for %d workers and the loading tasks: %.2f CPU per worker", cpus, workers, per_actor)
    return gpus, per_actor


class _ShardSink:
    """The driver's end: counts per bucket, and each bucket's shard written once it is complete."""

    def __init__(self, todo: list[H.Bucket], duplicates: dict[str, str], fingerprint: str, config, clock: StepClock):
        self.config, self.fingerprint, self.clock, self.duplicates = config, fingerprint, clock, duplicates
        self.buckets = {bk.index: bk for bk in todo}
        self.counts = {bk.index: B.Counts() for bk in todo}
        self.samples: dict[int, list] = {bk.index: [] for bk in todo}
        self.remaining = {bk.index: 0 for bk in todo}
        for bk in todo:
            for rel, _ in bk.inputs:
                if rel in duplicates:
                    self.counts[bk.index].images_seen += 1
                    self.counts[bk.index].rejected[DUPLICATE_IMAGE] += 1
                else:
                    self.remaining[bk.index] += 1

    def records(self) -> list[dict]:
        """The images the dataset runs, bucket by bucket (so buckets complete one after another);
        absolute paths, since a worker's working folder need not be the driver's."""
        return [{"bucket": bk.index, "rel": rel, "path": os.path.abspath(path)} for bk in self.buckets.values()
                for rel, path in bk.inputs if rel not in self.duplicates]

    def add(self, row: dict) -> None:
        if row["fatal"]:
            raise LayerDiffError(str(row["fatal"]))
        b = int(row["bucket"])
        c = self.counts[b]
        c.images_seen += 1
        c.dropped_detections.update(json.loads(row["dropped"]))
        if row["table"]:
            getattr(c, row["table"])[row["reason"]] += 1
        else:
            sample = pickle.loads(row["sample"])
            c.kept += 1
            c.samples_by_layers[str(sample.num_layers)] += 1
            self.samples[b].append(sample)
        self.clock.add("load", float(row["load_s"]), 1)
        if row["clock"]:
            data = json.loads(row["clock"])
            self.clock.merge(data["seconds"], data["items"])
        self.remaining[b] -= 1
        if self.remaining[b] == 0:
            self.write(b)

    def write(self, b: int) -> None:
        bk, samples = self.buckets[b], sorted(self.samples.pop(b), key=lambda s: s.key)
        with self.clock.step("write", len(samples)):
            bk.stats.unlink(missing_ok=True)  # unfinished until its stats are rewritten
            write_shard(bk.tar, samples, overwrite=True)
            B.write_json_atomic(bk.stats, {
                "bucket": b, "layout": "hash", "inputs_sha": bk.inputs_sha, "settings_sha": self.fingerprint,
                "screening": self.config.screen.to_json(), "counts": self.counts[b].to_json(),
            })
        logger.info("MLCID: wrote %s (%d of %d images kept)", bk.tar.name, self.counts[b].kept, self.counts[b].images_seen)

    def write_empty(self) -> None:
        """Buckets with nothing to run (only duplicates, or inputs all gone) are written up front."""
        for b in [b for b, left in self.remaining.items() if left == 0]:
            self.write(b)


def build_with_ray(config: B.BuildConfig, specs, options, pconf: P.PipelineConfig, ray_options: RayOptions) -> dict:
    """Build every shard of ``config.images`` with Ray; return (and write) the summary."""
    ray = import_ray()
    if config.out.exists() and not config.out.is_dir():
        raise LayerDiffError(f"--out {str(config.out)!r} is a file: give a folder")
    inputs = B.list_inputs(config.images)
    config.out.mkdir(parents=True, exist_ok=True)
    B.refuse_other_engine(config.out, B.SHARD_NAME, "local")
    t_start = time.perf_counter()
    started = _start(ray, ray_options.address)
    try:
        return _run(ray, config, specs, options, pconf, ray_options, inputs, t_start)
    except Exception as exc:
        found = _unwrap(exc)
        if found is not None and found is not exc:
            raise found from None
        raise
    finally:
        if started:
            ray.shutdown()


def _run(ray, config, specs, options, pconf, ray_options, inputs, t_start) -> dict:
    """The driver's run, in order: settings fingerprint, hash and de-duplicate, plan the buckets,
    stream the dataset into the shards, write the summary."""
    from ray.data import ActorPoolStrategy, DataContext

    gpus, cpus = _resources(ray, specs, options, ray_options.workers)
    fingerprint, settings = ray.get(ray.remote(_stage_fingerprint).options(num_gpus=gpus, num_cpus=min(cpus, 1.0) or 1.0)
                                    .remote(specs, options, pconf))
    clock = StepClock()
    t0 = time.perf_counter()
    startup = t0 - t_start
    ctx = DataContext.get_current()
    order_before, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        duplicates = duplicates_of(inputs, config.screen, hasher=lambda inp: _hash_with_ray(ray, inp, clock),
                                    cache=config.out / CACHE_NAME)
        buckets = H.bucket_count(config.out, len(inputs), config.samples_per_shard)
        planned = H.plan(config.out, inputs, buckets, duplicates)
        todo, finished = H.check(config, planned, fingerprint)
        logger.info("MLCID: %d inputs, %d shards (of %d buckets), %d to build", len(inputs), len(planned), buckets, len(todo))
        sink = _ShardSink(todo, duplicates, fingerprint, config, clock)
        sink.write_empty()
        records = sink.records()
        if records:
            ds = ray.data.from_items(records).map_batches(load_batch, fn_kwargs={"config": config},
                                                          batch_size=config.batch_size, num_cpus=LOAD_CPUS)
            ds = ds.map_batches(PipelineWorker, fn_constructor_kwargs={"specs": specs, "options": options, "pconf": pconf,
                                                                       "gpus": gpus},
                                batch_size=config.batch_size, compute=ActorPoolStrategy(size=ray_options.workers),
                                num_gpus=gpus, num_cpus=cpus)
            for row in ds.iter_rows():
                sink.add(row)
    finally:
        ctx.execution_options.preserve_order = order_before
    left = [b for b, n in sink.remaining.items() if n]
    if left:  # every row comes back or Ray raised; this guards the bookkeeping itself
        raise RuntimeError(f"MLCID ray build: buckets {left[:5]} did not receive all their images")
    elapsed = time.perf_counter() - t0
    total, built = B.Counts(), B.Counts()
    for counts in finished.values():
        total.add(counts)
    for counts in sink.counts.values():
        total.add(counts)
        built.add(counts)
    summary = {
        "engine": "ray",
        "workers": ray_options.workers,
        "ray_address": ray_options.address,
        "resources_per_worker": {"GPU": gpus, "CPU": round(cpus, 3)},
        "images": str(config.images),
        "inputs_total": len(inputs),
        "layout": {"buckets": buckets, "rule": f"bucket = int(sha1(relative path)[:{H.HASH_HEX}], 16) % {buckets}"},
        "shards": {"planned": len(planned), "built": len(todo), "skipped": len(planned) - len(todo)},
        **total.to_json(),
        **B.run_report(built, elapsed, clock, config, fingerprint, settings, startup_s=round(startup, 3)),
    }
    B.write_json_atomic(config.out / "summary-ray.json", summary)
    return summary
