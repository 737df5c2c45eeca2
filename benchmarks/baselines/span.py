"""A contiguous span of blocks to remove, and the activations at its two ends.

ReplaceMe and LinearPatch both remove the n contiguous blocks whose input and output hidden
states are closest in angle, then bridge the gap with one linear map fitted on calibration
activations. This module finds that span and gathers what both fits read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from fxflatten.graph.discovery import block_boundaries, discover_blocks
from fxflatten.graph.fx import resolve_identity
from fxflatten.run.runner import SegmentRunner, batches_of, segments


def closest_span(similarity: torch.Tensor, count: int) -> int:
    """First block of the ``count`` contiguous blocks whose ends are closest in angle.

    ``similarity[i, j]`` is the mean cosine between the streams entering blocks i and j
    (:func:`fxflatten.selection.hidden_similarity`); the angular distance of span [i, i+count)
    is ``arccos(similarity[i, i+count]) / pi``. The span starts at block 1 or later, so a block
    before it is there to take the linear map.
    """
    starts = range(1, similarity.shape[0] - count)
    return min(starts, key=lambda i: math.acos(min(1.0, float(similarity[i, i + count]))))


@dataclass
class SpanActivations:
    """Calibration activations around the span [start, start + count), one row per token."""

    mlp_out: torch.Tensor  # M: the MLP output of the block before the span
    mlp_residual: torch.Tensor  # Y: the stream that MLP output is added to
    stream_after: torch.Tensor  # L: the stream leaving the span

    @property
    def stream_before(self) -> torch.Tensor:
        """The stream entering the span: M + Y."""
        return self.mlp_out + self.mlp_residual


@torch.no_grad()
def span_activations(graph: GraphModule, windows: torch.Tensor, start: int, count: int) -> SpanActivations:
    """Run ``graph`` block by block up to the end of the span on every calibration window."""
    block_map = discover_blocks(graph)
    runner = SegmentRunner(graph, segments(graph, block_map))
    boundaries = block_boundaries(graph, block_map)
    mlp = block_map.blocks[start - 1].mlp[0]
    nodes = {node.name: node for node in graph.graph.nodes}
    residual = resolve_identity(nodes[mlp.stream_in]).name
    taken: dict[str, list[torch.Tensor]] = {"mlp": [], "residual": [], "after": []}
    watch = {mlp.output: lambda node, value: taken["mlp"].append(value.flatten(0, -2).float()),
             residual: lambda node, value: taken["residual"].append(value.flatten(0, -2).float())}
    for env in runner.start(batches_of(windows, 1)):
        for index in range(start + count + 1):
            runner.run_nodes(runner.parts[index].nodes, env, watch if index == start else {})
            runner.drop(index, env)
        taken["after"].append(env[boundaries[start + count]].flatten(0, -2).float())
    return SpanActivations(torch.cat(taken["mlp"]), torch.cat(taken["residual"]), torch.cat(taken["after"]))
