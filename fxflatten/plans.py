"""What each block of a compressed model is pruned to: the plans the prune pass follows.

Flattened groups are pruned back to ``width`` x one original block (the paper). A parameter
budget larger than flattening takes can also be met by width-pruning the blocks outside the
groups: on the default model, flattening part of the budget and width-pruning the rest keeps
more quality at the same size than either alone (benchmarks/results/split.md).
"""

from __future__ import annotations

from fxflatten.layout import BlockMap
from fxflatten.passes.prune import BlockPlan
from fxflatten.select import group_removes


def units_of(groups: list[list[int]], num_blocks: int) -> list[tuple[int, ...]]:
    """The compressed model's blocks as tuples of original block indices, in order."""
    grouped = {index: tuple(group) for group in groups for index in group}
    units, seen = [], set()
    for index in range(num_blocks):
        unit = grouped.get(index, (index,))
        if unit not in seen:
            seen.add(unit)
            units.append(unit)
    return units


def plan_blocks(dense_map: BlockMap, groups: list[list[int]], width: float = 1.0) -> list[BlockPlan]:
    """One plan per compressed block: groups pruned back to ``width`` x one original block."""
    plans = []
    for unit in units_of(groups, len(dense_map.blocks)):
        first = dense_map.blocks[unit[0]]
        if len(unit) == 1:
            plans.append(BlockPlan(None, None, unit))
            continue
        attention, mlp = first.attention[0].attention, first.mlp[0].mlp
        kv_heads = max(1, round(width * attention.num_kv_heads)) if attention else None
        channels = max(1, round(width * mlp.width)) if mlp else None
        plans.append(BlockPlan(kv_heads, channels, unit))
    return plans


def width_plans(block_map: BlockMap, removed: float, only: set[int] | None = None) -> list[BlockPlan]:
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
        drop_channels = min(round((share - drop_groups * per_group) / per_channel), mlp.mlp.width - 1)
        plans.append(BlockPlan(kv - drop_groups, mlp.mlp.width - drop_channels, (block.index,)))
    return plans


def split_plans(dense_map: BlockMap, groups: list[list[int]], ratio: float, width: float = 1.0) -> list[BlockPlan]:
    """:func:`plan_blocks` for ``groups``, with the rest of ``ratio`` width-pruned from the other blocks."""
    plans = plan_blocks(dense_map, groups, width)
    removed = sum(group_removes([dense_map.blocks[i].parameters for i in group], width) for group in groups)
    rest = ratio * dense_map.total_parameters - removed
    singles = {plan.origin[0] for plan in plans if len(plan.origin) == 1}
    if rest <= 0 or not singles:
        return plans
    pruned = width_plans(dense_map, rest, only=singles)
    return [pruned[plan.origin[0]] if len(plan.origin) == 1 else plan for plan in plans]
