"""Reading and replacing the parameters a graph's ``get_attr`` nodes name.

Captured graphs share their tensors with the source model, so a pass never edits a tensor in
place: it builds a new one and installs it on the graph's own module tree.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from fxflatten.graph.layout import Linear
from fxflatten.weights import STORE


def get_tensor(gm: GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a ``get_attr`` target names."""
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def set_tensor(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Install ``value`` as a fresh parameter at ``target`` (creating parent modules if needed).

    In a streamed graph the value goes to the graph's scratch store on disk and is installed
    as a streamed tensor, so rewritten weights do not accumulate in memory.
    """
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    store = gm.meta.get(STORE)
    value = store.put(value) if store is not None else value.detach().clone()
    setattr(owner, leaf, nn.Parameter(value, requires_grad=False))


def weight(gm: GraphModule, linear: Linear) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the storage layout."""
    tensor = get_tensor(gm, linear.weight)
    return tensor.t() if linear.transposed else tensor


def bias(gm: GraphModule, linear: Linear) -> torch.Tensor | None:
    return get_tensor(gm, linear.bias) if linear.bias else None


def set_weight(gm: GraphModule, linear: Linear, value: torch.Tensor) -> None:
    """Store an (out_features, in_features) weight in the linear's own layout."""
    set_tensor(gm, linear.weight, value.t().contiguous() if linear.transposed else value)
