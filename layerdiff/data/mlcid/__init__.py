"""The MLCID builder: layered training samples from ordinary photos (METHOD.md section 6).

Stages (``stages.py``) are swappable: transformers/diffusers models (``hf.py``, ``sd_inpaint.py``)
or classical fallbacks (``classical.py``, ``phrases.py``); ``pipeline.py`` runs them on one image,
``builder.py`` over a folder with sharding and resume, ``command.py`` is the work of
``layerdiff data build`` (its flags: :mod:`layerdiff.cli.build`).
Nothing heavy is imported here.
"""
