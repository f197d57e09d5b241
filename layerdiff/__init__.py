"""LayerDiff: text-guided multi-layered composable image synthesis (Huang et al., ECCV 2024).

The library runs without ComfyUI; the ComfyUI nodes in ``nodes/`` are a thin layer over it.
"""

import logging

__version__ = "0.1.0"

logger = logging.getLogger("layerdiff")
logger.addHandler(logging.NullHandler())

__all__ = ["__version__", "logger"]
