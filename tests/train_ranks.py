"""Run ``layerdiff.training.loop.train`` as the ranks of a CPU (gloo) process group, for test_train.py.

Each rank runs a list of jobs in turn, every job a fresh tiny model and one ``train()`` call:

    {"data": DIR, "out": DIR, "config": {TrainConfig fields}, "stop_after": int | None}

and after each job writes its own copy of the trained weights to ``OUT/rank-R.safetensors`` (so
a test can check that DDP kept the ranks identical) and its training log messages to
``OUT/rank-R.log`` (e.g. the validation loss each rank computed).

Two ways to start the ranks:

- :func:`launch_forked` forks them from the calling process (no second import of torch and
  diffusers, so a two-process test takes seconds): rank variables are set the way torchrun sets
  them (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE);
- as a script under a real launcher, which sets those variables itself:

      torchrun --nproc_per_node 2 tests/train_ranks.py JOBS.json

ACCELERATE_USE_CPU is deliberately not set: ``train()`` must form the gloo group by itself on a
machine without a GPU. ``launch_forked(..., env=launcher_env(CONFIG, world))`` adds the variables
``accelerate launch --config_file CONFIG`` would set (ACCELERATE_USE_FSDP, FSDP_*), computed by
accelerate's own launcher code from the file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import traceback
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(config_file: str | Path, world: int) -> dict[str, str]:
    """The accelerate and FSDP variables that ``accelerate launch --config_file CONFIG
    --num_processes WORLD`` sets for every process, from accelerate's launcher code (its rank and
    rendezvous variables are left to :func:`launch_forked`)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config_file), "--num_processes", str(world), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def _full(tensor):
    """A DTensor's full value (a collective); any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _reset_accelerate() -> None:
    """A forked child inherits the parent's accelerate singletons (a one-process state): forget them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_jobs(jobs: list[dict]) -> None:
    import torch

    from layerdiff.config import get_preset
    from layerdiff.io.checkpoint import build_random_model
    from layerdiff.io.files import save_safetensors_atomic
    from layerdiff.training.loop import train
    from layerdiff.training.objective import LayerDiffTrainModule
    from layerdiff.training.settings import TrainConfig

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for job in jobs:
        model = build_random_model(get_preset(job.get("preset", "tiny")), seed=job.get("model_seed", 0))
        config = TrainConfig.from_dict(job["config"])
        Path(job["out"]).mkdir(parents=True, exist_ok=True)
        logger = logging.getLogger("layerdiff.train")
        handler = logging.FileHandler(Path(job["out"]) / f"rank-{rank}.log")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            train(model, job["data"], job["out"], config, progress=False, stop_after=job.get("stop_after"))
        finally:
            logger.removeHandler(handler)
            handler.close()
        state = {k: _full(v) for k, v in LayerDiffTrainModule(model).state_dict().items()}  # FSDP: gathered
        save_safetensors_atomic(state, Path(job["out"]) / f"rank-{rank}.safetensors", overwrite=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _child(rank: int, world: int, port: int, jobs: list[dict], error_file: str, env: dict) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
    )
    os.environ.pop("ACCELERATE_USE_CPU", None)
    try:
        _reset_accelerate()
        run_jobs(jobs)
    except BaseException:
        Path(error_file).write_text(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        os._exit(1)


def launch_forked(world: int, jobs: list[dict], workdir: Path, timeout: float = 120.0, env: dict | None = None) -> None:
    """Fork ``world`` ranks running ``jobs`` (with the variables ``env`` set, e.g. :func:`launcher_env`);
    raise with the first rank's traceback if any fails."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    port = free_port()
    errors = [Path(workdir) / f"rank-{r}.error" for r in range(world)]
    for e in errors:
        e.unlink(missing_ok=True)
    procs = [ctx.Process(target=_child, args=(r, world, port, jobs, str(errors[r]), env or {}), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:  # only the ranks this function started
            p.kill()
            p.join(5)
    messages = [f"rank {r}:\n{e.read_text()}" for r, e in enumerate(errors) if e.is_file()]
    if hung:
        messages.append(f"{len(hung)} rank(s) still running after {timeout} s: killed")
    codes = [p.exitcode for p in procs]
    if messages or any(c != 0 for c in codes):
        raise RuntimeError(f"ranks failed (exit codes {codes}):\n" + "\n".join(messages))


if __name__ == "__main__":  # under torchrun / accelerate launch: the launcher set the rank variables
    run_jobs(json.loads(Path(sys.argv[1]).read_text()))
