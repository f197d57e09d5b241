"""The MLCID builder: layered training samples from ordinary photos (METHOD.md section 6).

Stages (``stages.py``) are swappable: transformers/diffusers models (``hf.py``, ``sd_inpaint.py``)
or classical fallbacks (``classical.py``, ``phrases.py``); ``pipeline.py`` runs them on one image,
``builder.py`` over a folder with sharding and resume, ``cli.py`` is ``layerdiff data build``.
Nothing heavy is imported here.
"""
