"""PrunePass and compress(): exact when keeping everything, shapes right when pruning, HF output."""

import gc
import json
import tempfile
import weakref

import networkx as nx
import pytest
import torch
from transformers import AutoModelForCausalLM

import fxflatten.passes.prune as prune_pass
from fxflatten import FxflattenError, capture, discover_blocks
from fxflatten.cli import main
from fxflatten.export.hf import check_same_logits, to_pretrained
from fxflatten.graph.discovery import block_boundaries
from fxflatten.graph.fx import linear_input, to_digraph
from fxflatten.graph.params import get_tensor, weight
from fxflatten.leastsq import add_gram, prune_by_error, ridge_leverage, ridge_solve
from fxflatten.passes.prune import PrunePass
from fxflatten.passes.reference import Reference
from fxflatten.passes.refit import Moments
from fxflatten.pipeline import compress, flatten
from fxflatten.plans import BlockPlan, PruneConfig, plan_blocks, split_plans, units_of
from fxflatten.run.runner import SegmentRunner, batches_of, segments
from fxflatten.run.spill import Spill, SpilledStream
from fxflatten.tables import block_rows
from tests.models import Shape, build

CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))


def logits(graph):
    return graph(IDS, torch.ones_like(IDS))


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "qwen2"])
def test_pruning_that_keeps_everything_is_exact(family):
    flat = flatten(capture(build(family, Shape(layers=3))), groups=[[0, 1]])
    layout = discover_blocks(flat.graph).blocks[0]
    attention, mlp = layout.attention[0].attention, layout.mlp[0].mlp
    plans = [BlockPlan(attention.num_kv_heads, mlp.width, (0, 1)), BlockPlan(None, None, (2,))]
    result = PrunePass(CALIB, plans, PruneConfig(target="widened"))(flat.graph)
    torch.testing.assert_close(logits(result.graph_module), logits(flat.graph), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "qwen2", "handwritten"])
@pytest.mark.parametrize("target", ["trajectory", "serial", "widened"])
def test_compress_prunes_each_group_back_to_one_block(family, target):
    shape = Shape(layers=4)
    graph = capture(build(family, shape))
    result = compress(graph, calib=CALIB, groups=[[1, 2]], config=PruneConfig(target=target))
    before, after = block_rows(discover_blocks(graph)), block_rows(discover_blocks(result.graph))
    assert len(after) == 3
    assert {(r["heads"], r["kv_heads"], r["mlp_width"]) for r in after} == {(r["heads"], r["kv_heads"], r["mlp_width"]) for r in before}
    assert torch.isfinite(logits(result.graph)).all()
    # Blocks outside the group are untouched: block 0 feeds the first stream value identically.
    assert result.plans[0] == BlockPlan(None, None, (0,))


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


def test_units_keep_block_order():
    assert units_of([[1, 2], [4, 5, 6]], 8) == [(0,), (1, 2), (3,), (4, 5, 6), (7,)]


def test_ridge_leverage_ranks_a_dominant_channel_first_and_leaves_the_moments_alone():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0))
    x[:, 3] *= 20
    gram = x.T @ x
    before = gram.clone()
    assert int(ridge_leverage(gram).argmax()) == 3
    torch.testing.assert_close(gram, before, rtol=0, atol=0)


@pytest.mark.parametrize("channels, block", [(7, 768), (10, 3), (12, 4), (9, 1)])
def test_ridge_leverage_in_blocks_is_the_diagonal_of_c_over_c_plus_lambda(channels, block):
    x = torch.randn(200, channels, generator=torch.Generator().manual_seed(channels)) * torch.linspace(0.1, 3, channels)
    gram = x.T @ x
    lam = 10 * gram.diagonal().mean()
    expected = (gram.double() @ torch.linalg.inv(gram.double() + lam * torch.eye(channels, dtype=torch.float64))).diagonal()
    torch.testing.assert_close(ridge_leverage(gram, block=block).double(), expected, rtol=1e-4, atol=1e-5)


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


def test_error_pruning_keeps_the_channels_the_target_reads():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 20, dtype=torch.float64, generator=generator)
    x[:, 7] *= 30  # the most energetic channel, but the target does not read it
    w = torch.zeros(20, 3, dtype=torch.float64)
    w[[2, 5, 11]] = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    y = x @ w + 3.0
    with_bias = torch.cat([x, torch.ones(2000, 1, dtype=torch.float64)], 1)
    keep = prune_by_error(with_bias.T @ with_bias, with_bias.T @ y, 3, 1e-6, always=torch.tensor([20]))
    assert keep.tolist() == [2, 5, 11]
    assert int(ridge_leverage(x.T @ x).argmax()) == 7  # leverage alone would keep channel 7


