"""Layered sampler: classifier-free guidance over global + layer prompts, self-mask guidance
(METHOD.md section 4), layout cleanup, empty-layer retries and RePaint-style locks for editing
(section 5), each a hook of one loop.

Modules: ``loop`` (sample()), ``hooks`` (Step, Hook), ``guidance`` (CFG), ``self_mask``,
``layout``, ``retry``, ``locks``, ``masks`` (masks read from latents), ``schedulers`` (samplers and
schedulers), ``checks`` (argument checks).
"""

from layerdiff.sampling.hooks import Hook, Step
from layerdiff.sampling.layout import clean_layout
from layerdiff.sampling.locks import Lock
from layerdiff.sampling.loop import Callback, sample
from layerdiff.sampling.masks import PRESENCE, gaussian_blur, read_masks
from layerdiff.sampling.schedulers import make_scheduler

__all__ = ["PRESENCE", "Callback", "Hook", "Lock", "Step", "clean_layout", "gaussian_blur", "make_scheduler",
           "read_masks", "sample"]
