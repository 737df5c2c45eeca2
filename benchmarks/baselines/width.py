"""Width-only pruning plans for fxflatten's own prune pass: no flattening, no block removed.

Every block loses the same number of parameters (the usual width-pruning baseline), pruned in
place by ``PrunePass`` with the same head choice, channel scores and least-squares refit as
FlattenGPT's prune-back, so a comparison with FlattenGPT isolates what flattening adds.
"""

from __future__ import annotations

from fxflatten.layout import BlockMap
from fxflatten.passes.prune import BlockPlan


def uniform_plans(block_map: BlockMap, removed: int, only: set[int] | None = None) -> list[BlockPlan]:
    """Plans removing about ``removed`` parameters, spread evenly over all blocks (or ``only`` these).

    A block first loses whole KV groups in proportion to its share (rounded, never more than the
    share allows), then MLP channels for the rest of its share. Blocks outside ``only`` are left
    as they are.
    """
    plans = []
    chosen = {block.index for block in block_map.blocks} if only is None else only
    share = removed / len(chosen)
    for block in block_map.blocks:
        if block.index not in chosen:
            plans.append(BlockPlan(None, None, (block.index,)))
            continue
        attention, mlp = block.attention[0], block.mlp[0]
        kv = attention.attention.num_kv_heads
        per_group = attention.parameters / kv
        per_channel = mlp.parameters / mlp.mlp.width
        drop_groups = min(round(kv * share / block.parameters), int(share // per_group), kv - 1)
        drop_channels = round((share - drop_groups * per_group) / per_channel)
        plans.append(BlockPlan(kv - drop_groups, mlp.mlp.width - drop_channels, (block.index,)))
    return plans
