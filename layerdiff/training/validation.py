"""The held-out loss of a training run: the training objective (without prompt dropout) on a fixed
set of validation samples, each with its own fixed timestep and noise, so that the same weights
always give the same number.

The set is the first ``val_samples`` samples of ``validation_data`` (at most the model's layer
count, in shard order). Sample i gets the timestep ``(i + 0.5) / n`` of the way through the
schedule (the n samples cover it evenly) and noise from its own random stream; rank r of R
evaluates the samples i with ``i % R == r``, and the ranks' sums are added up, so every rank gets
the mean over the whole set.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from layerdiff.errors import LayerDiffError
from layerdiff.model.bundle import LayerDiffModel
from layerdiff.training.objective import NoiseSchedule, make_batch
from layerdiff.training.outputs import swap_in_ema
from layerdiff.training.settings import TrainConfig
from layerdiff.training.state import step_generator

logger = logging.getLogger("layerdiff.train")

VALIDATION_STREAM = 7  # step_generator's stream for validation noise: no training draw uses it


class ValidationSet:
    """This rank's share of the validation samples, noised once: batches of one layer count each."""

    def __init__(self, batches: list[dict], source):
        self.batches = batches  # CPU tensors, the keys of make_batch
        self.source = source

    def __len__(self) -> int:
        return sum(len(b["t"]) for b in self.batches)

    @classmethod
    def build(cls, model: LayerDiffModel, data, config: TrainConfig, rank: int = 0, world: int = 1) -> ValidationSet:
        """Read, encode (with the model's VAE) and noise this rank's share of the set."""
        from layerdiff.data.format import decode_record
        from layerdiff.data.reader import first_records, sample_to_tensors

        max_layers = model.config.max_layers
        records, _, damage = first_records(data, config.val_samples, max_layers)
        if not records:
            why = f" ({damage.describe()})" if damage else ""
            raise LayerDiffError(f"validation_data {data!r} holds no readable sample of {max_layers} layers or fewer"
                                 f"{why}: check it with python -m layerdiff data inspect DIR")
        schedule = NoiseSchedule(model.config.scheduler)
        plain = dataclasses.replace(config, drop_all=0.0, drop_layers=0.0)
        n = len(records)
        by_layers: dict[int, list[dict]] = {}
        for i in range(rank, n, world):
            record = records[i]
            try:
                item = sample_to_tensors(decode_record(record.key, record.members, record.shard), config.size)
            except LayerDiffError as exc:
                damage.add(exc)
                continue
            L = item["num_layers"]
            images = item["images"].permute(0, 2, 3, 1)[None] * 0.5 + 0.5  # (1, L, S, S, 3) in 0..1
            with torch.no_grad():
                latents = model.encode_layers(images.to(model.device), item["masks"][1:, 0][None].to(model.device))
            t = torch.tensor([int((i + 0.5) * schedule.num_train_timesteps / n)])
            gen = step_generator(config.seed, i, 0, VALIDATION_STREAM)
            batch = make_batch(latents.float().cpu(), torch.ones(1, L, dtype=torch.bool), [item["global_prompt"]],
                               [item["layer_prompts"]], model.tokenizer, schedule, plain, gen, t=t)
            by_layers.setdefault(L, []).append(batch)
        if damage:
            logger.warning("validation data: %s", damage.describe())
        batches = []
        for L in sorted(by_layers):
            items = by_layers[L]
            for k in range(0, len(items), config.batch_size):
                chunk = items[k:k + config.batch_size]
                batches.append({key: torch.cat([b[key] for b in chunk]) for key in chunk[0]})
        return cls(batches, data)

    def loss(self, module, accelerator, ema: dict | None, trained: dict) -> tuple[float, int]:
        """(mean loss per sample, samples) over every rank's share (a collective: every rank calls
        it and gets the same), with the EMA weights where EMA runs, else the trained ones; the
        module's train/eval modes are kept."""
        modes = [(m, m.training) for m in module.modules()]
        spare = self._spare_forwards(accelerator)
        module.eval()
        total = torch.zeros(2, dtype=torch.float64)  # (sum of per-sample losses, samples)
        try:
            with torch.no_grad(), swap_in_ema(ema, trained):
                for i, batch in enumerate(self.batches + self.batches[-1:] * spare):
                    with accelerator.autocast():
                        losses = module(**{k: v.to(accelerator.device) for k, v in batch.items()}, per_sample=True)
                    if i < len(self.batches):  # the spare forwards' losses are not counted
                        total += torch.stack([losses.double().sum().cpu(), torch.tensor(float(len(losses)))])
        finally:
            for m, mode in modes:
                m.train(mode)
        total = accelerator.reduce(total.to(accelerator.device), reduction="sum").cpu()
        if total[1] == 0:
            raise LayerDiffError(f"validation_data {self.source!r}: no sample could be decoded: check it with "
                                 "python -m layerdiff data inspect DIR")
        return float(total[0] / total[1]), int(total[1])


    def _spare_forwards(self, accelerator) -> int:
        """Under FSDP every forward gathers the weights from all ranks, so every rank must run as
        many: a rank with fewer batches than the most runs that many more on its last one."""
        from layerdiff.training.sharding import is_fsdp

        if not is_fsdp(accelerator):
            return 0
        most = torch.tensor([len(self.batches)], device=accelerator.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        spare = int(most) - len(self.batches)
        if spare and not self.batches:
            raise LayerDiffError(f"validation_data {self.source!r}: rank {accelerator.process_index} has no validation "
                                 f"sample under FSDP: set val_samples to {accelerator.num_processes} or more")
        return spare
