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
from fxflatten.graph.discovery import block_boundaries
from fxflatten.passes.base import GraphPass, contract_error, editable_copy, finish


class RemoveBlocksPass(GraphPass):
    """Delete the blocks with the given indices.

    Requires: the indices name blocks of the model and leave at least one. Ensures: the model
    has exactly that many blocks fewer.
    """

    def __init__(self, blocks: Iterable[int]) -> None:
        self.blocks = sorted(set(blocks))

    def requires(self, graph_module: GraphModule) -> None:
        super().requires(graph_module)
        if not self.blocks:
            return  # nothing to remove: no need to discover anything
        count, removed = len(self.record_input(graph_module).blocks), self.blocks
        if removed[0] < 0 or removed[-1] >= count:
            raise FxflattenError(f"cannot remove blocks {removed}: the model's blocks are 0..{count - 1}; give indices in that range")
        if len(removed) == count:
            raise FxflattenError(f"cannot remove all {count} blocks of the model; keep at least one")

    def call(self, graph_module: GraphModule) -> PassResult:
        if not self.blocks:
            return PassResult(graph_module, False)
        block_map = self.blocks_of(graph_module)
        gm = editable_copy(graph_module)
        nodes = {node.name: node for node in gm.graph.nodes}
        boundaries = block_boundaries(gm, block_map)
        for index in reversed(self.blocks):
            nodes[boundaries[index + 1]].replace_all_uses_with(nodes[boundaries[index]])
        return PassResult(finish(gm), True)

    def ensures(self, graph_module: GraphModule) -> None:
        super().ensures(graph_module)
        if not self.blocks:
            return
        before, after = len(self.input_blocks().blocks), len(self.blocks_of(graph_module).blocks)
        if after != before - len(self.blocks):
            raise contract_error(
                "RemoveBlocksPass", f"removing blocks {self.blocks} leaves {before - len(self.blocks)} "
                f"of {before} blocks", f"{after} blocks",
            )
