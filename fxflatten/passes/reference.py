"""The original graph, run beside the one being pruned, to give the refit targets.

Pruning refits each compressed block toward what the original model computes: either the
original blocks run in series on the compressed block's own input (``serial``), or the original
model on its own stream at that depth (``trajectory``), which also pulls back the error left
by the compressed blocks that feed it. Its streams and targets are spilled to disk, one batch in
memory at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.fx import GraphModule

from fxflatten.errors import FxflattenError
from fxflatten.graph.discovery import block_boundaries, discover_blocks
from fxflatten.run.runner import SegmentRunner, segments
from fxflatten.run.spill import Spill


class Reference:
    """The original graph, run alongside the compressed one to give refit targets.

    For a block that replaces original blocks a..b, the original blocks a..b run in series on
    the input the compressed block receives; the sum of their attention outputs and the stream
    they leave are the targets. With ``trajectory`` the original model instead runs on its own
    stream, so the targets are what the original model computes at that depth, and a refit
    also pulls back the error left by the compressed blocks that feed it. It keeps its own
    per-batch environments with the side inputs (masks, rotary tables) its prologue computed;
    its stream and the targets live in ``spill``, on disk, one batch in memory at a time.
    """

    def __init__(self, graph: GraphModule, batches: list[tuple[torch.Tensor, torch.Tensor]], spill: Spill,
                 trajectory: bool = False) -> None:
        self.map = discover_blocks(graph)
        self.parts = segments(graph, self.map)
        self.runner = SegmentRunner(graph, self.parts)
        self.boundaries = block_boundaries(graph, self.map)
        self.spill = spill
        # The stream entering block 0 goes to disk as each batch's prologue makes it: the first
        # run usually seeds the trajectory from the compressed stream instead, or (serial) never
        # reads it.
        self.envs = self.runner.prologue(
            batches, each=lambda index, env: self.spill.put(f"stream-{index}", env.pop(self.boundaries[0])))
        self.side = [set(env) for env in self.envs]
        self.trajectory = trajectory
        self.next_block = 0

    def target(self, index: int, key: str) -> torch.Tensor:
        """Batch ``index``'s target from the last :meth:`run`: ``"attention"``, ``"stream"``, or
        (after a run with ``inputs``) ``"attention-in-j"`` / ``"mlp-in-j"``, the streams entering
        the attention and the MLP of the j-th block of the origin."""
        return self.spill.get(f"{key}-{index}")

    def run(self, origin: tuple[int, ...], streams: Sequence[torch.Tensor], pristine: bool = False,
            inputs: bool = False) -> None:
        """Run original blocks ``origin`` in series on each batch's stream ``streams``.

        ``pristine`` says every block ahead of ``origin`` is unchanged, so ``streams`` is also
        the original model's own stream there: a trajectory starts from it instead of running
        the original blocks ahead of it a second time. ``inputs`` also spills the streams
        entering each origin block's attention and MLP, for input refits.
        """
        if self.trajectory:
            seed = None
            if pristine and self.next_block == 0:
                seed = streams
                self.next_block = origin[0]
            self.advance(origin, seed, inputs)
        else:
            for index, (stream, env, side) in enumerate(zip(streams, self.envs, self.side)):
                env[self.boundaries[origin[0]]] = stream
                self.run_blocks(index, env, range(origin[0], origin[-1] + 1), origin, inputs)
                for name in list(env):
                    if name not in side:
                        del env[name]
        self.runner.weights.clear()  # streamed weights held for these runs give way to the solve

    def advance(self, origin: tuple[int, ...], seed: Sequence[torch.Tensor] | None = None, inputs: bool = False) -> None:
        """Run the original model on its own stream (or ``seed``) up to the end of ``origin``."""
        if origin[0] < self.next_block:
            raise FxflattenError("trajectory targets need the blocks in order")
        for index, env in enumerate(self.envs):
            env[self.boundaries[self.next_block]] = self.target(index, "stream") if seed is None else seed[index]
            self.run_blocks(index, env, range(self.next_block, origin[-1] + 1), origin, inputs)
        self.next_block = origin[-1] + 1

    def run_blocks(self, index: int, env: dict[str, object], blocks: range, origin: tuple[int, ...],
                   inputs: bool = False) -> None:
        """Run ``blocks`` on batch ``index``; spill the stream they leave and ``origin``'s attention."""
        watch_names = {branch.output for block in origin for branch in self.map.blocks[block].attention}
        attention = []
        watch = {name: lambda node, value: attention.append(value) for name in watch_names}
        for block in blocks:
            if inputs and block in origin:
                position = origin.index(block)
                self.spill.put(f"attention-in-{position}-{index}", env[self.boundaries[block]])
                mlp_in = self.map.blocks[block].mlp[0].stream_in
                watch[mlp_in] = lambda node, value, position=position: self.spill.put(f"mlp-in-{position}-{index}", value)
            self.runner.run_nodes(self.parts[block + 1].nodes, env, watch if block in origin else {})
            self.runner.drop(block + 1, env)
        self.spill.put(f"attention-{index}", sum(attention))
        self.spill.put(f"stream-{index}", env.pop(self.boundaries[blocks[-1] + 1]))
