"""LaCo-style layer collapse: merge consecutive layers into one by adding their parameter differences.

LaCo (Yang et al. 2024, "LaCo: Large Language Model Pruning via Layer Collapse") replaces layers
l..l+m by one layer whose parameters are ``θ_l + Σ_k (θ_{l+k} − θ_l)`` (its "reserving
differences while seeking common" merge) and deletes the others. LaCo picks the layers by a
top-down search that checks the merged model's output similarity; here the groups are given
(the benchmark passes FlattenGPT's own groups), so the comparison isolates how a group is turned
into one layer: parameter merging against flattening and pruning back.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxflatten.graph.capture import PARAM_PREFIX
from fxflatten.graph.discovery import discover_blocks
from fxflatten.passes.base import editable_copy
from fxflatten.passes.remove import RemoveBlocksPass


def layer_parameters(graph: GraphModule, module: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of one layer, keyed by their name inside it (``self_attn.q_proj.weight``)."""
    prefix = f"{PARAM_PREFIX}{module}."
    return {name[len(prefix):]: p for name, p in graph.named_parameters() if name.startswith(prefix)}


@torch.no_grad()
def collapse(graph: GraphModule, groups: list[list[int]]) -> GraphModule:
    """Merge each group of consecutive blocks into its first block and remove the rest.

    ``graph`` is left as it was: the merged tensors are new, the others stay shared.
    """
    blocks = discover_blocks(graph).blocks
    merged = editable_copy(graph)
    for group in groups:
        first = layer_parameters(merged, blocks[group[0]].module)
        others = [layer_parameters(graph, blocks[index].module) for index in group[1:]]
        for name, base in first.items():
            difference = sum(other[name] - base for other in others)
            owner, _, attribute = f"{PARAM_PREFIX}{blocks[group[0]].module}.{name}".rpartition(".")
            setattr(merged.get_submodule(owner), attribute, torch.nn.Parameter(base + difference, requires_grad=False))
    removed = [index for group in groups for index in group[1:]]
    return RemoveBlocksPass(removed)(merged).graph_module
