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
original model computes at that depth on its own stream, which also pulls back the error left
by the compressed blocks that feed it.

With a serial or trajectory target the input side of a merged block is refitted too
(``refit_inputs``): in the parallel form the second block of a pair reads the stream entering
the first block instead of the one the first block leaves. Ahead of pruning each stage, each
original block's rows of q/k/v (then gate/up) are refitted by ridge least squares so that, on
the compressed stream, they compute what they compute on that block's own stream in the
target; the attention and MLP nonlinearities then see inputs closer to the original's, which
no output refit can give them. Keeping every head and channel with the widened target changes
nothing. Any block can be pruned, widened or not, so this is also a plain width-pruning pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import networkx as nx
import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult
from tqdm.auto import tqdm

from fxflatten.errors import FxflattenError, check_finite
from fxflatten.graph.discovery import block_boundaries
from fxflatten.graph.fx import linear_input, to_digraph
from fxflatten.graph.layout import Block, Branch, Projection
from fxflatten.graph.params import set_weight, weight
from fxflatten.leastsq import add_gram, greedy_groups_by_error, group_energy, prune_by_error, ridge_leverage, ridge_solve
from fxflatten.passes.base import GraphPass, contract_error, editable_copy, finish
from fxflatten.passes.reference import Reference
from fxflatten.passes.refit import Moments, accumulate, head_groups, refit_output, slice_inputs
from fxflatten.passes.rescale import rescale_constants
from fxflatten.plans import BlockPlan, PruneConfig
from fxflatten.run.runner import SegmentRunner, batches_of, segments
from fxflatten.run.spill import Spill, SpilledStream, check_free_space, release_free_memory


@dataclass
class PruneReport:
    """Per block: what it keeps, and any ridge that had to grow."""

    blocks: dict[int, dict[str, object]] = field(default_factory=dict)


@dataclass
class BlockStep:
    """One block being pruned: the graph, the compressed stream entering the block, its plan and targets.

    ``rest`` is what is still to run of the block on each batch's stored stream: the whole
    segment, or only its MLP side once the pruned attention has handed off its stream.
    """

    gm: GraphModule
    nodes: dict[str, Node]
    runner: SegmentRunner
    stream: SpilledStream
    dag: nx.DiGraph
    config: PruneConfig
    block: Block
    plan: BlockPlan
    segment: list[Node]  # the block's nodes, from the stream entering it to the stream it leaves
    attention: list[Node]  # the segment's nodes up to the attention's residual add
    stream_in: str
    stream_out: str
    reference: Reference | None
    refit_inputs: bool  # refit q/k/v and gate/up toward the origin blocks' own inputs
    targets: Reference | None = None  # the reference, once it ran this block's origin
    rest: list[Node] = field(init=False)

    def __post_init__(self) -> None:
        self.rest = self.segment

    @property
    def pruned(self) -> bool:
        return self.plan.kv_heads is not None or self.plan.width is not None

    def target(self, index: int, key: str) -> torch.Tensor | None:
        """Batch ``index``'s refit target ``key``, or None where the target is the block's own output."""
        return None if self.targets is None else self.targets.target(index, key)

    def scratch_batches(self) -> Iterator[tuple[int, dict[str, object]]]:
        """Each batch's index and a scratch copy of its stored values, emptied once the caller moves on.

        Statistics run on the copy, so that between batches only the stream entering the block
        is held, never the block's insides.
        """
        for index, env in self.stream.batches():
            scratch = dict(env)
            yield index, scratch
            scratch.clear()

    def hand_off_attention(self) -> None:
        """Store the stream the pruned attention leaves in place of the block's input, if nothing else reads it.

        The MLP's input refit, its statistics and the final run all start from that stream: the
        attention then runs once more here instead of once in each of them.
        """
        add = self.block.attention[-1].add
        if not hands_off(self.runner, self.segment, self.attention, add, self.stream_in, self.block.index + 1):
            return
        for index, env in self.stream.batches():
            self.runner.run_nodes(self.attention, env, {})
            self.stream.store(index, env, add)
        handed = {node.name for node in self.attention}
        self.rest = [node for node in self.segment if node.name not in handed]

    def run_rest(self) -> None:
        """Run what is left of the block on each batch and store the stream it leaves for the next block."""
        for index, env in self.stream.batches():
            self.runner.run_nodes(self.rest, env, {})
            self.runner.drop(self.block.index + 1, env)
            self.stream.store(index, env, self.stream_out)


