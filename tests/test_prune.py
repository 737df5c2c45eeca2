"""PrunePass, its refits (passes/refit.py) and its targets (passes/reference.py): exact when
keeping everything, the right shapes when pruning, refits toward the original model."""

import gc
import shutil
import tempfile
import weakref

import networkx as nx
import pytest
import torch

import fxflatten.passes.prune as prune_pass
from fxflatten import FxflattenError, capture, discover_blocks
from fxflatten.graph.discovery import block_boundaries
from fxflatten.graph.fx import to_digraph
from fxflatten.graph.params import get_tensor, weight
from fxflatten.passes.flatten import FlattenPass
from fxflatten.passes.prune import PrunePass
from fxflatten.passes.reference import Reference
from fxflatten.passes.refit import Moments
from fxflatten.pipeline import compress, flatten
from fxflatten.plans import BlockPlan, PruneConfig, units_of
from fxflatten.run.runner import SegmentRunner, batches_of, segments
from fxflatten.run.spill import Spill
from fxflatten.tables import block_rows
from tests.graphs import CALIB
from tests.graphs import ids_logits as logits
from tests.models import Shape, build


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "qwen2"])
def test_pruning_that_keeps_everything_is_exact(family):
    flat = flatten(capture(build(family, Shape(layers=3))), groups=[[0, 1]])
    layout = discover_blocks(flat.graph).blocks[0]
    attention, mlp = layout.attention[0].attention, layout.mlp[0].mlp
    plans = [BlockPlan(attention.num_kv_heads, mlp.width, (0, 1)), BlockPlan(None, None, (2,))]
    result = PrunePass(CALIB, plans, PruneConfig(target="widened"))(flat.graph)
    torch.testing.assert_close(logits(result.graph_module), logits(flat.graph), rtol=1e-5, atol=1e-6)


def test_width_pruning_a_plain_block_narrows_it():
    graph = capture(build("llama", Shape(layers=2, heads=4, kv_heads=2, width=48)))
    plans = [BlockPlan(1, 24, ()), BlockPlan(None, None, ())]
    pruned = PrunePass(CALIB, plans, PruneConfig(target="widened"))(graph).graph_module
    row = block_rows(discover_blocks(pruned))[0]
    assert (row["heads"], row["kv_heads"], row["mlp_width"]) == (2, 1, 24)
    assert torch.isfinite(logits(pruned)).all()


def test_serial_target_needs_the_reference_graph():
    flat = flatten(capture(build("llama")), groups=[[0, 1]])
    with pytest.raises(FxflattenError, match="reference"):
        PrunePass(CALIB, [BlockPlan(2, 48, (0, 1))], PruneConfig(target="serial"))(flat.graph)


@torch.no_grad()
def test_refits_toward_the_original_model_beat_the_widened_target():
    graph = capture(build("llama", Shape(layers=6)))
    calib = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(3))
    dense = graph(calib, torch.ones_like(calib))
    errors = {}
    for target in ("serial", "trajectory", "widened"):
        result = compress(graph, calib=calib, groups=[[1, 2], [3, 4]], config=PruneConfig(target=target))
        errors[target] = float((result.graph(calib, torch.ones_like(calib)) - dense).pow(2).mean())
    assert errors["serial"] < errors["widened"] and errors["trajectory"] < errors["widened"]