def test_statistics_with_a_nan_stop_with_an_error_naming_the_block():
    moments = Moments(with_bias=False)
    moments.add(torch.tensor([[1.0, float("nan")], [0.5, 2.0]]), None)
    with pytest.raises(FxflattenError, match="block 3: MLP statistics is not finite"):
        moments.check("block 3: MLP statistics")


def test_ridge_solve_recovers_a_linear_map_and_grows_the_ridge_when_singular():
    x = torch.randn(400, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solution, ridge = ridge_solve(x.T @ x, x.T @ (x @ w), 1e-9)
    torch.testing.assert_close(solution, w, rtol=1e-4, atol=1e-4)
    singular = torch.zeros(4, 4, dtype=torch.float64)
    singular[0, 0] = 1.0
    _, grown = ridge_solve(singular, torch.ones(4, 1, dtype=torch.float64), 0.0)
    assert grown > 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3", "mistral"])
def test_compressed_model_is_written_as_a_standard_checkpoint(family, tmp_path):
    model = build(family, Shape(layers=4))
    graph = capture(model)
    result = compress(graph, calib=CALIB, groups=[[1, 2]])
    pretrained = to_pretrained(result.graph, model, discover_blocks(graph))
    assert check_same_logits(result.graph, pretrained) < 1e-5
    pretrained.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS, use_cache=False).logits, logits(result.graph), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share, layers", [(0.0, 4), (0.2, 3)])
def test_a_flattened_share_leaves_the_rest_of_the_ratio_to_width_pruning(share, layers):
    graph = capture(build("llama", Shape(layers=4, heads=4, kv_heads=2, width=96)))
    dense_map = discover_blocks(graph)
    groups = [[1, 2]] if share else None
    result = compress(graph, ratio=0.4, calib=CALIB, groups=groups, flatten_share=share)
    rows = block_rows(discover_blocks(result.graph))
    assert len(rows) == layers
    singles = [row for row, plan in zip(rows, result.plans) if len(plan.origin) == 1]
    assert all(row["mlp_width"] < 96 for row in singles)  # the blocks outside the groups are narrower
    removed = 1 - discover_blocks(result.graph).total_parameters / dense_map.total_parameters
    assert removed == pytest.approx(0.4, abs=0.02)  # the whole ratio, within a few channels
    assert torch.isfinite(logits(result.graph)).all()


def test_a_flattened_share_chooses_only_the_groups_that_fit_in_it():
    graph = capture(build("llama", Shape(layers=6, heads=4, kv_heads=2, width=96)))
    dense_map = discover_blocks(graph)
    block = dense_map.blocks[0].parameters / dense_map.total_parameters
    result = compress(graph, ratio=3 * block, calib=CALIB, flatten_share=1.5 * block)
    assert len(result.groups) == 1 and len(result.groups[0]) == 2  # one pair fits in the share, two do not
    removed = 1 - discover_blocks(result.graph).total_parameters / dense_map.total_parameters
    assert removed == pytest.approx(3 * block, abs=0.02)


def test_a_flattened_share_above_the_ratio_is_refused():
    with pytest.raises(FxflattenError, match="flattened share"):
        compress(capture(build("llama", Shape(layers=4))), ratio=0.2, calib=CALIB, flatten_share=0.3)


def test_split_plans_prune_nothing_else_when_the_groups_take_the_whole_ratio():
    dense_map = discover_blocks(capture(build("llama", Shape(layers=4))))
    ratio = dense_map.blocks[1].parameters / dense_map.total_parameters
    assert split_plans(dense_map, [[1, 2]], ratio) == plan_blocks(dense_map, [[1, 2]])
    widths = {plan.width for plan in split_plans(dense_map, [[1, 2]], 2 * ratio) if len(plan.origin) == 1}
    assert len(widths) == 1 and widths.pop() < dense_map.blocks[0].mlp[0].mlp.width  # spread evenly


def test_a_wider_result_is_refused_as_a_checkpoint():
    model = build("llama", Shape(layers=4))
    graph = capture(model)
    result = compress(graph, calib=CALIB, groups=[[1, 2]], width=1.5)
    with pytest.raises(FxflattenError, match="wider or narrower"):
        to_pretrained(result.graph, model, discover_blocks(graph))