class PrunePass(GraphPass):
    """Prune each planned block to its target KV heads and MLP width, block by block."""

    def __init__(self, windows: torch.Tensor, plans: list[BlockPlan], config: PruneConfig = PruneConfig(),
                 reference: GraphModule | None = None, progress: bool = False, consume: bool = False) -> None:
        """``consume=True`` prunes the input graph itself instead of a copy sharing its tensors.

        For a caller that made the input and will not use it again (``compress`` and its
        widened graph): each widened block's weights are then freed as soon as the block is
        pruned, instead of all of them staying alive with the input until the pass ends (what
        that saves at the peak: benchmarks/results/NOTES.md).
        """
        self.consume = consume
        self.windows = windows
        self.plans = plans
        self.config = config
        self.reference = reference
        self.progress = progress
        self.report = PruneReport()

    def requires(self, graph_module: GraphModule) -> None:
        """One plan per block, a reference graph where the target needs one, and every block to
        prune fused to one attention and one MLP branch with planned widths it can be pruned to; and
        room in TMPDIR for what the pass spills."""
        super().requires(graph_module)
        block_map = self.record_input(graph_module)
        blocks = block_map.blocks
        if len(self.plans) != len(blocks):
            raise FxflattenError(f"{len(self.plans)} block plans for a graph of {len(blocks)} blocks: "
                                 "give one BlockPlan per block (BlockPlan(None, None) leaves a block as it is)")
        if self.config.target != "widened" and self.reference is None:
            raise FxflattenError(f"target={self.config.target!r} needs the reference (original) graph: "
                                 "pass reference=, or prune with target='widened'")
        for block, plan in zip(blocks, self.plans):
            if plan.kv_heads is not None or plan.width is not None:
                check_prunable(block, plan, self.refits_inputs(plan))
        check_free_space(self.spill_bytes(block_map.hidden_size, self.windows.numel()))

    def spill_bytes(self, hidden: int, tokens: int) -> int:
        """Bytes the pass keeps on disk at once, for ``tokens`` calibration tokens (float32 streams;
        half that for a model run in bf16 or float16).

        Per token: the compressed stream; with a reference, its own stream and the attention
        target; with input refits, the streams entering each origin block's attention and MLP
        of the widest merged block. Each is overwritten in place, block after block.
        """
        copies = 1
        if self.config.target != "widened":
            copies += 2 + max((2 * len(plan.origin) for plan in self.plans if self.refits_inputs(plan)), default=0)
        return copies * tokens * hidden * torch.float32.itemsize

    def ensures(self, graph_module: GraphModule) -> None:
        """The pruned graph runs, and each block has its planned KV heads and MLP width."""
        super().ensures(graph_module)
        blocks = self.blocks_of(graph_module).blocks
        if len(blocks) != len(self.plans):
            raise contract_error("PrunePass", f"{len(self.plans)} blocks, one per plan", f"{len(blocks)}")
        for block, plan in zip(blocks, self.plans):
            kv_heads = None if plan.kv_heads is None else block.attention[0].attention.num_kv_heads
            width = None if plan.width is None else block.mlp[0].mlp.width
            if (kv_heads, width) != (plan.kv_heads, plan.width):
                raise FxflattenError(f"PrunePass left block {block.index} with (KV heads, MLP width) "
                                     f"({kv_heads}, {width}) instead of the planned ({plan.kv_heads}, {plan.width}): "
                                     "a bug in the pass, report it with the block plans")

    def refits_inputs(self, plan: BlockPlan) -> bool:
        """Whether the block's input projections are refitted toward its origin blocks' own inputs."""
        # Only a merged block reads, by construction, a stream other than its originals'. Refitting
        # single blocks toward the drift left by the blocks feeding them made the default model
        # worse ("Refitting only the merged blocks matters", benchmarks/results/NOTES.md).
        return self.config.refit_inputs and self.config.target != "widened" and len(plan.origin) > 1

    @torch.no_grad()
    def call(self, graph_module: GraphModule) -> PassResult:
        """Per block, in order, on the stream the blocks already pruned leave: targets, (input
        refit and) pruning of the attention, then of the MLP, then the rest of the block."""
        gm = graph_module if self.consume else editable_copy(graph_module)
        with Spill() as spill:
            for step in self.block_steps(gm, spill):
                if step.pruned:
                    self.run_reference(step)
                    release_free_memory()  # each step frees what the last one built: give it back
                    if step.refit_inputs:
                        self.refit_inputs(step, step.attention, step.block.attention[0])
                    self.prune_attention(step)
                    release_free_memory()
                    step.hand_off_attention()
                    if step.refit_inputs:
                        self.refit_inputs(step, step.rest, step.block.mlp[0])
                    self.prune_mlp(step)
                    release_free_memory()
                step.run_rest()
        return PassResult(finish(gm), True)

    def block_steps(self, gm: GraphModule, spill: Spill) -> Iterator[BlockStep]:
        """Each block of ``gm`` with its plan, in order, the compressed stream entering it stored in ``spill``."""
        block_map = self.blocks_of(gm)
        parts = segments(gm, block_map)
        runner = SegmentRunner(gm, parts)
        batches = batches_of(self.windows, self.config.batch_size)
        boundaries = block_boundaries(gm, block_map)
        nodes = {node.name: node for node in gm.graph.nodes}
        dag = to_digraph(gm)
        stream = SpilledStream(spill, runner, batches, boundaries[0])
        reference = None
        if self.config.target != "widened":
            reference = Reference(self.reference, batches, spill, trajectory=self.config.target == "trajectory")
        blocks = tqdm(block_map.blocks, desc="prune", disable=not self.progress, leave=False)
        for block, plan in zip(blocks, self.plans):
            segment = parts[block.index + 1].nodes
            add = block.attention[-1].add
            before_mlp = nx.ancestors(dag, add) | {add}
            yield BlockStep(gm=gm, nodes=nodes, runner=runner, stream=stream, dag=dag, config=self.config, block=block,
                            plan=plan, segment=segment, attention=[node for node in segment if node.name in before_mlp],
                            stream_in=boundaries[block.index], stream_out=boundaries[block.index + 1],
                            reference=reference, refit_inputs=self.refits_inputs(plan))

    def run_reference(self, step: BlockStep) -> None:
        """Run the original blocks the block replaces on its input: their outputs become its targets.

        A block with no origin, or with the widened target, keeps its own full-width output as target.
        """
        if step.reference is None or not step.plan.origin:
            return
        untouched = all(len(p.origin) == 1 and p.kv_heads is None and p.width is None
                        for p in self.plans[:step.block.index])
        step.reference.run(step.plan.origin, step.stream, untouched, step.refit_inputs)
        step.targets = step.reference

    def refit_inputs(self, step: BlockStep, nodes: list[Node], branch: Branch) -> None:
        """Refit the branch's input projections so that what they compute on the compressed stream
        matches what they would compute on the target streams.

        ``nodes`` compute the branch's input from the stream stored for the block. A fused branch
        holds one chunk of rows per original block; chunk j's target input is the branch's own
        normalisation applied to original block j's stream (from the reference). Each chunk's
        rows become ``W B_j^T``, with ``B_j`` the ridge least-squares map from the compressed
        inputs to the target inputs, fitted once per distinct input (q, k and v usually read one
        normalised stream).
        """
        count = len(step.plan.origin)
        by_input: dict[str, list[Projection]] = {}
        for projection in input_projections(branch):
            by_input.setdefault(linear_input(step.nodes[projection.linear.node], projection.linear).name, []).append(projection)
        for name, group in by_input.items():
            maps = self.input_maps(step.nodes[name], branch, step, nodes)
            for projection in group:
                stored = weight(step.gm, projection.linear)
                w = stored.float().clone()  # refitted in float32 whatever the weights are stored in
                chunk = projection.features // count
                for j, solution in enumerate(maps):
                    rows = slice(projection.start + j * chunk, projection.start + (j + 1) * chunk)
                    w[rows] = w[rows] @ solution.T
                set_weight(step.gm, projection.linear, w.to(stored.dtype))

    def input_maps(self, x_node: Node, branch: Branch, step: BlockStep, nodes: list[Node]) -> list[torch.Tensor]:
        """Per origin block j, the ridge map ``B_j`` from ``x_node`` on the compressed stream to
        ``x_node`` computed from block j's own stream in the target."""
        key = f"{branch.kind}-in"
        ancestors = nx.ancestors(step.dag, x_node.name) | {x_node.name}
        compute = [node for node in nodes if node.name in ancestors]
        between = nx.descendants(step.dag, branch.stream_in)
        normalise = [node for node in compute if node.name in between]
        gram, crosses = None, [None] * len(step.plan.origin)
        for index, env in step.stream.batches():
            x = observed(step.runner, compute, env, x_node.name)
            gram = add_gram(gram, x)
            for j in range(len(crosses)):
                origin_input = {branch.stream_in: step.targets.target(index, f"{key}-{j}")}
                t = observed(step.runner, normalise, env, x_node.name, origin_input)
                crosses[j] = accumulate(crosses[j], x.T @ t)
        check_finite(gram, f"{key} statistics")
        step.runner.weights.clear()  # streamed weights held for the runs give way to the solve
        return [ridge_solve(gram, cross, step.config.fit_ridge)[0].float() for cross in crosses]

    def prune_attention(self, step: BlockStep) -> None:
        """Keep the planned number of whole KV groups and refit the output projection over them."""
        branch = step.block.attention[0]
        layout, kv_heads = branch.attention, step.plan.kv_heads
        if kv_heads is None or kv_heads == layout.num_kv_heads:
            return
        config = step.config
        moments = Moments(with_bias=layout.o.bias is not None)
        x_node = linear_input(step.nodes[layout.o.node], layout.o)
        for index, scratch in step.scratch_batches():
            target = step.target(index, "attention")
            step.runner.run_nodes(step.attention, scratch,
                                  {x_node.name: lambda node, value, target=target: moments.add(value, target)})
        moments.check(f"block {step.block.index}: attention statistics")
        step.runner.weights.clear()  # streamed weights held for the runs give way to the solve
        w = weight(step.gm, layout.o)
        moments.default_target(step.gm, layout.o)
        groups = head_groups(layout, layout.num_kv_heads, w.device)
        if config.head_score == "energy":
            energy = group_energy(moments.gram, w, groups)
            keep_groups = sorted(torch.topk(energy, kv_heads).indices.tolist())
        else:
            always = torch.tensor([w.shape[1]], device=w.device) if moments.with_bias else None
            keep_groups = greedy_groups_by_error(moments.gram, moments.cross, groups, kv_heads, config.fit_ridge, always)
        keep_columns = torch.cat([groups[g] for g in keep_groups])
        head_dim = layout.head_dim
        keep_kv = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim, device=w.device) for g in keep_groups])
        members = [step.nodes[name] for name in branch.nodes]
        projections = input_projections(branch)
        sources = {p.linear.node for p in projections}
        rescale_constants(step.gm, members, sources, {layout.o.node}, Fraction(kv_heads, layout.num_kv_heads))
        slice_inputs(step.gm, projections, [keep_columns, keep_kv, keep_kv])
        ridge = refit_output(step.gm, layout.o, keep_columns, moments, config.fit_ridge, config.refit_attention)
        self.report.blocks.setdefault(step.block.index, {}).update(kv_groups_kept=keep_groups, attention_ridge=ridge)

    def prune_mlp(self, step: BlockStep) -> None:
        """Keep the planned number of MLP channels and refit the down projection on them."""
        branch = step.block.mlp[0]
        layout, width = branch.mlp, step.plan.width
        if width is None or width == layout.width:
            return
        config = step.config
        moments = Moments(with_bias=layout.down.bias is not None)
        x_node = linear_input(step.nodes[layout.down.node], layout.down)
        for index, scratch in step.scratch_batches():
            target = step.target(index, "stream")

            def observe(node, value, target=target, scratch=scratch):
                # The branch's target is what the stream gains across it.
                moments.add(value, None if target is None else target - scratch[branch.stream_in])
            step.runner.run_nodes(step.rest, scratch, {x_node.name: observe})
        moments.check(f"block {step.block.index}: MLP statistics")
        step.runner.weights.clear()  # streamed weights held for the runs give way to the solve
        moments.default_target(step.gm, layout.down)
        channels = layout.width
        if config.channel_score == "leverage":
            leverage = ridge_leverage(moments.gram[:channels, :channels], config.leverage_ridge)
            keep = torch.topk(leverage, width).indices.sort().values
        else:
            always = torch.tensor([channels], device=moments.gram.device) if moments.with_bias else None
            keep = prune_by_error(moments.gram, moments.cross, width, config.fit_ridge, always=always)
        members = [step.nodes[name] for name in branch.nodes]
        projections = input_projections(branch)
        rescale_constants(step.gm, members, {p.linear.node for p in projections}, {layout.down.node},
                          Fraction(width, channels))
        slice_inputs(step.gm, projections, [keep] * len(projections))
        ridge = refit_output(step.gm, layout.down, keep, moments, config.fit_ridge, config.refit_mlp)
        self.report.blocks.setdefault(step.block.index, {}).update(mlp_channels_kept=int(width), mlp_ridge=ridge)


