"""Training LayerDiff and the toy model's VAE (METHOD.md section 3).

One concept per module:

- :mod:`~layerdiff.training.settings`: ``TrainConfig``, ``VaeTrainConfig`` and the table of every
  setting's type and range;
- :mod:`~layerdiff.training.objective`: the trained module (forward = loss), the noise schedule
  and the noised, prompt-dropped batches;
- :mod:`~layerdiff.training.latents`: the latent cache of a small data set;
- :mod:`~layerdiff.training.state`: atomic checkpoints, resume, per-step randomness;
- :mod:`~layerdiff.training.loop`: :func:`~layerdiff.training.loop.train` on accelerate;
- :mod:`~layerdiff.training.outputs`: the exported model file, sample grids and their prompts;
- :mod:`~layerdiff.training.validation`: the held-out loss on a fixed validation set;
- :mod:`~layerdiff.training.vae`: :func:`~layerdiff.training.vae.train_vae`;
- :mod:`~layerdiff.training.recipes`: the built-in toy model's one-command recipe (``TOY_RECIPE``);
- :mod:`~layerdiff.training.command`: the ``train`` command's work (its argparse definitions live in
  :mod:`layerdiff.cli.train`).

Nothing is imported here, so that reading ``TOY_RECIPE`` or building the command line does not load
torch.
"""