def test_compress_command_writes_a_checkpoint_and_report(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    source = {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir() if p.is_file()}
    args = ["compress", str(tiny_llama_dir), "--ratio", "0.3", "--out", str(out), "--calib", str(tiny_llama_dir / "config.json"),
            "--samples", "4", "--seq-len", "32", "--eval-text", str(tiny_llama_dir / "config.json"), "--eval-windows", "2"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "huggingface" and report["layers"]["after"] < report["layers"]["before"]
    assert 0 < report["ratio"]["achieved"] <= 0.3
    assert report["prune"]["config"]["refit_inputs"] is True
    # Each of compress's steps has its own time and memory, beside loading and evaluating.
    assert {"load", "capture", "select", "flatten", "prune", "evaluate"} <= report["steps"].keys()
    assert all(stage["seconds"] > 0 and stage["peak_rss_mib"] > 0 for stage in report["steps"].values())
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == report["layers"]["after"]
    assert {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir() if p.is_file()} == source
    assert main(args) == 2  # the output exists: refused without --force
    assert "already exists" in capsys.readouterr().err


def test_compress_command_with_no_flattened_share_width_prunes_into_a_program(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    args = ["compress", str(tiny_llama_dir), "--ratio", "0.3", "--flatten-share", "0", "--no-input-refit", "--out", str(out),
            "--calib", str(tiny_llama_dir / "config.json"), "--samples", "4", "--seq-len", "32",
            "--eval-text", str(tiny_llama_dir / "config.json"), "--eval-windows", "2"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["flatten_share"] == 0 and report["groups"] == []
    assert report["prune"]["config"]["refit_inputs"] is False
    assert report["layers"]["after"] == report["layers"]["before"]
    assert report["ratio"]["achieved"] == pytest.approx(0.3, abs=0.03)
    assert report["format"] == "torch.export" and (out / "model.pt2").is_file()
    assert "flatten" not in report["steps"]  # nothing to flatten, so the flatten passes do not run


@pytest.mark.slow
def test_compress_default_model_end_to_end(default_model, tmp_path):
    """The real model: a standard checkpoint with fewer layers whose logits match the graph."""
    model, tokenizer = default_model
    from fxflatten.text import calibration_windows

    calib = calibration_windows(tokenizer, None, 8, 128)
    graph = capture(model)
    dense_map = discover_blocks(graph)
    result = compress(graph, ratio=0.1, calib=calib)
    compressed_map = discover_blocks(result.graph)
    assert len(compressed_map.blocks) == 30 - sum(len(g) - 1 for g in result.groups) < 30
    assert 0.05 < 1 - compressed_map.total_parameters / dense_map.total_parameters <= 0.1
    pretrained = to_pretrained(result.graph, model, dense_map)
    assert check_same_logits(result.graph, pretrained) < 1e-4
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), load_source_again(model)))


def load_source_again(model):
    """The default model as loaded fresh, to check compress left the shared one untouched."""
    from fxflatten.load import load_model

    return load_model("default")[0].parameters()


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


@pytest.mark.parametrize("columns", [1, 5, 13, 64])
@pytest.mark.parametrize("pieces", [1, 3, 4])
def test_add_gram_is_x_transpose_x_accumulated_in_place(columns, pieces):
    x = torch.randn(50, columns, generator=torch.Generator().manual_seed(columns))
    total = add_gram(None, x, pieces)
    assert total is add_gram(total, 2 * x, pieces) and total.dtype == torch.float32
    torch.testing.assert_close(total.double(), 5 * x.double().T @ x.double(), rtol=1e-5, atol=1e-4)


def test_without_input_refits_a_merged_block_keeps_its_input_projections():
    """refit_inputs=False is the previous behaviour: with every head and channel kept and no
    output refit to make, the serial target leaves the widened block's weights as they were."""
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


def test_flatten_returns_the_only_holder_of_its_widened_weights():
    """A consuming prune frees a widened block's weights as it goes only if nothing else holds
    them, not even a graph of flatten's own waiting for the cycle collector."""
    graph = capture(build("llama", Shape(layers=3)))
    gc.disable()
    try:
        flat = flatten(graph, groups=[[0, 1]])
        name = discover_blocks(flat.graph).blocks[0].mlp[0].mlp.down.weight
        widened = weakref.ref(get_tensor(flat.graph, name))
        owner, leaf = name.rsplit(".", 1)
        delattr(flat.graph.get_submodule(owner), leaf)
        assert widened() is None
    finally:
        gc.enable()


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
