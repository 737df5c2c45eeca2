"""Prune blocks back to a target width from calibration statistics (FlattenGPT step 4).

Block by block, on calibration activations that flowed through the blocks already pruned:

- attention keeps whole KV groups (a KV head with its query heads), scored by the energy they
  send through the output projection (the paper) or chosen greedily by how well the kept
  groups reproduce the target output (``head_score="error"``); the output projection can be
  refitted over the kept heads by ridge least squares;
- the MLP keeps the channels of highest ridge leverage of its activation covariance and refits
  the down projection on them (the paper's Nystrom compensation).

The refit target is the widened block's own output (``target="widened"``, the paper), what
the original, unflattened blocks compute in series on the same input (``target="serial"``),
which also absorbs the flattening error, or (the default, ``target="trajectory"``) what the
original model computes at that depth on its own stream, which also pulls back the error the
earlier compressed blocks left.

With a serial or trajectory target the input side of a merged block is refitted too
(``refit_inputs``): in the parallel form the second block of a pair reads the stream from
before the first block instead of after it. Before each stage is pruned, each original block's
rows of q/k/v (then gate/up) are refitted by ridge least squares so that, on the compressed
stream, they compute what they compute on that block's own stream in the target; the attention
and MLP nonlinearities then see inputs closer to the original's, which no output refit can give
them. Keeping every head and channel with the widened target changes nothing. Any block can be
pruned, widened or not, so this is also a plain width-pruning pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction

import networkx as nx
import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult
from tqdm.auto import tqdm

from fxflatten.errors import FxflattenError, check_finite
from fxflatten.graph.discovery import block_boundaries, discover_blocks
from fxflatten.graph.fx import linear_input, to_digraph
from fxflatten.graph.layout import Block, Branch, Projection
from fxflatten.graph.params import set_weight, weight
from fxflatten.leastsq import add_gram, greedy_groups_by_error, group_energy, prune_by_error, ridge_leverage, ridge_solve
from fxflatten.passes.base import GraphPass, editable_copy, finish
from fxflatten.passes.reference import Reference
from fxflatten.passes.refit import Moments, accumulate, head_groups, refit_output, slice_inputs
from fxflatten.passes.rescale import rescale_constants
from fxflatten.plans import BlockPlan, PruneConfig
from fxflatten.run.runner import SegmentRunner, batches_of, segments
from fxflatten.run.spill import Spill, SpilledStream, release_free_memory

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """Per block: what was kept, and any ridge that had to grow."""

    blocks: dict[int, dict[str, object]] = field(default_factory=dict)


class PrunePass(GraphPass):
    """Prune each planned block to its target KV heads and MLP width, block by block."""

    def __init__(self, windows: torch.Tensor, plans: list[BlockPlan], config: PruneConfig = PruneConfig(),
                 reference: GraphModule | None = None, progress: bool = False, consume: bool = False) -> None:
        """``consume=True`` prunes the input graph itself instead of a copy sharing its tensors.

        For a caller that made the input and will not use it again (``compress`` and its
        widened graph): each widened block's weights are then freed as soon as the block is
        pruned, instead of all of them staying alive with the input until the pass ends
        (190 MiB on the default model at ``--ratio 0.2``).
        """
        self.consume = consume
        self.windows = windows
        self.plans = plans
        self.config = config
        self.reference = reference
        self.progress = progress
        self.report = PruneReport()

    @torch.no_grad()
    def call(self, graph_module: GraphModule) -> PassResult:
        block_map = discover_blocks(graph_module)
        if len(self.plans) != len(block_map.blocks):
            raise FxflattenError(f"{len(self.plans)} block plans for a graph of {len(block_map.blocks)} blocks")
        if self.config.target != "widened" and self.reference is None:
            raise FxflattenError(f"target={self.config.target!r} needs the reference (original) graph")
        gm = graph_module if self.consume else editable_copy(graph_module)
        block_map = discover_blocks(gm)
        nodes = {node.name: node for node in gm.graph.nodes}
        parts = segments(gm, block_map)
        runner = SegmentRunner(gm, parts)
        batches = batches_of(self.windows, self.config.batch_size)
        boundaries = block_boundaries(gm, block_map)
        dag = to_digraph(gm)
        with Spill() as spill:
            stream = SpilledStream(spill, runner, batches, boundaries[0])
            reference = None
            if self.config.target != "widened":
                reference = Reference(self.reference, batches, spill, trajectory=self.config.target == "trajectory")
            blocks = tqdm(block_map.blocks, desc="prune", disable=not self.progress, leave=False)
            for block, plan in zip(blocks, self.plans):
                part = parts[block.index + 1]
                before_mlp = nx.ancestors(dag, block.attention[-1].add) | {block.attention[-1].add}
                attention_nodes = [node for node in part.nodes if node.name in before_mlp]
                rest = part.nodes  # what is still to run of the block on each batch's stored stream
                targets = None
                pruned = plan.kv_heads is not None or plan.width is not None
                # Only a merged block reads a stream other than its original's by construction;
                # refitting single blocks toward the drift the blocks before them left made
                # the default model worse (1.43x -> 1.63x dense perplexity at --ratio 0.2).
                inputs = self.config.refit_inputs and reference is not None and len(plan.origin) > 1
                if reference and plan.origin and pruned:
                    pristine = all(len(p.origin) == 1 and p.kv_heads is None and p.width is None for p in self.plans[:block.index])
                    reference.run(plan.origin, stream, pristine, inputs)
                    targets = reference
                # Statistics passes run on a scratch copy of each batch's values, so that between
                # batches only the stream entering the block is held, never the block's insides.
                # Each step frees what the one before it built: give that back before it starts.
                if pruned:
                    release_free_memory()
                    if inputs:
                        attention = single(block.attention, "attention")
                        layout = attention.attention
                        self.refit_inputs(gm, nodes, attention, [layout.q, layout.k, layout.v], stream, runner,
                                          attention_nodes, dag, targets, len(plan.origin), "attention-in")
                    self.prune_attention(gm, nodes, block, plan, stream, runner, attention_nodes, targets)
                    release_free_memory()
                    add = block.attention[-1].add
                    if hands_off(runner, part.nodes, attention_nodes, add, boundaries[block.index], block.index + 1):
                        # The MLP's refit, its statistics and the final run all start from the
                        # stream after the (now pruned) attention: run the attention once and store
                        # that stream instead of the block's input, not three times.
                        for index, env in stream.batches():
                            runner.run_nodes(attention_nodes, env, {})
                            stream.store(index, env, add)
                        rest = [node for node in part.nodes if node.name not in before_mlp]
                    if inputs:
                        mlp = single(block.mlp, "MLP")
                        projections = [p for p in (mlp.mlp.gate, mlp.mlp.up) if p is not None]
                        self.refit_inputs(gm, nodes, mlp, projections, stream, runner, rest, dag, targets, len(plan.origin),
                                          "mlp-in")
                    self.prune_mlp(gm, nodes, block, plan, stream, runner, rest, targets)
                    release_free_memory()
                for index, env in stream.batches():
                    runner.run_nodes(rest, env, {})
                    runner.drop(block.index + 1, env)
                    stream.store(index, env, boundaries[block.index + 1])
        return PassResult(finish(gm), True)

    def refit_inputs(self, gm, nodes, branch: Branch, projections: list[Projection], stream, runner, part_nodes, dag,
                     targets: "Reference", count: int, key: str) -> None:
        """Refit the branch's input projections so that what they compute on the compressed stream
        matches what they would compute on the target streams.

        A fused branch holds one chunk of rows per original block (``count`` of them); chunk j's
        target input is the branch's own normalisation applied to original block j's stream (from
        the reference).
        Each chunk's rows become ``W B_j^T``, with ``B_j`` the ridge least-squares map from the
        compressed inputs to the target inputs, fitted once per distinct input (q, k and v
        usually read one normalised stream).
        """
        by_input: dict[str, list[Projection]] = {}
        for projection in projections:
            by_input.setdefault(linear_input(nodes[projection.linear.node], projection.linear).name, []).append(projection)
        for name, group in by_input.items():
            maps = self.input_maps(nodes[name], branch, stream, runner, part_nodes, dag, targets, count, key)
            for projection in group:
                stored = weight(gm, projection.linear)
                w = stored.float().clone()  # refitted in float32 whatever the weights are stored in
                chunk = projection.features // count
                for j, solution in enumerate(maps):
                    rows = slice(projection.start + j * chunk, projection.start + (j + 1) * chunk)
                    w[rows] = w[rows] @ solution.T
                set_weight(gm, projection.linear, w.to(stored.dtype))

    def input_maps(self, x_node, branch: Branch, stream, runner, part_nodes, dag, targets: "Reference", count: int,
                   key: str) -> list[torch.Tensor]:
        """Per origin block j, the ridge map ``B_j`` from ``x_node`` on the compressed stream to
        ``x_node`` computed from block j's own stream in the target."""
        ancestors = nx.ancestors(dag, x_node.name) | {x_node.name}
        compute = [node for node in part_nodes if node.name in ancestors]
        between = nx.descendants(dag, branch.stream_in)
        normalise = [node for node in compute if node.name in between]
        gram, crosses = None, [None] * count
        for index, env in stream.batches():
            seen = {}
            runner.run_nodes(compute, dict(env), {x_node.name: lambda node, value: seen.update(x=value.flatten(0, -2).float())})
            x = seen["x"]
            gram = add_gram(gram, x)
            for j in range(count):
                scratch = dict(env)
                scratch[branch.stream_in] = targets.target(index, f"{key}-{j}")
                runner.run_nodes(normalise, scratch, {x_node.name: lambda node, value: seen.update(t=value.flatten(0, -2).float())})
                crosses[j] = accumulate(crosses[j], x.T @ seen["t"])
        check_finite(gram, f"{key} statistics")
        return [ridge_solve(gram, cross, self.config.fit_ridge)[0].float() for cross in crosses]

    def prune_attention(self, gm, nodes, block: Block, plan: BlockPlan, stream, runner, part_nodes, targets) -> None:
        branch = single(block.attention, "attention")
        layout = branch.attention
        if plan.kv_heads is None or plan.kv_heads == layout.num_kv_heads:
            return
        if not 0 < plan.kv_heads < layout.num_kv_heads:
            raise FxflattenError(f"block {block.index}: cannot prune {layout.num_kv_heads} KV heads to {plan.kv_heads}")
        config = self.config
        moments = Moments(with_bias=layout.o.bias is not None)
        x_node = linear_input(nodes[layout.o.node], layout.o)
        for index, env in stream.batches():
            target = None if targets is None else targets.target(index, "attention")
            runner.run_nodes(part_nodes, dict(env), {x_node.name: lambda node, value: moments.add(value, target)})
        moments.check(f"block {block.index}: attention statistics")
        w = weight(gm, layout.o)
        moments.default_target(gm, layout.o)
        groups = head_groups(layout, layout.num_kv_heads)
        if config.head_score == "energy":
            energy = group_energy(moments.gram, w, groups)
            keep_groups = sorted(torch.topk(energy, plan.kv_heads).indices.tolist())
        else:
            always = torch.tensor([w.shape[1]]) if moments.with_bias else None
            keep_groups = greedy_groups_by_error(moments.gram, moments.cross, groups, plan.kv_heads, config.fit_ridge, always)
        keep_columns = torch.cat([groups[g] for g in keep_groups])
        head_dim = layout.head_dim
        keep_kv = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in keep_groups])
        members = [nodes[name] for name in branch.nodes]
        sources = {p.linear.node for p in (layout.q, layout.k, layout.v)}
        rescale_constants(gm, members, sources, {layout.o.node}, Fraction(plan.kv_heads, layout.num_kv_heads))
        slice_inputs(gm, [layout.q, layout.k, layout.v], [keep_columns, keep_kv, keep_kv])
        ridge = refit_output(gm, layout.o, keep_columns, moments, config.fit_ridge, config.refit_attention)
        self.report.blocks.setdefault(block.index, {}).update(kv_groups_kept=keep_groups, attention_ridge=ridge)

    def prune_mlp(self, gm, nodes, block: Block, plan: BlockPlan, stream, runner, part_nodes, targets) -> None:
        branch = single(block.mlp, "MLP")
        layout = branch.mlp
        if plan.width is None or plan.width == layout.width:
            return
        if not 0 < plan.width < layout.width:
            raise FxflattenError(f"block {block.index}: cannot prune an MLP of width {layout.width} to {plan.width}")
        config = self.config
        moments = Moments(with_bias=layout.down.bias is not None)
        x_node = linear_input(nodes[layout.down.node], layout.down)
        stream_in = branch.stream_in
        for index, env in stream.batches():
            scratch = dict(env)
            target = None if targets is None else targets.target(index, "stream")

            def observe(node, value):
                moments.add(value, None if target is None else target - scratch[stream_in])
            runner.run_nodes(part_nodes, scratch, {x_node.name: observe})
        moments.check(f"block {block.index}: MLP statistics")
        moments.default_target(gm, layout.down)
        channels = layout.width
        if config.channel_score == "leverage":
            leverage = ridge_leverage(moments.gram[:channels, :channels], config.leverage_ridge)
            keep = torch.topk(leverage, plan.width).indices.sort().values
        else:
            always = torch.tensor([channels]) if moments.with_bias else None
            keep = prune_by_error(moments.gram, moments.cross, plan.width, config.fit_ridge, always=always)
        members = [nodes[name] for name in branch.nodes]
        projections = [p for p in (layout.gate, layout.up) if p is not None]
        rescale_constants(gm, members, {p.linear.node for p in projections}, {layout.down.node}, Fraction(plan.width, channels))
        slice_inputs(gm, projections, [keep] * len(projections))
        ridge = refit_output(gm, layout.down, keep, moments, config.fit_ridge, config.refit_mlp)
        self.report.blocks.setdefault(block.index, {}).update(mlp_channels_kept=int(plan.width), mlp_ridge=ridge)


def hands_off(runner: SegmentRunner, part_nodes, attention_nodes, add: str, stream_in: str, position: int) -> bool:
    """Whether nothing reads the block's attention side (or its input stream) except through the
    stream it leaves for the MLP, so that stream can replace the block's input between passes.

    True for a sequential pre-norm block; false for a parallel block (GPT-J's MLP reads the block
    input) or a graph that also outputs a value from inside the attention.
    """
    inside = {node.name for node in attention_nodes} | {stream_in}
    mlp_reads = {source.name for node in part_nodes if node.name not in inside for source in node.all_input_nodes}
    read_later = {name for name in inside if runner.last_use.get(name, -1) > position}
    return (mlp_reads | read_later) & inside == {add}


def single(stage: tuple[Branch, ...], what: str) -> Branch:
    if len(stage) != 1:
        raise FxflattenError(f"a block still has {len(stage)} parallel {what} branches: fuse before pruning")
    return stage[0]
