"""Run a captured graph one block at a time over calibration windows.

Statistics for block k must come from activations that flowed through blocks 0..k-1 (already
compressed, when compressing), and only one block's inputs should be in memory at a time. The
graph is cut into segments: a prologue (embedding, masks, rotary tables: everything that does
not depend on a block), one segment per block (the nodes between the stream value entering it
and the stream value leaving it), and an epilogue (final norm, head). Segments run node by node
over every calibration batch; between segments only the values later segments read survive.
A pass over a whole model can keep even the stream on disk between blocks
(:class:`fxflatten.run.spill.SpilledStream`), and the weights of a streamed graph are read once
per segment, not once per batch (:class:`ResidentWeights`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import networkx as nx
import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from fxflatten.graph.discovery import block_boundaries
from fxflatten.graph.fx import to_digraph
from fxflatten.graph.layout import Block, BlockMap
from fxflatten.graph.params import get_tensor
from fxflatten.weights import StreamedTensor

#: Called with (node, value) for watched nodes as a segment runs.
Observer = Callable[[Node, torch.Tensor], None]


@dataclass
class Segment:
    """A run of graph nodes: the prologue, one block, or the epilogue."""

    name: str
    nodes: list[Node]
    block: Block | None = None


def segments(gm: GraphModule, block_map: BlockMap) -> list[Segment]:
    """Cut the graph into prologue, one segment per block, and epilogue."""
    dag = to_digraph(gm)
    nodes = {node.name: node for node in gm.graph.nodes}
    order = {node.name: index for index, node in enumerate(gm.graph.nodes)}
    boundaries = block_boundaries(gm, block_map)
    entry = boundaries[0]
    assigned: set[str] = set()
    result = []
    for block, (start, end) in zip(block_map.blocks, zip(boundaries, boundaries[1:])):
        inside = (nx.descendants(dag, start) & (nx.ancestors(dag, end) | {end})) - assigned
        inside = {name for name in inside if nodes[name].op == "call_function"}
        assigned |= inside
        result.append(Segment(f"block {block.index}", sorted((nodes[n] for n in inside), key=lambda n: order[n.name]), block))
    after = nx.descendants(dag, boundaries[-1]) - assigned
    epilogue = [node for node in gm.graph.nodes if node.name in after and node.op == "call_function"]
    # Nodes that depend on the stream but feed nothing (export's dtype assertions) are skipped.
    downstream = nx.descendants(dag, entry)
    prologue = [
        node for node in gm.graph.nodes
        if node.op in ("placeholder", "call_function") and node.name not in downstream
    ]
    return [Segment("prologue", prologue)] + result + [Segment("epilogue", epilogue)]


class SegmentRunner:
    """Runs segments over a list of batches, keeping only values that later segments need."""

    def __init__(self, gm: GraphModule, parts: list[Segment]) -> None:
        self.gm = gm
        self.parts = parts
        self.output = next(node for node in gm.graph.nodes if node.op == "output")
        # For every node, the index of the last segment that reads it.
        position = {node.name: i for i, part in enumerate(parts) for node in part.nodes}
        self.last_use: dict[str, int] = {}
        for i, part in enumerate(parts):
            for node in part.nodes:
                for source in node.all_input_nodes:
                    self.last_use[source.name] = max(self.last_use.get(source.name, -1), i)
        for source in self.output.all_input_nodes:
            self.last_use[source.name] = len(parts)
        self.position = position
        self.weights = ResidentWeights(max((streamed_bytes(gm, part.nodes) for part in parts), default=0))

    def start(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, object]]:
        """One environment per batch holding the graph's inputs."""
        placeholders = [node for node in self.gm.graph.nodes if node.op == "placeholder"]
        return [{node.name: value for node, value in zip(placeholders, batch)} for batch in batches]

    def prologue(self, batches: list[tuple[torch.Tensor, torch.Tensor]],
                 each: Callable[[int, dict[str, object]], None] | None = None) -> list[dict[str, object]]:
        """:meth:`start`, then the prologue on every batch, with its token-independent values shared.

        Masks of full windows and rotary tables come out the same for every batch; keeping one
        copy instead of one per batch saves that memory on every batch but the first, twice over
        when a reference graph runs alongside.
        ``each(index, env)``, if given, is called as soon as a batch's prologue has run, so it
        can move that batch's stream out of memory before the next batch makes its own.
        """
        envs = self.start(batches)
        for index, env in enumerate(envs):
            self.run(0, [env])
            share_equal_values(envs[0], env)
            if each is not None:
                each(index, env)
        return envs

    def run(self, index: int, envs: list[dict[str, object]], watch: dict[str, Observer] | None = None) -> None:
        """Run segment ``index`` on every batch's environment, then drop dead values."""
        part = self.parts[index]
        for env in envs:
            self.run_nodes(part.nodes, env, watch or {})
            self.drop(index, env)

    def drop(self, index: int, env: dict[str, object]) -> None:
        """Forget the values no segment after ``index`` reads."""
        for name in [name for name in env if self.last_use.get(name, -1) <= index and name in self.position]:
            del env[name]

    def run_nodes(self, nodes: list[Node], env: dict[str, object], watch: dict[str, Observer]) -> None:
        """Run ``nodes`` in order, freeing each value they produce once nothing else reads it.

        A value read only by later nodes of the same list is dropped after its last reader,
        so one batch's intermediates, not every batch's, are alive at a time; values read
        outside the list (the stream, later blocks) stay.
        """
        def value(arg: Node) -> object:
            if arg.op == "get_attr":
                return self.weights.get(arg.target, get_tensor(self.gm, arg.target))
            return env[arg.name]

        members = {node.name for node in nodes}
        last_reader: dict[str, int] = {}
        for position, node in enumerate(nodes):
            for source in node.all_input_nodes:
                last_reader[source.name] = position
        freed_after: dict[int, list[str]] = {}
        for position, node in enumerate(nodes):
            # Readers in no segment (export's dtype assertions) never run: they keep nothing alive.
            if node.users and all(user.name in members or user.name not in self.position for user in node.users):
                freed_after.setdefault(last_reader.get(node.name, position), []).append(node.name)
        for position, node in enumerate(nodes):
            if node.op == "placeholder":
                continue
            args = map_arg(node.args, value)
            kwargs = map_arg(node.kwargs, value)
            result = env[node.name] = node.target(*args, **kwargs)
            del args, kwargs  # or they keep this node's inputs alive while the next node runs
            for name in freed_after.get(position, ()):
                env.pop(name, None)
            # Observers run once the node's inputs are freed: a statistic's temporaries then
            # take their place (the widened MLP's gate and up activations).
            if node.name in watch:
                watch[node.name](node, result)
            del result

    def outputs(self, envs: list[dict[str, object]]) -> Iterator[object]:
        """The graph's output for each batch, once the epilogue has run."""
        for env in envs:
            yield map_arg(self.output.args[0], lambda arg: env[arg.name])


