"""Flatten groups of adjacent blocks into the parallel form (FlattenGPT step 1).

Blocks A then B compute ``h = x + Attn_A(x) ...; y = ... + MLP_B(...)`` in series. Flattened,
every attention branch of the group reads the group's input and every MLP branch reads the
stream after all the group's attention adds:

    h = x + Attn_A(N1_A(x)) + Attn_B(N1_B(x))
    y = h + MLP_A(N2_A(h))  + MLP_B(N2_B(h))

The rewrite only rewires edges: which stream value each branch reads, and which add each
residual add builds on. No weights change, so any branch works, including ones behind
post-branch norms that cannot be fused later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.tools_common import legalize_graph

from fxflatten.errors import FxflattenError
from fxflatten.graph.layout import BlockMap, Branch
from fxflatten.passes.base import GraphPass, contract_error, editable_copy, finish

log = logging.getLogger(__name__)


def check_groups(groups: Sequence[Sequence[int]], block_map: BlockMap) -> list[list[int]]:
    """Groups must be runs of adjacent, serial blocks that exist and do not overlap."""
    checked, used = [], set()
    for group in groups:
        group = sorted(int(index) for index in group)
        if not group:
            continue
        if group[0] < 0 or group[-1] >= len(block_map.blocks):
            raise FxflattenError(
                f"group {group} names a block outside 0..{len(block_map.blocks) - 1}; name blocks this model has"
            )
        if group != list(range(group[0], group[-1] + 1)):
            raise FxflattenError(f"group {group} is not a run of adjacent blocks; only neighbours can be flattened")
        if used & set(group):
            raise FxflattenError(f"group {group} overlaps another group; put each block in one group at most")
        if any(block_map.blocks[index].parallel > 1 for index in group):
            raise FxflattenError(
                f"group {group} contains a block that is already flattened; flatten the unflattened graph "
                "with the groups joined instead"
            )
        used |= set(group)
        checked.append(group)
    return checked


def read_from(nodes: dict[str, Node], branch: Branch, source: Node) -> None:
    """Make the branch read the stream at ``source`` instead of its own stream value."""
    old = nodes[branch.stream_in]
    for name in branch.nodes:
        nodes[name].replace_input_with(old, source)


def add_onto(nodes: dict[str, Node], branch: Branch, onto: Node) -> None:
    """Make the branch's residual add build on ``onto`` instead of its own stream operand."""
    add, output = nodes[branch.add], nodes[branch.output]
    operand = next(arg for arg in add.args[:2] if arg is not output)
    add.replace_input_with(operand, onto)


class FlattenPass(GraphPass):
    """Rewrite each group of adjacent blocks (indices into the block map) into parallel form.

    Requires: every group is a run of adjacent serial blocks that exist, and groups do not
    overlap. Ensures: each group of n blocks is one block whose attention and MLP stages hold n
    parallel branches, and the model has sum(n - 1) blocks fewer.
    """

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        self.groups = groups

    def merged(self, block_map: BlockMap) -> list[list[int]]:
        """The checked groups of more than one block: the ones the pass rewrites."""
        return [group for group in check_groups(self.groups, block_map) if len(group) > 1]

    def requires(self, graph_module: GraphModule) -> None:
        super().requires(graph_module)
        self.merged(self.record_input(graph_module))

    def call(self, graph_module: GraphModule) -> PassResult:
        block_map = self.blocks_of(graph_module)
        groups = self.merged(block_map)
        if not groups:
            return PassResult(graph_module, False)
        gm = editable_copy(graph_module)
        nodes = {node.name: node for node in gm.graph.nodes}
        for group in groups:
            blocks = [block_map.blocks[index] for index in group]
            attentions = [block.attention[0] for block in blocks]
            mlps = [block.mlp[0] for block in blocks]
            stream_in = nodes[attentions[0].stream_in]
            last = nodes[attentions[0].add]  # the stream so far: the latest add of the group
            for branch in attentions[1:]:
                read_from(nodes, branch, stream_in)
                add_onto(nodes, branch, last)
                last = nodes[branch.add]
            after_attention = last
            for branch in mlps:
                read_from(nodes, branch, after_attention)
                add_onto(nodes, branch, last)
                last = nodes[branch.add]
            log.info("flattened blocks %s into parallel form", group)
        legalize_graph(gm)
        return PassResult(finish(gm, reexport=False), True)

    def ensures(self, graph_module: GraphModule) -> None:
        super().ensures(graph_module)
        before, after = self.input_blocks(), self.blocks_of(graph_module)
        groups = self.merged(before)
        expected = len(before.blocks) - sum(len(group) - 1 for group in groups)
        if len(after.blocks) != expected:
            raise contract_error(
                "FlattenPass", f"flattening {groups} leaves {expected} of {len(before.blocks)} blocks",
                f"{len(after.blocks)} blocks",
            )
        merged_away = 0  # blocks of the groups to the left that became part of their group's first
        for group in sorted(groups):
            block = after.blocks[group[0] - merged_away]
            stages = (len(block.attention), len(block.mlp))
            if stages != (len(group), len(group)):
                raise contract_error(
                    "FlattenPass", f"group {group} becomes one block of {len(group)} parallel branches per stage",
                    f"block {block.index} with {stages[0]} attention and {stages[1]} MLP branches",
                )
            merged_away += len(group) - 1
