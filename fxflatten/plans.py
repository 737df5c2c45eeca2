"""What each block of a compressed model is pruned to, and how: the plans and the configuration
the prune pass follows.

Flattened groups are pruned back to ``width`` x one original block (the paper). A parameter
budget larger than flattening takes can also be met by width-pruning the blocks outside the
groups (``--flatten-share``; the study is in benchmarks/results/split.md). These are plain data
and arithmetic on a block map, so selection, the pipeline and the prune pass all read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fxflatten.errors import FxflattenError
from fxflatten.graph.layout import BlockMap


@dataclass(frozen=True)
class PruneConfig:
    """How to prune; the defaults are the best measured on the default model
    (benchmarks/results/prune_ablation.md)."""

    target: Literal["widened", "serial", "trajectory"] = "trajectory"
    head_score: Literal["energy", "error"] = "error"
    channel_score: Literal["leverage", "error"] = "leverage"
    refit_attention: bool = True
    refit_mlp: bool = True
    leverage_ridge: float = 10.0  # lam = this x mean eigenvalue, for MLP channel scores
    fit_ridge: float = 1e-3  # lam = this x mean diagonal, for the least-squares refits
    refit_inputs: bool = True  # refit q/k/v and gate/up toward the target's inputs (needs a reference)
    batch_size: int = 2  # windows per batch: one batch's widened-MLP intermediates sit beside its statistics


@dataclass(frozen=True)
class BlockPlan:
    """What block ``index`` of the graph is pruned to, and which original blocks it came from."""

    kv_heads: int | None  # None: leave the attention as it is
    width: int | None  # None: leave the MLP as it is
    origin: tuple[int, ...] = ()  # reference-graph blocks it replaces, for target="serial"


def group_removes(parameters: list[int], width: float = 1.0) -> int:
    """Parameters a group of blocks removes once pruned back to ``width`` x its mean block."""
    return sum(parameters) - int(width * sum(parameters) / len(parameters))


def check_flatten_share(share: float | None, ratio: float | None) -> None:
    """Refuse a flattened share outside [0, ratio] (it is the part of the ratio flattening takes)."""
    if share is not None and (ratio is None or not 0 <= share <= ratio):
        raise FxflattenError(
            f"--flatten-share must be in [0, --ratio {ratio}], got {share}: the flattened share is part of the ratio")


def check_compressible(block_map: BlockMap) -> None:
    """Refuse, before any work, a model whose blocks the prune pass cannot take apart.

    Merged layers are pruned back as one fused branch per stage, which needs each branch's output
    to reach the residual add straight from its output projection; and every pruned block needs
    its attention taken apart into q/k/v/o to count and drop KV groups.
    """
    for block in block_map.blocks:
        branches = block.attention + block.mlp
        if any(branch.post_norm for branch in branches):
            raise FxflattenError(
                f"block {block.index} normalises each branch's output before adding it to the residual stream "
                "(a sandwich norm, as Gemma 2 and 3 do), so merged layers cannot be fused into one exactly and "
                "FlattenGPT cannot compress this model; models whose branches add straight into the stream "
                "(Llama, Mistral, Qwen2, Phi-3, GPT-2) work")
        if any(branch.attention is None for branch in block.attention):
            raise FxflattenError(
                f"block {block.index}'s attention could not be taken apart into q/k/v/o projections (run "
                "`fxflatten inspect` to see what was found), so its heads cannot be pruned; this model is not supported")


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
