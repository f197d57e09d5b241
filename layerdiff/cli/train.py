"""``python -m layerdiff train``: the trainer, and the one-command recipe of the built-in toy model
(the work is :func:`layerdiff.training.command.run`)."""

from __future__ import annotations

from layerdiff.training.command import run


def register(sub) -> None:
    """Add the ``train`` sub-command to the sub-parsers ``sub``."""
    p = sub.add_parser("train", help="train LayerDiff (the toy model in one command, or SD 1.5 scale with accelerate)")
    p.add_argument("--preset", default=None, help="toy | tiny | sd15: model preset (toy runs the whole recipe)")
    p.add_argument("--config", default=None, help="JSON file with training settings (and optional 'model' preset)")
    p.add_argument("--init", default=None, help="start from this LayerDiff file (e.g. from `convert`)")
    p.add_argument("--base", default=None, help="SD 1.5 checkpoint giving VAE/text encoder to --init")
    p.add_argument("--data", required=True, help="folder of layered .tar shards (toy: created if empty)")
    p.add_argument("--out", required=True, help="output folder: checkpoints, logs, samples, final model")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument("--vae-steps", type=int, default=None, help="toy: override VAE training steps")
    p.add_argument("--samples", type=int, default=None, help="toy: number of toy samples to generate")
    p.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    p.add_argument("--seed", type=int, default=0, help="random seed (data, init, training)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)
