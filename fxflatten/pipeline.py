"""The public pipeline: flatten (select -> flatten -> fold norms -> fuse) and compress (-> prune)."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from fxflatten.errors import FxflattenError
from fxflatten.graph.capture import capture
from fxflatten.graph.discovery import discover_blocks
from fxflatten.passes.base import run_passes
from fxflatten.passes.flatten import FlattenPass
from fxflatten.passes.fold_norms import FoldNormsPass
from fxflatten.passes.fuse import FusePass
from fxflatten.passes.prune import PrunePass, PruneReport
from fxflatten.plans import BlockPlan, PruneConfig, check_compressible, check_flatten_share, plan_blocks, split_plans
from fxflatten.run.profiler import Profiler
from fxflatten.selection import Selection, select_groups

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
            profiler: Profiler | None = None) -> FlattenResult:
    """Flatten groups of adjacent blocks into parallel form, fold their norms and widen them.

    Give ``groups`` (lists of adjacent block indices) or ``ratio`` and ``calib`` (token windows,
    shape (n, seq_len)) to choose them by hidden-state similarity (enough groups to remove
    ``ratio`` once each is pruned back to ``width`` blocks). The result is exact to the
    parallel form; it is wider, not smaller (pruning back is the next step). ``profiler``, if
    given, records the time and peak memory of each step (select, flatten).
    """
    profiler = profiler or Profiler()
    graph = as_graph(model_or_graph)
    selection = None
    if groups is None:
        if ratio is None or calib is None:
            raise FxflattenError("give either groups, or a ratio and calibration windows to choose them")
        with profiler("select"):
            selection = select_groups(graph, calib, ratio, max_group=max_group, progress=progress, by=select, width=width)
        groups = selection.groups
    with profiler("flatten"):
        folded = run_passes(graph, [FlattenPass(groups), FoldNormsPass(parallel_only=True)])
        # Fusing may free the folded weights as it goes only if the passes above made a graph
        # of their own; with nothing to flatten or fold they return the caller's.
        fuse = FusePass(consume=folded is not graph)
        result = run_passes(folded, [fuse])
        # Fused in place, the folded graph still holds every widened weight, and being a
        # reference cycle it outlives this function until the cycle collector runs: the
        # prune pass could then free no widened block it prunes.
        del folded
        gc.collect()
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


def compress(model_or_graph: nn.Module | GraphModule, ratio: float | None = None, calib: torch.Tensor | None = None, *,
             groups: list[list[int]] | None = None, config: PruneConfig = PruneConfig(), width: float = 1.0,
             max_group: int | None = None, select: str = "cosine", flatten_share: float | None = None,
             progress: bool = False, profiler: Profiler | None = None) -> CompressResult:
    """Select groups, flatten, fold, fuse, and prune each group back to ``width`` x one block.

    ``width=1.0`` gives a standard model with fewer layers (the paper). Calibration windows
    ``calib`` (n, seq_len) drive both the selection and the pruning statistics. With
    ``flatten_share`` (a share of all parameters, at most ``ratio``) flattening removes only
    that much, and the rest of ``ratio`` is width-pruned evenly from the blocks outside the
    groups (0: width pruning alone); its blocks then differ in width, so the result is not a
    standard checkpoint. ``profiler``, if given, records the time and peak memory of each step
    (select, flatten, prune).
    """
    if calib is None:
        raise FxflattenError("compress needs calibration windows")
    check_flatten_share(flatten_share, ratio)
    profiler = profiler or Profiler()
    dense = as_graph(model_or_graph)
    dense_map = discover_blocks(dense)
    check_compressible(dense_map)
    share = ratio if flatten_share is None else flatten_share
    if share == 0 and groups is None:
        groups = []
    if groups == []:
        # Nothing to flatten: no flatten step (its passes would change nothing but cost time),
        # and the pass prunes a copy of the dense graph, never the caller's.
        flat, consume = FlattenResult(dense, []), False
    else:
        flat = flatten(dense, groups, share, calib, max_group=max_group, select=select, width=width,
                       progress=progress, profiler=profiler)
        consume = True  # the widened graph is compress's own
    if flatten_share is None:
        plans = plan_blocks(dense_map, flat.groups, width)
    else:
        plans = split_plans(dense_map, flat.groups, ratio, width)
    prune = PrunePass(calib, plans, config, reference=dense, progress=progress, consume=consume)
    with profiler("prune"):
        graph = prune(flat.graph).graph_module
    return CompressResult(graph, flat.groups, flat.selection, plans, prune.report, flat.unfused)
