"""The segment runner (run/runner.py) and the spilled stream (run/spill.py): what each keeps
in memory while it walks the blocks."""

import weakref

import torch

from fxflatten import capture, discover_blocks
from fxflatten.graph.discovery import block_boundaries
from fxflatten.graph.fx import linear_input
from fxflatten.run.runner import SegmentRunner, batches_of, segments
from fxflatten.run.spill import Spill, SpilledStream
from tests.graphs import CALIB
from tests.models import Shape, build


@torch.no_grad()
def test_spilled_stream_holds_only_the_running_batch_stream_in_memory():
    graph = capture(build("llama", Shape(layers=2)))
    block_map = discover_blocks(graph)
    runner = SegmentRunner(graph, segments(graph, block_map))
    boundaries = block_boundaries(graph, block_map)
    batches = batches_of(CALIB, 2)
    expected = runner.prologue(batches)  # every stream in memory, to compare with
    runner.run(1, expected)
    with Spill() as spill:
        stream = SpilledStream(spill, runner, batches, boundaries[0])
        assert not any(set(env) & set(boundaries) for env in stream.envs)
        for index, env in stream.batches():
            held = [(i, name) for i, other in enumerate(stream.envs) for name in other if name in boundaries]
            assert held == [(index, boundaries[0])]
            runner.run_nodes(runner.parts[1].nodes, env, {})
            runner.drop(1, env)
            stream.store(index, env, boundaries[1])
        assert not any(set(env) & set(boundaries) for env in stream.envs)
        assert len(stream) == len(batches)
        for value, env in zip(stream, expected, strict=True):
            torch.testing.assert_close(value, env[boundaries[1]], rtol=0, atol=0)
        assert [name for _, env in stream.batches() for name in env if name in boundaries] == [boundaries[1]] * len(batches)


def test_prologue_shares_the_values_that_do_not_depend_on_the_tokens():
    graph = capture(build("llama", Shape(layers=2)))
    block_map = discover_blocks(graph)
    runner = SegmentRunner(graph, segments(graph, block_map))
    envs = runner.prologue(batches_of(CALIB, 2))
    stream = block_boundaries(graph, block_map)[0]
    shared = [name for name, value in envs[0].items() if isinstance(value, torch.Tensor) and name != stream]
    assert shared  # the mask and the rotary tables
    assert all(env[name] is envs[0][name] for env in envs[1:] for name in shared)
    assert len({id(env[stream]) for env in envs}) == len(envs)  # each batch's own tokens


def test_running_a_block_leaves_only_what_later_segments_read():
    """Values whose only other readers are nodes no segment runs (export's dtype assertions)
    are freed after their last real reader, not kept for every batch until the block ends."""
    graph = capture(build("llama", Shape(layers=2)))
    block_map = discover_blocks(graph)
    runner = SegmentRunner(graph, segments(graph, block_map))
    envs = runner.prologue(batches_of(CALIB, len(CALIB)))
    before = set(envs[0])
    runner.run_nodes(runner.parts[1].nodes, envs[0], {})
    assert set(envs[0]) - before == {block_boundaries(graph, block_map)[1]}


@torch.no_grad()
def test_an_observer_runs_after_the_inputs_only_its_node_reads_are_freed():
    graph = capture(build("llama", Shape(layers=2)))
    block_map = discover_blocks(graph)
    runner = SegmentRunner(graph, segments(graph, block_map))
    nodes = {node.name: node for node in graph.graph.nodes}
    down = block_map.blocks[0].mlp[0].mlp.down
    product = linear_input(nodes[down.node], down)  # the gated product: silu(gate) * up
    inputs = [node for node in product.all_input_nodes if len(node.users) == 1]
    assert inputs
    refs, seen = {}, []
    watch = {node.name: lambda node, value: refs.__setitem__(node.name, weakref.ref(value)) for node in inputs}
    watch[product.name] = lambda node, value: seen.append([ref() is None for ref in refs.values()])
    envs = runner.prologue(batches_of(CALIB, len(CALIB)))
    runner.run_nodes(runner.parts[1].nodes, envs[0], watch)
    assert seen == [[True] * len(inputs)]