class ResidentWeights:
    """The streamed weights read most recently, kept while they fit in ``budget`` bytes.

    A segment runs batch after batch, and a streamed weight would otherwise be read from disk
    for every batch. The budget is the largest segment's streamed weights: a block's weights
    stay while its batches run, and give way to the next block's. A weight a pass has replaced
    since is a different tensor, and is read anew.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.size = 0

    def get(self, target: str, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, StreamedTensor):
            return tensor
        held = self.held.get(target)
        if held is not None and held[0] is tensor:
            self.held.move_to_end(target)
            return held[1]
        if held is not None:
            self._forget(target)
        value = tensor.materialize()
        nbytes = value.untyped_storage().nbytes()
        while self.held and self.size + nbytes > self.budget:
            self._forget(next(iter(self.held)))
        if nbytes <= self.budget:
            self.held[target] = (tensor, value)
            self.size += nbytes
        return value

    def clear(self) -> None:
        """Forget every weight held: a pass calls this before it solves, when its runs are done."""
        self.held.clear()
        self.size = 0

    def _forget(self, target: str) -> None:
        _, value = self.held.pop(target)
        self.size -= value.untyped_storage().nbytes()


def streamed_bytes(gm: GraphModule, nodes: list[Node]) -> int:
    """Bytes of the streamed weights ``nodes`` read."""
    targets = {arg.target for node in nodes for arg in node.all_input_nodes if arg.op == "get_attr"}
    tensors = [get_tensor(gm, target) for target in targets]
    return sum(t.numel() * t.dtype.itemsize for t in tensors if isinstance(t, StreamedTensor))


def share_equal_values(first: dict[str, object], env: dict[str, object]) -> None:
    """Make ``env`` hold ``first``'s tensor wherever it holds an equal one."""
    for name, value in env.items():
        other = first.get(name)
        if (isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value is not other
                and value.shape == other.shape and value.dtype == other.dtype and torch.equal(value, other)):
            env[name] = other


def batches_of(windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token windows as (input_ids, attention_mask) batches."""
    return [(chunk, torch.ones_like(chunk)) for chunk in windows.split(batch_size)]
