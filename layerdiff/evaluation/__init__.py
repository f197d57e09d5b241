"""Evaluation of LayerDiff models on the toy world, one concept per module.

- :mod:`~layerdiff.evaluation.scenes`: fresh evaluation scenes, none of them in the training set;
- :mod:`~layerdiff.evaluation.judge`: the model-free judge of toy-world layers;
- :mod:`~layerdiff.evaluation.metrics`: one generated stack's judgements, their summaries, paired
  differences and targets;
- :mod:`~layerdiff.evaluation.run`: the loop that generates every scene with plain CFG and with
  self-mask guidance and judges it;
- :mod:`~layerdiff.evaluation.sheets`: the contact sheet of the first scenes;
- :mod:`~layerdiff.evaluation.report`: ``python -m layerdiff eval``, the report as JSON;
- :mod:`~layerdiff.evaluation.calibrate`: a trained model's guidance scales, picked on validation scenes;
- :mod:`~layerdiff.evaluation.bench`: the cost of the layer modules and of self-mask guidance.

Their command-line arguments are in :mod:`layerdiff.cli` (``evaluate``, ``calibrate``, ``bench``).
"""
