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

from fxflatten.errors import FxflattenError
from fxflatten.graph.fx import linear_input, packet, shape_of, unviewed
from fxflatten.graph.layout import BlockMap, Branch, Linear
from fxflatten.graph.params import bias, get_tensor, set_tensor, set_weight, weight
from fxflatten.passes.base import GraphPass, contract_error, editable_copy, finish

log = logging.getLogger(__name__)
aten = torch.ops.aten


def unflattened_input(node: Node, linear: Linear) -> Node:
    """The activation a linear multiplies, looking through any view that flattens it."""
    return unviewed(linear_input(node, linear))


def readers(nodes: dict[str, Node], branch: Branch) -> list[Linear]:
    """The branch's linears whose input comes straight out of its norm."""
    region = set(branch.norm.nodes)
    return [linear for linear in branch.linears if unflattened_input(nodes[linear.node], linear).name in region]


def other_reader(nodes: dict[str, Node], branch: Branch) -> str | None:
    """A node outside the norm that reads one of its values but is not a linear we fold into.

    Folding moves the affine into the linears that read the norm; any other reader of the
    normalised value (a residual inside the branch, a gate) would lose it. Nodes that yield no
    tensor (shape queries, export's metadata assertions) see only shapes, which folding keeps.
    """
    region = set(branch.norm.nodes)
    folded = {linear.node for linear in readers(nodes, branch)}
    for name in branch.norm.nodes:
        for user in nodes[name].users:
            if user.name not in region and user.name not in folded and shape_of(user) is not None:
                return user.name
    return None


def affine_branches(block_map: BlockMap, parallel_only: bool) -> list[tuple[int, Branch]]:
    """The branches (with their block index) whose norm has a scale or shift to fold."""
    return [
        (block.index, branch) for block in block_map.blocks for branch in block.branches
        if branch.norm and (branch.norm.weight or branch.norm.bias) and (block.parallel > 1 or not parallel_only)
    ]


def add_bias(gm: GraphModule, node: Node, linear: Linear) -> Linear:
    """Give an ``aten.linear`` without bias a zero bias parameter, wired into the graph."""
    target = linear.weight.rsplit(".", 1)[0] + ".bias"
    like = get_tensor(gm, linear.weight)
    set_tensor(gm, target, torch.zeros(linear.out_features, dtype=like.dtype, device=like.device))
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

    Requires: every norm to fold is read by linears only, so that folding is exact. Ensures:
    no norm of a block it folds (every block, or the parallel ones) keeps a scale or shift.
    """

    def __init__(self, parallel_only: bool = False) -> None:
        self.parallel_only = parallel_only

    def requires(self, graph_module: GraphModule) -> None:
        super().requires(graph_module)
        block_map = self.record_input(graph_module)
        nodes = {node.name: node for node in graph_module.graph.nodes}
        for index, branch in affine_branches(block_map, self.parallel_only):
            reader = other_reader(nodes, branch)
            if reader is not None:
                advice = "" if self.parallel_only else " and fold with parallel_only=True"
                raise FxflattenError(
                    f"the norm of block {index}'s {branch.kind} branch also feeds {reader}, not only linears, "
                    f"so its scale cannot be folded exactly; do not flatten the layers of this block{advice}"
                )

    def call(self, graph_module: GraphModule) -> PassResult:
        branches = [branch for _, branch in affine_branches(self.blocks_of(graph_module), self.parallel_only)]
        if not branches:
            return PassResult(graph_module, False)
        gm = editable_copy(graph_module)
        nodes = {node.name: node for node in gm.graph.nodes}
        added = [fold_branch(gm, nodes, branch) for branch in branches]
        log.info("folded the norms of %d branches", len(branches))
        # Folding keeps every shape; only new bias nodes lack the metadata a re-export gives.
        return PassResult(finish(gm, reexport=any(added)), True)

    def ensures(self, graph_module: GraphModule) -> None:
        super().ensures(graph_module)
        left = affine_branches(self.blocks_of(graph_module), self.parallel_only)
        if left:
            index, branch = left[0]
            which = "parallel blocks" if self.parallel_only else "blocks"
            raise contract_error(
                "FoldNormsPass", f"the norms of all {which} lose their scale and shift",
                f"{len(left)} still have one, first block {index}'s {branch.kind} norm",
            )
