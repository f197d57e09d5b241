"""Prompts saved by earlier versions of the pack, upgraded before ComfyUI validates them.

Earlier versions had one combined ``scheduler`` input holding the sampler ("ddim",
"dpmpp_2m_karras", ...) where the nodes now have ``sampler_name`` and ``scheduler`` as ComfyUI's
KSampler does. Workflows saved in the editor keep working by position; API-format prompts (the
JSON scripts send to /prompt) name their inputs, so they are rewritten here, in ComfyUI's on-prompt
hook: the old value moves to ``sampler_name`` and ``scheduler`` gets the schedule it implied.
"""

from __future__ import annotations

from layerdiff.settings import SCHEDULERS, split_sampler

SAMPLER_NODES = frozenset({"LayerDiffKSampler", "LayerDiffLayerEdit", "LayerDiffLayerInpaint", "LayerDiffLayerStyle"})


def upgrade_node(node) -> bool:
    """Rewrite one API-format node ({"class_type", "inputs"}) in place; True when it changed."""
    if not isinstance(node, dict) or node.get("class_type") not in SAMPLER_NODES:
        return False
    inputs = node.get("inputs")
    if not isinstance(inputs, dict) or "sampler_name" in inputs:
        return False
    old = inputs.get("scheduler")
    if not isinstance(old, str) or old in SCHEDULERS:
        return False
    sampler, scheduler = split_sampler(old)
    inputs["sampler_name"] = sampler
    inputs["scheduler"] = scheduler or "normal"
    return True


def upgrade_request(json_data):
    """ComfyUI's on-prompt handler: the /prompt request body with its prompt's old nodes upgraded."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if isinstance(prompt, dict):
        for node in prompt.values():
            upgrade_node(node)
    return json_data
