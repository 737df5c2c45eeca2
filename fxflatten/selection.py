"""Choose which adjacent blocks to flatten (FlattenGPT step 1).

Hidden states entering adjacent layers are very similar in deep layers, so those layers are
the cheapest to run in parallel. On calibration text we measure the mean cosine similarity
between the hidden states entering every pair of layers (a token sample is enough), then merge
greedily: the adjacent pair of units with the highest similarity becomes one group. A group
counts as one unit whose similarity to a neighbour is taken between its first layer's input
and the neighbour's far end (so merging [a..b] with [b+1..c] scores cos(x_a, x_c)). Merging
stops once the parameters removed, when every group is pruned back to one block's width, reach
the target share of all parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.fx import GraphModule
from tqdm.auto import tqdm

from fxflatten.device import device_of
from fxflatten.errors import FxflattenError, check_finite
from fxflatten.graph.discovery import block_boundaries, discover_blocks
from fxflatten.graph.layout import BlockMap
from fxflatten.passes.flatten import FlattenPass
from fxflatten.plans import group_removes
from fxflatten.run.runner import SegmentRunner, batches_of, segments
from fxflatten.tables import format_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """The chosen groups (block indices), the similarity matrix they came from, and the ratio."""

    groups: list[list[int]]
    similarity: torch.Tensor  # [i, j]: mean cosine of the hidden states entering layers i and j
    removed_parameters: int
    total_parameters: int

    @property
    def ratio(self) -> float:
        return self.removed_parameters / self.total_parameters

    def table(self) -> str:
        """Adjacent-layer similarities, with the group each layer ends up in."""
        group_of = {index: tuple(group) for group in self.groups for index in group}
        rows = []
        for i in range(self.similarity.shape[0] - 1):
            group = group_of.get(i)
            rows.append([i, float(self.similarity[i, i + 1]), "-".join(map(str, group)) if group and len(group) > 1 else ""])
        return format_table(["block", "cos(in, next in)", "group"], rows)


@torch.no_grad()
def hidden_similarity(gm: GraphModule, windows: torch.Tensor, block_map: BlockMap | None = None,
                      batch_size: int = 1, max_tokens: int = 8192, progress: bool = False) -> torch.Tensor:
    """Mean cosine similarity between the hidden states entering each pair of layers.

    Entry ``[i, j]`` compares the stream entering block i with the stream entering block j
    (index L is the stream leaving the last block), averaged over at most ``max_tokens``
    calibration tokens: all tokens of evenly spaced windows, so the cost is a fraction of one
    forward pass. Each batch runs through every block before the next starts and leaves only
    its contribution to the sums behind, so one batch's states are in memory at a time: the
    stream at every depth (blocks x tokens x hidden x 4 bytes per batch), hence one window per
    batch by default.
    """
    block_map = block_map or discover_blocks(gm)
    parts = segments(gm, block_map)
    runner = SegmentRunner(gm, parts)
    count = min(len(windows), -(-max_tokens // windows.shape[1]))
    windows = windows[torch.linspace(0, len(windows) - 1, count).round().long()]
    boundaries = block_boundaries(gm, block_map)
    total = torch.zeros(len(boundaries), len(boundaries), dtype=torch.float64, device=device_of(gm))
    tokens = 0
    for env in tqdm(runner.start(batches_of(windows, batch_size)), desc="similarity", disable=not progress, leave=False):
        states = None  # row i: the batch's unit-normalised stream entering block i, flattened
        for index, name in enumerate(boundaries):
            runner.run_nodes(runner.parts[index].nodes, env, {})
            runner.drop(index, env)
            state = env[name].flatten(0, -2).float()
            check_finite(state, f"the output of block {index - 1}" if index else "the embedded input")
            if states is None:
                states = state.new_empty(len(boundaries), state.shape[0], state.shape[1])
            torch.nn.functional.normalize(state, dim=-1, out=states[index])
        flat = states.flatten(1)
        total += (flat @ flat.T).double()
        tokens += states.shape[1]
    return (total / tokens).float().cpu()


@torch.no_grad()
def parallel_error(gm: GraphModule, windows: torch.Tensor, block_map: BlockMap | None = None,
                   batch_size: int = 4, progress: bool = False) -> torch.Tensor:
    """Measured error of flattening each adjacent pair, on the dense model's own inputs.

    Entry i is ``|y_par - y_ser|^2 / |y_ser - x|^2`` summed over calibration tokens: x the stream
    entering block i in the dense model, y_ser the stream leaving block i+1, y_par what the
    parallel form of blocks i, i+1 makes of x. Two flattened graphs (pairs starting at even and
    at odd blocks) give every pair; each of their units is fed the dense stream, so the errors
    do not depend on one another.
    """
    block_map = block_map or discover_blocks(gm)
    count = len(block_map.blocks)
    batches = batches_of(windows, batch_size)
    dense_parts = segments(gm, block_map)
    dense = SegmentRunner(gm, dense_parts)
    dense_envs = dense.start(batches)
    boundaries = block_boundaries(gm, block_map)
    streams = []  # streams[k][b]: dense stream entering block k, batch b
    for index in range(len(dense_parts) - 1):
        dense.run(index, dense_envs)
        streams.append([env[boundaries[index]] for env in dense_envs])
    errors = torch.full((count - 1,), float("inf"))
    for parity in tqdm((0, 1), desc="pair errors", disable=not progress, leave=False):
        pairs = [[i, i + 1] for i in range(parity, count - 1, 2)]
        flat = FlattenPass(pairs)(gm).graph_module
        flat_map = discover_blocks(flat)
        parts = segments(flat, flat_map)
        runner = SegmentRunner(flat, parts)
        envs = runner.prologue(batches)
        flat_boundaries = block_boundaries(flat, flat_map)
        first = 0
        for unit, block in enumerate(flat_map.blocks):
            size = block.parallel
            residual = change = 0.0
            for b, env in enumerate(envs):
                env[flat_boundaries[unit]] = streams[first][b]
                runner.run_nodes(parts[unit + 1].nodes, env, {})
                out = env[flat_boundaries[unit + 1]]
                target = streams[first + size][b]
                residual += float((out - target).double().pow(2).sum())
                change += float((target - streams[first][b]).double().pow(2).sum())
                runner.drop(unit + 1, env)
            if size == 2:
                errors[first] = residual / change
            first += size
    return errors


def greedy_groups(similarity: torch.Tensor, block_parameters: list[int], total_parameters: int,
                  ratio: float, max_group: int | None = None, width: float = 1.0) -> tuple[list[list[int]], int]:
    """Merge the most similar adjacent units until ``ratio`` of all parameters would be removed.

    Each group is pruned back to ``width`` x its mean block, so a wider width needs more groups
    for the same ratio. Never removes more than asked; returns the groups and the parameters
    they remove.
    """
    units = [[i] for i in range(len(block_parameters))]
    target = ratio * total_parameters

    def removed(groups: list[list[int]]) -> int:
        # A lone block is left as it is: it removes nothing, whatever the width.
        return sum(group_removes([block_parameters[i] for i in g], width) for g in groups if len(g) > 1)

    while True:
        candidates = [
            (float(similarity[units[k][0], units[k + 1][-1]]), k) for k in range(len(units) - 1)
            if max_group is None or len(units[k]) + len(units[k + 1]) <= max_group
        ]
        if not candidates:
            break
        _, k = max(candidates)
        merged = units[:k] + [units[k] + units[k + 1]] + units[k + 2:]
        if removed(merged) > target:
            break
        units = merged
    groups = [unit for unit in units if len(unit) > 1]
    return groups, removed(groups)


def check_ratio(ratio: float) -> None:
    """Refuse a ratio outside (0, 0.9] before anything is loaded: removing more than 90% of the
    parameters leaves no model worth having, and a bad ratio should not cost a long load first."""
    if not 0 < ratio <= 0.9:
        raise FxflattenError(f"--ratio must be in (0, 0.9], got {ratio}")


def check_ratio_removes_a_block(ratio: float, block_parameters: list[int], total_parameters: int,
                                width: float = 1.0) -> None:
    """Refuse a ratio below what the cheapest adjacent pair removes, before calibration runs.

    Merging blocks i and i+1 removes their parameters less ``width`` (mean-sized) blocks; a
    ratio below the smallest such amount can never choose a group.
    """
    if not 0 < width < 2:
        raise FxflattenError(f"--width must be in (0, 2): a merged pair pruned to {width} blocks removes nothing")
    pairs = [group_removes([a, b], width) for a, b in zip(block_parameters, block_parameters[1:])]
    if not pairs:
        raise FxflattenError("the model has a single block; there are no adjacent blocks to flatten")
    if ratio * total_parameters < min(pairs):
        raise FxflattenError(
            f"--ratio {ratio} is too small to remove one block; merging the cheapest adjacent pair "
            f"removes {min(pairs) / total_parameters:.3f} of the model, so ask for at least that"
        )


def select_groups(gm: GraphModule, windows: torch.Tensor, ratio: float, block_map: BlockMap | None = None,
                  max_group: int | None = None, batch_size: int = 1, progress: bool = False,
                  by: str = "cosine", width: float = 1.0) -> Selection:
    """Choose groups removing ``ratio`` of parameters, measured on calibration ``windows``.

    ``by="cosine"`` (the paper) merges by hidden-state similarity; ``by="error"`` flattens
    pairs only, the ones whose parallel form deviates least from the serial blocks
    (:func:`parallel_error`). ``width`` is what each group is pruned back to, in blocks.
    """
    check_ratio(ratio)
    block_map = block_map or discover_blocks(gm)
    block_parameters = [block.parameters for block in block_map.blocks]
    check_ratio_removes_a_block(ratio, block_parameters, block_map.total_parameters, width)
    similarity = hidden_similarity(gm, windows, block_map, batch_size=batch_size, progress=progress)
    scores = similarity
    if by == "error":
        errors = parallel_error(gm, windows, block_map, batch_size, progress)
        scores = torch.full_like(similarity, -float("inf"))
        scores[torch.arange(len(errors)), torch.arange(1, len(errors) + 1)] = -errors
        max_group = 2
    elif by != "cosine":
        raise FxflattenError(f"unknown selection {by!r}; use 'cosine' or 'error'")
    groups, removed = greedy_groups(scores, block_parameters, block_map.total_parameters, ratio, max_group, width)
    if not groups:
        smallest = min(block_parameters) / block_map.total_parameters
        raise FxflattenError(f"--ratio {ratio} is too small to remove one block; the smallest block is {smallest:.3f} of the model")
    log.info("chose groups %s removing %.3f of parameters", groups, removed / block_map.total_parameters)
    return Selection(groups, similarity, removed, block_map.total_parameters)