def test_trajectory_starts_where_the_first_changed_block_does(monkeypatch):
    """Before the first group the compressed stream is the original's, so the trajectory target
    starts from it instead of rerunning the blocks before it, and for a single group it is the
    serial target: the original blocks run on the same input."""
    graph = capture(build("llama", Shape(layers=5)))
    starts = []
    advance = Reference.advance

    def spy(self, origin, *args):
        starts.append(self.next_block)
        return advance(self, origin, *args)

    monkeypatch.setattr(Reference, "advance", spy)
    trajectory = compress(graph, calib=CALIB, groups=[[2, 3]], config=PruneConfig(target="trajectory")).graph
    serial = compress(graph, calib=CALIB, groups=[[2, 3]], config=PruneConfig(target="serial")).graph
    assert starts == [2]
    torch.testing.assert_close(logits(trajectory), logits(serial), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_reference_keeps_its_stream_and_targets_on_disk():
    """Only the side inputs stay in memory; the spilled targets are the original model's own,
    and with ``inputs`` so are the streams entering each origin block and its MLP."""
    graph = capture(build("llama", Shape(layers=4)))
    block_map = discover_blocks(graph)
    batches = batches_of(CALIB, 4)
    runner = SegmentRunner(graph, segments(graph, block_map))
    envs = runner.start(batches)
    boundaries = block_boundaries(graph, block_map)
    mlp_ins = [block_map.blocks[block].mlp[0].stream_in for block in (1, 2)]
    seen = {}
    watch = {name: lambda node, value: seen.setdefault(node.name, []).append(value) for name in boundaries[1:3] + mlp_ins}
    for index in range(4):  # prologue and blocks 0..2
        runner.run(index, envs, watch)
    with Spill() as spill:
        reference = Reference(graph, batches, spill, trajectory=True)
        reference.run((1, 2), [], inputs=True)
        assert all(set(env) <= side for env, side in zip(reference.envs, reference.side))
        for index, env in enumerate(envs):
            torch.testing.assert_close(reference.target(index, "stream"), env[boundaries[3]], rtol=0, atol=0)
            for j in (0, 1):
                torch.testing.assert_close(reference.target(index, f"attention-in-{j}"), seen[boundaries[1 + j]][index], rtol=0, atol=0)
                torch.testing.assert_close(reference.target(index, f"mlp-in-{j}"), seen[mlp_ins[j]][index], rtol=0, atol=0)
        directory = spill.directory
    assert not directory.exists()


@pytest.mark.parametrize("target,groups", [("trajectory", [[1, 2, 3]]), ("trajectory", [[1, 2]]), ("widened", [[1, 2]])])
def test_the_spill_estimate_is_what_the_pass_keeps_on_disk(monkeypatch, target, groups):
    """What the free-space check asks for bounds the bytes spilled at once, and is no more than that."""
    held, peak = {}, [0]
    put = Spill.put

    def record(self, key, tensor):
        held[key] = tensor.nbytes
        peak[0] = max(peak[0], sum(held.values()))
        put(self, key, tensor)

    monkeypatch.setattr(Spill, "put", record)
    asked = []
    monkeypatch.setattr(prune_pass, "check_free_space", asked.append)
    graph = capture(build("llama", Shape(layers=5)))
    compress(graph, calib=CALIB, groups=groups, config=PruneConfig(target=target))
    assert asked == [peak[0]]


def test_too_little_room_for_the_spill_is_refused_before_anything_is_spilled(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    graph = capture(build("llama", Shape(layers=4)))
    with pytest.raises(FxflattenError, match=f"spills about .* to {tmp_path} \\(TMPDIR\\), which has 0.00 GiB free"):
        compress(graph, calib=CALIB, groups=[[1, 2]])
    assert list(tmp_path.iterdir()) == []


def test_prune_removes_its_spill_even_when_it_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spilled = []
    put = Spill.put
    monkeypatch.setattr(Spill, "put", lambda self, key, tensor: (spilled.append(key), put(self, key, tensor)))
    graph = capture(build("llama", Shape(layers=4)))
    compress(graph, calib=CALIB, groups=[[1, 2]])
    assert spilled and list(tmp_path.iterdir()) == []

    def fail(*args, **kwargs):
        raise FxflattenError("refit failed")

    monkeypatch.setattr(prune_pass, "refit_output", fail)
    with pytest.raises(FxflattenError, match="refit failed"):
        compress(graph, calib=CALIB, groups=[[1, 2]])
    assert list(tmp_path.iterdir()) == []


def widened_weight(flat, block=0):
    """A weight of a flattened group's widened MLP, as the graph holds it."""
    layout = discover_blocks(flat.graph).blocks[block].mlp[0].mlp
    return get_tensor(flat.graph, layout.down.weight)


@pytest.mark.parametrize("consume", [False, True])
def test_a_consuming_prune_frees_the_widened_weights_and_prunes_the_same(consume):
    graph = capture(build("llama", Shape(layers=3)))
    layout = discover_blocks(graph).blocks[0]
    plans = [BlockPlan(layout.attention[0].attention.num_kv_heads, layout.mlp[0].mlp.width, (0, 1)), BlockPlan(None, None, (2,))]
    expected = logits(PrunePass(CALIB, plans, reference=graph)(flatten(graph, groups=[[0, 1]]).graph).graph_module)
    flat = flatten(graph, groups=[[0, 1]])
    widened = weakref.ref(widened_weight(flat))
    pruned = PrunePass(CALIB, plans, reference=graph, consume=consume)(flat.graph).graph_module
    gc.collect()
    assert (widened() is None) == consume  # a copying prune leaves its input as it was
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=0)


def test_statistics_with_a_nan_stop_with_an_error_naming_the_block():
    moments = Moments(with_bias=False)
    moments.add(torch.tensor([[1.0, float("nan")], [0.5, 2.0]]), None)
    with pytest.raises(FxflattenError, match="block 3: MLP statistics is not finite"):
        moments.check("block 3: MLP statistics")


def keep_everything(graph, groups):
    """Plans that keep every head and channel of ``groups`` (so only refits change anything)."""
    flat = flatten(graph, groups=groups)
    plans = [BlockPlan(b.attention[0].attention.num_kv_heads, b.mlp[0].mlp.width, unit) if len(unit) > 1
             else BlockPlan(None, None, unit)
             for b, unit in zip(discover_blocks(flat.graph).blocks, units_of(groups, len(discover_blocks(graph).blocks)))]
    return flat.graph, plans


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "qwen2"])
def test_input_refit_moves_only_the_branches_whose_input_the_flattening_changed(family):
    """The first branch of a first group already reads the original model's stream, so its
    q/k/v rows still compute the same on the calibration tokens (up to the small ridge); the
    second branch's rows are refitted toward the stream the original second block reads, and
    the model gets closer to the original."""
    graph = capture(build(family, Shape(layers=3)))
    flat, plans = keep_everything(graph, [[0, 1]])
    config = PruneConfig(target="serial", refit_inputs=True)
    refitted = PrunePass(CALIB, plans, config, reference=graph)(flat).graph_module
    q = discover_blocks(flat).blocks[0].attention[0].attention.q
    half = q.features // 2
    x = linear_inputs(flat, q.linear)
    queries = [x @ weight(gm, q.linear)[q.start: q.stop].T for gm in (flat, refitted)]
    moved = [float((queries[1][:, j * half: (j + 1) * half] - queries[0][:, j * half: (j + 1) * half]).norm()
                   / queries[0][:, j * half: (j + 1) * half].norm()) for j in (0, 1)]
    assert moved[0] < 0.01 and moved[1] > 10 * moved[0]

    def error(compressed):
        want = graph(CALIB, torch.ones_like(CALIB))
        return float((compressed(CALIB, torch.ones_like(CALIB)) - want).pow(2).mean())
    assert error(refitted) < 0.8 * error(flat)


