"""Fuse (widen) the parallel branches of a flattened block into one branch (FlattenGPT step 3). Exact.

G parallel attention branches become one with G times the heads: the rows of q/k/v (or of a
fused qkv projection, part by part) are concatenated branch after branch, so query head j of
branch i still meets KV head j // n_rep of branch i, and RoPE, being per head, is unchanged;
the output projection's input columns are concatenated and its biases add. G parallel MLPs
become one of G times the width the same way. The first branch's nodes are kept and widened
(every shape constant on its channel axis is rescaled by G, see :mod:`fxflatten.passes.rescale`);
the other branches and their adds are removed.

A branch is fused only when that is exact: norms already folded (so all branches normalise the
stream identically), no post-branch norm, equal head dim and heads per KV head. Blocks that do
not qualify stay parallel, and the pass says why in ``FusePass.skipped``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from fractions import Fraction

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from fxflatten.errors import FxflattenError
from fxflatten.graph.layout import BlockMap, Branch, Linear, Projection
from fxflatten.graph.params import bias, set_tensor, set_weight, weight
from fxflatten.passes.base import GraphPass, contract_error, drop_dead, editable_copy, finish
from fxflatten.passes.rescale import rescale_constants

log = logging.getLogger(__name__)


def why_not_fusable(stage: tuple[Branch, ...]) -> str | None:
    """None if the parallel branches of a stage can be fused exactly, else the reason."""
    first = stage[0]
    if any(branch.post_norm for branch in stage):
        return "a branch has a post-branch norm (its output is normalised on its way to the add)"
    if any(branch.norm and (branch.norm.weight or branch.norm.bias) for branch in stage):
        return "norms are not folded yet (run FoldNormsPass first)"
    if len({(b.norm.kind, b.norm.eps) if b.norm else None for b in stage}) > 1:
        return "the branches normalise differently"
    if first.kind == "attention":
        layouts = [branch.attention for branch in stage]
        if any(layout is None for layout in layouts):
            return "an attention branch could not be taken apart into q/k/v/o"
        if len({(a.head_dim, a.num_heads, a.num_kv_heads) for a in layouts}) > 1:
            return "the branches have different head shapes"
    elif first.kind == "mlp":
        layouts = [branch.mlp for branch in stage]
        if len({(m.width, m.gate is None, m.activation) for m in layouts}) > 1:
            return "the MLPs have different widths or activations"
    else:
        return f"branches of kind {first.kind} cannot be fused"
    return None


def projections_of(branch: Branch) -> tuple[list[Projection], Linear]:
    """The input projections (rows to concatenate) and the output linear (columns)."""
    if branch.kind == "attention":
        layout = branch.attention
        return [layout.q, layout.k, layout.v], layout.o
    layout = branch.mlp
    return [p for p in (layout.gate, layout.up) if p is not None], layout.down


def widen_inputs(gm: GraphModule, stage: tuple[Branch, ...]) -> None:
    """Concatenate the input projections' rows, part by part, into the first branch's linears."""
    per_branch = [projections_of(branch)[0] for branch in stage]
    by_linear: dict[Linear, list[int]] = defaultdict(list)
    for index, projection in enumerate(per_branch[0]):
        by_linear[projection.linear].append(index)
    for linear, indices in by_linear.items():
        indices.sort(key=lambda i: per_branch[0][i].start)
        parts = [per_branch[b][i] for i in indices for b in range(len(stage))]
        set_weight(gm, linear, torch.cat([weight(gm, p.linear)[p.start:p.stop] for p in parts]))
        if linear.bias:
            set_tensor(gm, linear.bias, torch.cat([bias(gm, p.linear)[p.start:p.stop] for p in parts]))


def check_output_biases(stage: tuple[Branch, ...]) -> None:
    """The fused output linear is the first branch's: it must have a bias if any branch has one.

    The output biases add up in the first linear's bias; a branch without one adds zero.
    """
    first, *others = [projections_of(branch)[1] for branch in stage]
    with_bias = next((linear for linear in others if linear.bias), None)
    if first.bias is None and with_bias is not None:
        raise FxflattenError(
            f"{first.weight} has no bias but the parallel {with_bias.weight} has one, so their sum has "
            f"nowhere to go; give {first.weight} a zero bias in the model before capturing it"
        )


def widen_output(gm: GraphModule, nodes: dict[str, Node], stage: tuple[Branch, ...]) -> None:
    """Concatenate the output linears' input columns; add their biases (``requires`` checked
    that the first linear has a bias wherever another one does)."""
    outputs = [projections_of(branch)[1] for branch in stage]
    first = outputs[0]
    set_weight(gm, first, torch.cat([weight(gm, linear) for linear in outputs], dim=1))
    biases = [bias(gm, linear) for linear in outputs if linear.bias]
    if biases:
        set_tensor(gm, first.bias, torch.stack(biases).sum(0))


def fuse_stage(gm: GraphModule, nodes: dict[str, Node], stage: tuple[Branch, ...]) -> None:
    first = stage[0]
    sources = {p.linear.node for p in projections_of(first)[0]}
    stop = projections_of(first)[1].node
    members = [nodes[name] for name in first.nodes]
    rescale_constants(gm, members, sources, {stop}, Fraction(len(stage)))
    widen_inputs(gm, stage)
    widen_output(gm, nodes, stage)
    for branch in stage[1:]:
        add, output = nodes[branch.add], nodes[branch.output]
        operand = next(arg for arg in add.args[:2] if arg is not output)
        add.replace_all_uses_with(operand)


def plan(block_map: BlockMap) -> tuple[list[tuple[Branch, ...]], dict[int, str]]:
    """The parallel stages to fuse, and why each block left parallel is (block index -> reason)."""
    stages, skipped = [], {}
    for block in block_map.blocks:
        for stage in (block.attention, block.mlp):
            if len(stage) < 2:
                continue
            reason = why_not_fusable(stage)
            if reason:
                skipped[block.index] = "; ".join(filter(None, [skipped.get(block.index), reason]))
            else:
                stages.append(stage)
    return stages, skipped


class FusePass(GraphPass):
    """Widen every flattened block's parallel branches into one branch each.

    Requires: the graph has blocks, and every stage to fuse can hold its output biases.
    Ensures: the blocks are the same in number, and only the blocks reported in ``skipped``
    keep a stage of more than one branch.
    """

    def __init__(self, consume: bool = False) -> None:
        """``consume=True`` fuses the input graph itself instead of a copy sharing its tensors.

        For a caller that made the input and will not use it again (``flatten`` and its folded
        graph): each stage's parallel weights are then freed as soon as it is fused, instead of
        all of them staying alive with the input until the pass ends, beside the widened ones,
        which would hold the flattened blocks' weights twice at the peak.
        """
        self.consume = consume
        self.skipped: dict[int, str] = {}

    def requires(self, graph_module: GraphModule) -> None:
        super().requires(graph_module)
        for stage in plan(self.record_input(graph_module))[0]:
            check_output_biases(stage)

    def call(self, graph_module: GraphModule) -> PassResult:
        stages, self.skipped = plan(self.blocks_of(graph_module))
        for index, reason in self.skipped.items():
            log.warning("block %d stays parallel: %s", index, reason)
        if not stages:
            return PassResult(graph_module, False)
        gm = graph_module if self.consume else editable_copy(graph_module)
        nodes = {node.name: node for node in gm.graph.nodes}
        for stage in stages:
            fuse_stage(gm, nodes, stage)
            if self.consume:
                drop_dead(gm)  # the other branches' weights
        log.info("fused %d parallel stages", len(stages))
        return PassResult(finish(gm), True)

    def ensures(self, graph_module: GraphModule) -> None:
        super().ensures(graph_module)
        before, after = self.input_blocks(), self.blocks_of(graph_module)
        if len(after.blocks) != len(before.blocks):
            raise contract_error(
                "FusePass", f"the {len(before.blocks)} blocks stay as many", f"{len(after.blocks)} blocks"
            )
        parallel = [block.index for block in after.blocks if max(len(block.attention), len(block.mlp)) > 1]
        unfused = [index for index in parallel if index not in self.skipped]
        if unfused:
            raise contract_error(
                "FusePass", f"only the skipped blocks {sorted(self.skipped)} stay parallel",
                f"parallel blocks {unfused}",
            )
