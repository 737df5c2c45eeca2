"""Small questions asked of fx nodes everywhere: what op is this, what shape, is it a no-op.

Discovery, the runner and the passes all look at nodes the same way; these helpers are that
one way, so that, for example, the set of view ops a pass looks through is written once.
"""

from __future__ import annotations

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from fxflatten.graph.layout import Linear

aten = torch.ops.aten

#: Ops that pass a tensor through unchanged (in eval mode) and so do not break the stream.
IDENTITY_OPS = {aten.to, aten._to_copy, aten.clone, aten.dropout, aten.alias, aten.contiguous, aten.detach}
#: Ops that change a tensor's shape but not its memory order: reshapes a pass may look through.
VIEW_OPS = {aten.view, aten.reshape, aten._unsafe_view}


def packet(node: Node):
    """The overload packet of a call (``aten.add`` for ``aten.add.Tensor``), or None."""
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def shape_of(node: Node) -> tuple[int, ...] | None:
    """The node's shape as the export recorded it, or None for non-tensor values."""
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return None


def is_identity(node: Node) -> bool:
    """A copy, an eval-mode dropout, or a cast to the dtype the value already has."""
    if packet(node) not in IDENTITY_OPS or not node.args or not isinstance(node.args[0], Node):
        return False
    before, after = node.args[0].meta.get("val"), node.meta.get("val")
    return isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dtype == after.dtype


def resolve_identity(node: Node) -> Node:
    """Follow no-op casts, copies and dropouts back to the node that computed the value."""
    while is_identity(node):
        node = node.args[0]
    return node


def to_digraph(gm: GraphModule) -> nx.DiGraph:
    """The graph's data flow as a networkx graph over node names (for ancestors, descendants)."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def linear_input(node: Node, linear: Linear) -> Node:
    """The activation a linear multiplies: aten.linear's first argument, Conv1D addmm's second."""
    return node.args[1] if linear.transposed else node.args[0]


def unviewed(node: Node) -> Node:
    """The value behind any no-op copies and views of ``node``."""
    while is_identity(node) or packet(node) in VIEW_OPS:
        node = node.args[0]
    return node


def attr_target(arg: object) -> str | None:
    """The parameter a ``get_attr`` argument names, or None for anything else."""
    return arg.target if isinstance(arg, Node) and arg.op == "get_attr" else None


def flat_nodes(args: object) -> list[Node]:
    """The nodes among (possibly nested list) arguments, in order."""
    if isinstance(args, Node):
        return [args]
    if isinstance(args, (list, tuple)):
        return [node for arg in args for node in flat_nodes(arg)]
    return []