@torch.no_grad()
def linear_inputs(gm, linear) -> torch.Tensor:
    """What ``linear`` multiplies on the calibration tokens, one row per token."""
    seen = []
    node = next(node for node in gm.graph.nodes if node.name == linear.node)
    source = node.args[1] if linear.transposed else node.args[0]
    runner = SegmentRunner(gm, segments(gm, discover_blocks(gm)))
    envs = runner.prologue(batches_of(CALIB, len(CALIB)))
    runner.run(1, envs, {source.name: lambda node, value: seen.append(value.flatten(0, -2))})
    return torch.cat(seen)


def test_input_refit_runs_only_on_merged_blocks(monkeypatch):
    """Width-pruned single blocks read their own original's stream already (up to drift), so
    their inputs are left alone; a merged block's attention and MLP inputs are both refitted."""
    refitted = []
    original = PrunePass.refit_inputs

    def spy(self, gm, nodes, branch, *args):
        refitted.append(branch.kind)
        return original(self, gm, nodes, branch, *args)

    monkeypatch.setattr(PrunePass, "refit_inputs", spy)
    graph = capture(build("llama", Shape(layers=4, heads=4, kv_heads=2, width=96)))
    result = compress(graph, ratio=0.4, calib=CALIB, groups=[[1, 2]], flatten_share=0.2)
    assert sum(plan.width is not None and len(plan.origin) == 1 for plan in result.plans) == 2
    assert sorted(refitted) == sorted([single.kind for single in (discover_blocks(graph).blocks[0].attention[0],
                                                                   discover_blocks(graph).blocks[0].mlp[0])])


