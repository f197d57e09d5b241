"""The MLCID builder: layered training samples from ordinary photos (METHOD.md section 6).

Stages (``stages.py``) are swappable: transformers/diffusers models (``hf.py``, ``sd_inpaint.py``)
or classical fallbacks (``classical.py``, ``phrases.py``); ``pipeline.py`` runs them on one image,
``screening.py`` rejects near-duplicate and flat photos first, ``builder.py`` builds over a folder
with sharding and resume in one process, ``ray_engine.py`` (with ``hash_layout.py``, its
content-addressed shards) on Ray Data; ``timing.py`` times the steps; ``command.py`` is the work of
``layerdiff data build`` (its flags: :mod:`layerdiff.cli.build`).
Nothing heavy is imported here.
"""
