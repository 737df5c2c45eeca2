"""Remove whole blocks: the stream skips them (block removal, as ShortGPT does).

Not part of FlattenGPT, but the baseline it must beat, and a useful pass on its own: the
residual stream leaving block k is replaced by the stream entering it, and the block's nodes
and parameters go away.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from fxflatten.errors import FxflattenError
from fxflatten.graph.discovery import block_boundaries, discover_blocks
from fxflatten.passes.base import GraphPass, editable_copy, finish


class RemoveBlocksPass(GraphPass):
    """Delete the blocks with the given indices."""

    def __init__(self, blocks: Iterable[int]) -> None:
        self.blocks = sorted(set(blocks))

    def call(self, graph_module: GraphModule) -> PassResult:
        if not self.blocks:
            return PassResult(graph_module, False)
        block_map = discover_blocks(graph_module)
        if self.blocks[0] < 0 or self.blocks[-1] >= len(block_map.blocks) or len(self.blocks) == len(block_map.blocks):
            raise FxflattenError(f"cannot remove blocks {self.blocks} of a model with {len(block_map.blocks)}")
        gm = editable_copy(graph_module)
        nodes = {node.name: node for node in gm.graph.nodes}
        boundaries = block_boundaries(gm, block_map)
        for index in reversed(self.blocks):
            nodes[boundaries[index + 1]].replace_all_uses_with(nodes[boundaries[index]])
        return PassResult(finish(gm), True)