def check_prunable(block: Block, plan: BlockPlan, refits_inputs: bool) -> None:
    """Stop with an error naming the block unless ``plan`` can prune it."""
    for stage, what in ((block.attention, "attention"), (block.mlp, "MLP")):
        if len(stage) != 1:
            raise FxflattenError(f"block {block.index} has {len(stage)} {what} branches and pruning needs one: "
                                 "fuse its parallel branches (FusePass) first, or plan it as BlockPlan(None, None)")
    attention, mlp = block.attention[0].attention, block.mlp[0].mlp
    if attention is None and (plan.kv_heads is not None or refits_inputs):
        raise FxflattenError(f"block {block.index}: its attention has no q/k/v/o layout to prune or refit "
                             "(a hand-written softmax): plan its kv_heads as None and keep it out of merged groups")
    if plan.kv_heads is not None and not 0 < plan.kv_heads <= attention.num_kv_heads:
        raise FxflattenError(f"block {block.index}: cannot prune {attention.num_kv_heads} KV heads to {plan.kv_heads}: "
                             f"plan between 1 and {attention.num_kv_heads}")
    if plan.width is not None and not 0 < plan.width <= mlp.width:
        raise FxflattenError(f"block {block.index}: cannot prune an MLP of width {mlp.width} to {plan.width}: "
                             f"plan between 1 and {mlp.width}")


def input_projections(branch: Branch) -> list[Projection]:
    """The projections that read the branch's input: q, k, v, or the MLP's gate (if any) and up."""
    if branch.attention is not None:
        return [branch.attention.q, branch.attention.k, branch.attention.v]
    return [p for p in (branch.mlp.gate, branch.mlp.up) if p is not None]


def observed(runner: SegmentRunner, nodes: list[Node], env: dict[str, object], name: str,
             replace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """What node ``name`` computes, one float32 row per token, when ``nodes`` run on a scratch copy
    of a batch's values ``env`` (with ``replace`` swapped in); ``env`` keeps only what it held."""
    seen = {}
    scratch = {**env, **(replace or {})}
    runner.run_nodes(nodes, scratch, {name: lambda node, value: seen.update(value=value.flatten(0, -2).float())})
    return seen["value"]


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