def test_without_input_refits_a_merged_block_keeps_its_input_projections():
    """With refit_inputs=False, every head and channel kept and no output refit to make, the
    serial target leaves the widened block's weights as they were."""
    graph = capture(build("llama", Shape(layers=3)))
    flat, plans = keep_everything(graph, [[0, 1]])
    kept = PrunePass(CALIB, plans, PruneConfig(target="serial", refit_inputs=False), reference=graph)(flat).graph_module
    for name, tensor in flat.state_dict().items():
        torch.testing.assert_close(kept.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "qwen2"])
def test_a_pruned_block_runs_its_attention_once_after_pruning_it_and_prunes_the_same(family, monkeypatch):
    """After a merged block's attention is pruned, the stream it leaves replaces the block's
    input in the slot: the MLP's input refit, its statistics and the final run start from it.
    The attention then runs twice per batch (widened statistics, pruned once) instead of four
    times, and the result is bit for bit what running it each time gives."""
    graph = capture(build(family, Shape(layers=3)))
    flat = flatten(graph, groups=[[0, 1]])
    o_proj = discover_blocks(flat.graph).blocks[0].attention[0].attention.o.node
    counts = []
    original = SegmentRunner.run_nodes

    def counting(self, nodes, env, watch):
        counts[-1] += self.gm is not graph and any(node.name == o_proj for node in nodes)
        return original(self, nodes, env, watch)

    monkeypatch.setattr(SegmentRunner, "run_nodes", counting)
    results = {}
    for handoff in (True, False):
        monkeypatch.setattr(prune_pass, "hands_off", lambda *args, handoff=handoff: handoff)
        counts.append(0)
        results[handoff] = logits(compress(graph, calib=CALIB, groups=[[0, 1]]).graph)
    batches = len(batches_of(CALIB, PruneConfig().batch_size))
    assert counts == [2 * batches, 4 * batches]
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=0)


def test_the_attention_hands_off_only_when_the_mlp_reads_nothing_else_of_it():
    """A block whose MLP side also reads the block's input stream (as a parallel block does)
    keeps running its attention: its input must stay in the slot."""
    graph = capture(build("llama", Shape(layers=2)))
    block = discover_blocks(graph).blocks[0]
    nodes = {node.name: node for node in graph.graph.nodes}
    runner = SegmentRunner(graph, segments(graph, discover_blocks(graph)))
    part = runner.parts[1]
    stream_in = block_boundaries(graph, discover_blocks(graph))[0]
    add = block.attention[-1].add
    attention = [node for node in part.nodes if node.name in nx.ancestors(to_digraph(graph), add) | {add}]
    assert prune_pass.hands_off(runner, part.nodes, attention, add, stream_in, 1)
    down = nodes[block.mlp[0].mlp.down.node]
    with graph.graph.inserting_after(down):
        mixed = graph.graph.call_function(torch.ops.aten.add.Tensor, (down, nodes[stream_in]))
    down.replace_all_uses_with(mixed, delete_user_cb=lambda user: user is not mixed)
    graph.recompile()
    runner = SegmentRunner(graph, segments(graph, discover_blocks(graph)))
    assert not prune_pass.hands_off(runner, runner.parts[1].nodes, attention, add, stream_in, 1)


def test_the_attention_does_not_hand_off_a_value_the_graph_outputs():
    """A value inside the attention that the graph also returns must be computed on each run."""
    graph = capture(build("llama", Shape(layers=2)))
    block_map = discover_blocks(graph)
    block = block_map.blocks[0]
    stream_in = block_boundaries(graph, block_map)[0]
    add = block.attention[-1].add
    runner = SegmentRunner(graph, segments(graph, block_map))
    part = runner.parts[1]
    attention = [node for node in part.nodes if node.name in nx.ancestors(to_digraph(graph), add) | {add}]
    assert prune_pass.hands_off(runner, part.nodes, attention, add, stream_in, 1)
    output = next(node for node in graph.graph.nodes if node.op == "output")
    query = next(node for node in attention if node.name == block.attention[0].attention.q.linear.node)
    output.args = ((output.args[0], query),)
    runner = SegmentRunner(graph, segments(graph, block_map))
    assert not prune_pass.hands_off(runner, runner.parts[1].nodes, attention, add, stream_in, 1)


