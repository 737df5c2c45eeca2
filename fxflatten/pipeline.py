"""The public pipeline: flatten (select -> flatten -> fold norms -> fuse) and compress (-> prune)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from fxflatten.capture import capture
from fxflatten.errors import FxflattenError
from fxflatten.passes.base import run_passes
from fxflatten.passes.flatten import FlattenPass
from fxflatten.passes.fold_norms import FoldNormsPass
from fxflatten.passes.fuse import FusePass
from fxflatten.passes.prune import BlockPlan, PruneConfig, PrunePass, PruneReport
from fxflatten.graph import discover_blocks
from fxflatten.layout import BlockMap
from fxflatten.select import Selection, select_groups
from fxflatten.stages import Stages

log = logging.getLogger(__name__)


@dataclass
class FlattenResult:
    """A flattened and widened graph, the groups it flattened, and blocks left parallel (why)."""

    graph: GraphModule
    groups: list[list[int]]
    selection: Selection | None = None
    unfused: dict[int, str] = field(default_factory=dict)


def as_graph(model_or_graph: nn.Module | GraphModule) -> GraphModule:
    return model_or_graph if isinstance(model_or_graph, GraphModule) else capture(model_or_graph)


def flatten(model_or_graph: nn.Module | GraphModule, groups: list[list[int]] | None = None,
            ratio: float | None = None, calib: torch.Tensor | None = None, *,
            max_group: int | None = None, select: str = "cosine", width: float = 1.0, progress: bool = False,
            stages: Stages | None = None) -> FlattenResult:
    """Flatten groups of adjacent blocks into parallel form, fold their norms and widen them.

    Give ``groups`` (lists of adjacent block indices) or ``ratio`` and ``calib`` (token windows,
    shape (n, seq_len)) to choose them by hidden-state similarity (enough groups to remove
    ``ratio`` once each is pruned back to ``width`` blocks). The result is exact to the
    parallel form; it is wider, not smaller (pruning back is the next step). ``stages``, if
    given, records the time and peak memory of each step (select, flatten).
    """
    stages = stages or Stages()
    graph = as_graph(model_or_graph)
    selection = None
    if groups is None:
        if ratio is None or calib is None:
            raise FxflattenError("give either groups, or a ratio and calibration windows to choose them")
        with stages("select"):
            selection = select_groups(graph, calib, ratio, max_group=max_group, progress=progress, by=select, width=width)
        groups = selection.groups
    fuse = FusePass()
    with stages("flatten"):
        result = run_passes(graph, [FlattenPass(groups), FoldNormsPass(parallel_only=True), fuse])
    return FlattenResult(result, [list(g) for g in groups], selection, dict(fuse.skipped))


@dataclass
class CompressResult:
    """A compressed graph: groups flattened, widened and pruned back to the planned width."""

    graph: GraphModule
    groups: list[list[int]]
    selection: Selection | None
    plans: list[BlockPlan]
    prune: PruneReport
    unfused: dict[int, str] = field(default_factory=dict)


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


def compress(model_or_graph: nn.Module | GraphModule, ratio: float | None = None, calib: torch.Tensor | None = None, *,
             groups: list[list[int]] | None = None, config: PruneConfig = PruneConfig(), width: float = 1.0,
             max_group: int | None = None, select: str = "cosine", progress: bool = False,
             stages: Stages | None = None) -> CompressResult:
    """Select groups, flatten, fold, fuse, and prune each group back to ``width`` x one block.

    ``width=1.0`` gives a standard model with fewer layers (the paper). Calibration windows
    ``calib`` (n, seq_len) drive both the selection and the pruning statistics. ``stages``, if
    given, records the time and peak memory of each step (select, flatten, prune).
    """
    if calib is None:
        raise FxflattenError("compress needs calibration windows")
    stages = stages or Stages()
    dense = as_graph(model_or_graph)
    dense_map = discover_blocks(dense)
    flat = flatten(dense, groups, ratio, calib, max_group=max_group, select=select, width=width, progress=progress, stages=stages)
    plans = plan_blocks(dense_map, flat.groups, width)
    prune = PrunePass(calib, plans, config, reference=dense, progress=progress, consume=True)
    with stages("prune"):
        graph = prune(flat.graph).graph_module
    return CompressResult(graph, flat.groups, flat.selection, plans, prune.report, flat.unfused)
