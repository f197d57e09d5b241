"""Errors that reach users: each message names the input, the bad value and the fix."""


class LayerDiffError(ValueError):
    """A bad input, file or setting. The message is one line a user can act on."""


class CheckpointError(LayerDiffError):
    """A model file that cannot be used: missing, corrupt, of the wrong architecture or format."""


class Interrupted(RuntimeError):
    """Sampling was stopped by the caller's callback (ComfyUI's interrupt, Ctrl-C, ...)."""
