"""Fold each branch's norm affine into the linears that read it (FlattenGPT step 2). Exact.

A pre-norm branch computes ``W (gamma * n(x) + beta) + b`` where ``n`` is the plain
normalisation. That equals ``(W diag(gamma)) n(x) + (W beta + b)``: scale the input columns of
every linear reading the norm by gamma and add ``W beta`` to its bias, then drop the affine from
the norm. Afterwards the norms of all branches that read one stream value compute the same
thing, which is what lets fusing share one norm between parallel branches.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from fxflatten.graph.discovery import discover_blocks
from fxflatten.graph.fx import linear_input, packet, unviewed
from fxflatten.graph.layout import Branch, Linear
from fxflatten.graph.params import bias, get_tensor, set_tensor, set_weight, weight
from fxflatten.passes.base import GraphPass, editable_copy, finish

log = logging.getLogger(__name__)
aten = torch.ops.aten


def unflattened_input(node: Node, linear: Linear) -> Node:
    """The activation a linear multiplies, before any flattening view."""
    return unviewed(linear_input(node, linear))


def readers(nodes: dict[str, Node], branch: Branch) -> list[Linear]:
    """The branch's linears whose input comes straight out of its norm."""
    region = set(branch.norm.nodes)
    return [linear for linear in branch.linears if unflattened_input(nodes[linear.node], linear).name in region]


def add_bias(gm: GraphModule, node: Node, linear: Linear) -> Linear:
    """Give an ``aten.linear`` without bias a zero bias parameter, wired into the graph."""
    target = linear.weight.rsplit(".", 1)[0] + ".bias"
    set_tensor(gm, target, torch.zeros(linear.out_features, dtype=get_tensor(gm, linear.weight).dtype))
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(target)
    node.args = (node.args[0], node.args[1], attr)
    return Linear(linear.node, linear.weight, target, linear.in_features, linear.out_features, linear.transposed)


def drop_affine(nodes: dict[str, Node], branch: Branch) -> None:
    """Remove gamma and beta from the norm's nodes, leaving the plain normalisation."""
    for name in branch.norm.nodes:
        node = nodes[name]
        op = packet(node)
        if op in (aten.layer_norm, aten.native_layer_norm):
            node.args = (*node.args[:2], None, None, *node.args[4:])
        elif op is aten.rms_norm:
            node.args = (*node.args[:2], None, *node.args[3:])
        elif op in (aten.mul, aten.add):
            params = [arg for arg in node.args if isinstance(arg, Node) and arg.op == "get_attr"]
            others = [arg for arg in node.args if isinstance(arg, Node) and arg.op != "get_attr"]
            if params and len(others) == 1:
                node.replace_all_uses_with(others[0])


def fold_branch(gm: GraphModule, nodes: dict[str, Node], branch: Branch) -> bool:
    """Fold one branch's norm; True if a linear had to be given a bias (a new graph node)."""
    norm = branch.norm
    added = False
    gamma = get_tensor(gm, norm.weight).float() if norm.weight else None
    beta = get_tensor(gm, norm.bias).float() if norm.bias else None
    for linear in readers(nodes, branch):
        w = weight(gm, linear)
        if beta is not None:
            if linear.bias is None:
                linear = add_bias(gm, nodes[linear.node], linear)
                added = True
            set_tensor(gm, linear.bias, (bias(gm, linear).float() + w.float() @ beta).to(w.dtype))
        if gamma is not None:
            set_weight(gm, linear, (w.float() * gamma[None, :]).to(w.dtype))
    drop_affine(nodes, branch)
    return added


class FoldNormsPass(GraphPass):
    """Fold pre-branch norms' affine parameters into the linears reading them.

    ``parallel_only`` folds only the blocks that flattening made parallel (the ones fusing
    needs), leaving the others exactly as the model had them.
    """

    def __init__(self, parallel_only: bool = False) -> None:
        self.parallel_only = parallel_only

    def call(self, graph_module: GraphModule) -> PassResult:
        block_map = discover_blocks(graph_module)
        branches = [
            branch for block in block_map.blocks for branch in block.branches
            if branch.norm and (branch.norm.weight or branch.norm.bias) and (block.parallel > 1 or not self.parallel_only)
        ]
        if not branches:
            return PassResult(graph_module, False)
        gm = editable_copy(graph_module)
        nodes = {node.name: node for node in gm.graph.nodes}
        added = [fold_branch(gm, nodes, branch) for branch in branches]
        log.info("folded the norms of %d branches", len(branches))
        # Folding keeps every shape; only new bias nodes lack the metadata a re-export gives.
        return PassResult(finish(gm, reexport=any(added)), True)
