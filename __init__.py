"""ComfyUI entry point of the LayerDiff node pack.

Guarded: inside ComfyUI (loaded as a custom-node package) it registers the nodes; anywhere else
(pytest importing this file, a plain ``import``) it does nothing. No work happens at import: no
downloads, no model scans, no patching of ComfyUI.
"""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = "./web"

if __package__:  # imported as a package (ComfyUI's custom_nodes loader); pytest imports it bare
    try:
        import folder_paths  # noqa: F401  (present only inside ComfyUI)
    except ImportError:
        folder_paths = None
    if folder_paths is not None:
        import os
        import sys

        # The library package `layerdiff` sits beside this file, but ComfyUI imports the pack by file
        # path, so this folder is not on sys.path. Appended, not prepended: nothing of the host's (its
        # `nodes` module, say) is shadowed.
        _pack_dir = os.path.dirname(os.path.abspath(__file__))
        if _pack_dir not in sys.path:
            sys.path.append(_pack_dir)
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