def test_input_refit_fits_each_distinct_input_of_the_projections(monkeypatch):
    """Where v reads another value than q and k (here a copy of their normalised stream), its
    rows are refitted from what v itself reads: one fit per distinct input, same weights."""
    graph = capture(build("llama", Shape(layers=3)))
    config = PruneConfig(target="serial")
    flat, plans = keep_everything(graph, [[0, 1]])
    expected = PrunePass(CALIB, plans, config, reference=graph)(flat).graph_module
    flat, plans = keep_everything(graph, [[0, 1]])
    v = discover_blocks(flat).blocks[0].attention[0].attention.v.linear
    node = next(node for node in flat.graph.nodes if node.name == v.node)
    with flat.graph.inserting_before(node):
        copy = flat.graph.call_function(torch.ops.aten.clone.default, (node.args[0],))
    node.replace_input_with(node.args[0], copy)
    flat.recompile()
    fits = []
    original = PrunePass.input_maps

    def spy(self, x_node, branch, *args):
        fits.append((branch.kind, x_node.name))
        return original(self, x_node, branch, *args)

    monkeypatch.setattr(PrunePass, "input_maps", spy)
    refitted = PrunePass(CALIB, plans, config, reference=graph)(flat).graph_module
    assert [kind for kind, _ in fits] == ["attention", "attention", "mlp"] and copy.name in {name for _, name in fits}
    torch.testing.assert_close(logits(refitted), logits(expected), rtol=1e-5, atol=1e-5)


# -- the pass's contract ------------------------------------------------------------------------

def test_pruning_needs_one_plan_per_block():
    graph = capture(build("llama", Shape(layers=2)))
    with pytest.raises(FxflattenError, match="1 block plans for a graph of 2 blocks"):
        PrunePass(CALIB, [BlockPlan(None, None, ())], PruneConfig(target="widened"))(graph)


def test_pruning_refuses_a_parallel_block_ahead_of_any_calibration_run(monkeypatch):
    graph = capture(build("llama", Shape(layers=3)))
    parallel = FlattenPass([[0, 1]])(graph).graph_module  # the parallel form, not fused
    plans = [BlockPlan(2, 48, (0, 1)), BlockPlan(None, None, (2,))]
    calls = []
    monkeypatch.setattr(PrunePass, "call", lambda self, graph_module: calls.append(graph_module))
    with pytest.raises(FxflattenError, match=r"block 0 has 2 attention branches .*FusePass"):
        PrunePass(CALIB, plans, PruneConfig(target="widened"))(parallel)
    assert calls == []


@pytest.mark.parametrize("kv_heads, width, what", [(0, 24, "KV heads"), (3, 24, "KV heads"),
                                                  (1, 0, "MLP of width"), (1, 49, "MLP of width")])
def test_pruning_refuses_widths_outside_zero_to_the_current_width(kv_heads, width, what):
    graph = capture(build("llama", Shape(layers=2, heads=4, kv_heads=2, width=48)))
    plans = [BlockPlan(kv_heads, width, ()), BlockPlan(None, None, ())]
    with pytest.raises(FxflattenError, match=f"block 0: cannot prune .*{what}.*plan between 1 and"):
        PrunePass(CALIB, plans, PruneConfig(target="widened"))(graph)


def test_prune_ensures_every_block_has_its_planned_widths(monkeypatch):
    graph = capture(build("llama", Shape(layers=2, heads=4, kv_heads=2, width=48)))
    plans = [BlockPlan(1, 24, ()), BlockPlan(None, None, ())]
    monkeypatch.setattr(PrunePass, "prune_mlp", lambda self, step: None)  # a broken pass: the MLP stays wide
    with pytest.raises(FxflattenError, match=r"left block 0 with \(KV heads, MLP width\) \(1, 48\) instead of the planned \(1, 24\)"):
        PrunePass(CALIB, plans, PruneConfig(target="widened"))(graph)

