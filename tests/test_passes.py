"""Graph passes: flatten is the parallel form, fold_norms and fuse are exact, and all compose.

Every comparison is between two graphs run on the same tokens, in float32. Models get
non-trivial norm scales and shifts and non-zero biases first, so that folding and bias merging
change numbers that matter.
"""

from __future__ import annotations

import functools
import re
import weakref
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_manager import PassManager

import fxflatten.passes.fuse as fuse_module
from fxflatten import FxflattenError, discover_blocks
from fxflatten.graph.capture import capture, recapture
from fxflatten.graph.params import get_tensor
from fxflatten.passes.flatten import FlattenPass
from fxflatten.passes.fold_norms import FoldNormsPass
from fxflatten.passes.fuse import FusePass
from fxflatten.plans import group_removes
from fxflatten.selection import greedy_groups, hidden_similarity
from tests.models import FAMILIES, NO_GQA, VOCAB, Shape, build

# Float32 tolerances for "exact" rewrites. Fold and flatten reorder a few roundings; fuse turns
# G matmuls plus adds into one matmul G times as long. Measured on 40+ random configs: at most
# 5e-7 absolute and 4e-7 relative to the largest logit (logits here are 0.1 to 3 in size).
EXACT = dict(rtol=1e-5, atol=1e-6)
ONNX = dict(rtol=1e-4, atol=1e-4)
#: (o_proj has a bias, down_proj has a bias) for families that always have them; Llama's come
#: from its attention_bias / mlp_bias switches, the other families have none.
OUTPUT_BIASES = {"gpt2": (True, True), "handwritten": (True, True), "handwritten_layernorm": (True, True)}


# -- helpers ----------------------------------------------------------------------------------

def tokens(batch: int = 2, length: int = 11, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random token ids; the last row is left-padded by ``pad`` positions."""
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))
    mask = torch.ones_like(ids)
    mask[-1, :pad] = 0
    return ids, mask


@torch.no_grad()
def logits(gm: GraphModule, batch: int = 2, length: int = 11, pad: int = 0) -> torch.Tensor:
    """Logits at the positions every row can see (after the padding)."""
    return gm(*tokens(batch, length, pad))[:, pad:]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "rmsnorm" in type(module).__name__.lower()


def in_layer(name: str) -> bool:
    """Module names inside a numbered layer (``model.layers.3.mlp``), not the final norm."""
    return re.search(r"\.\d+(\.|$)", name) is not None


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Norm scales around 1 +- 0.5, norm shifts and every bias around 0 +- 0.3."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if is_norm(module):
            module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def layer_norm_parameters(model: nn.Module) -> int:
    """Parameters of the norms in front of the branches: all norms but the final one."""
    return sum(
        parameter.numel() for name, module in model.named_modules() if is_norm(module) and in_layer(name)
        for parameter in module.parameters()
    )


def run(pass_, gm: GraphModule) -> GraphModule:
    return pass_(gm).graph_module


def partition(layers: int, groups: list[list[int]]) -> list[list[int]]:
    """All blocks as units after flattening ``groups``: the groups and the blocks left alone."""
    starts = {group[0]: group for group in groups}
    units, index = [], 0
    while index < layers:
        unit = starts.get(index, [index])
        units.append(unit)
        index += len(unit)
    return units


# -- fold_norms -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fold_norms_is_exact_and_removes_every_branch_norm_affine(family):
    model = perturb(build(family, Shape(layers=2)))
    graph = capture(model)
    result = FoldNormsPass()(graph)
    assert result.modified
    torch.testing.assert_close(logits(result.graph_module), logits(graph), **EXACT)
    for block in discover_blocks(result.graph_module).blocks:
        for branch in block.branches:
            assert branch.norm is not None and (branch.norm.weight, branch.norm.bias) == (None, None)
    # Linears behind a LayerNorm shift all have a bias already: nothing is created.
    assert parameter_count(result.graph_module) == parameter_count(graph) - layer_norm_parameters(model)


def test_fold_norms_creates_a_bias_where_a_norm_shift_feeds_a_linear_without_one():
    shape = Shape(layers=2)
    model = perturb(build("handwritten_layernorm", shape))
    for layer in model.stack:
        layer.attn.query.bias = None
        layer.fc_in.bias = None
    graph = capture(model)
    folded = run(FoldNormsPass(), graph)
    torch.testing.assert_close(logits(folded), logits(graph), **EXACT)
    # The new bias nodes carry shape metadata like every other node, for passes that read it.
    assert all("val" in node.meta for node in folded.graph.nodes if node.op in ("get_attr", "call_function"))
    created = shape.layers * (shape.heads * shape.head_dim + shape.width)
    assert parameter_count(folded) == parameter_count(graph) - layer_norm_parameters(model) + created


def test_fold_norms_of_a_folded_graph_changes_nothing():
    folded = pipeline("llama").folded
    result = FoldNormsPass()(folded)
    assert not result.modified and result.graph_module is folded


# -- flatten ----------------------------------------------------------------------------------

def test_flatten_of_single_block_groups_is_the_identity():
    graph = capture(build("llama", Shape(layers=3)))
    for groups in ([], [[0]], [[0], [1], [2]]):
        result = FlattenPass(groups)(graph)
        assert not result.modified and result.graph_module is graph


@pytest.mark.parametrize("groups, reason", [
    ([[0, 2]], "not a run of adjacent blocks"),
    ([[2, 3]], "outside"),
    ([[0, 1], [1, 2]], "overlaps"),
])
def test_flatten_refuses_groups_that_are_not_disjoint_runs_of_existing_blocks(groups, reason):
    graph = capture(build("handwritten", Shape(layers=3)))
    with pytest.raises(FxflattenError, match=reason):
        FlattenPass(groups)(graph)


def test_flatten_refuses_a_block_that_is_already_flattened():
    flat = run(FlattenPass([[0, 1]]), capture(build("handwritten", Shape(layers=3))))
    with pytest.raises(FxflattenError, match="already flattened"):
        FlattenPass([[0, 1]])(flat)


@pytest.mark.parametrize("family, first", [("llama", 0), ("llama", 1), ("phi3", 1), ("gpt2", 1), ("handwritten", 1)])
def test_flatten_of_a_pair_leaves_one_block_with_two_parallel_layers(family, first):
    graph = capture(build(family, Shape(layers=3)))
    flat = run(FlattenPass([[first, first + 1]]), graph)
    blocks = discover_blocks(flat).blocks
    assert [block.parallel for block in blocks] == [2 if index == first else 1 for index in range(2)]
    pair = blocks[first]
    for offset, (attention, mlp) in enumerate(zip(pair.attention, pair.mlp)):
        # Each parallel branch is still its own layer's, with its own weights.
        layer = f".{first + offset}."
        assert layer in attention.attention.o.weight and layer in mlp.mlp.down.weight
    assert parameter_count(flat) == parameter_count(graph)


def attention_branch(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer.attn(layer.n1(x))


def mlp_branch(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer.fc_out(F.gelu(layer.fc_in(layer.n2(x))))


@torch.no_grad()
def parallel_by_hand(model: nn.Module, ids: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """The hand-written model with each group in parallel form:
    ``h = x + sum Attn_i(N1_i(x)); y = h + sum MLP_i(N2_i(h))``; serial elsewhere."""
    x = model.embed(ids)
    for unit in partition(len(model.stack), groups):
        layers = [model.stack[index] for index in unit]
        h = x
        for layer in layers:
            h = h + attention_branch(layer, x)
        y = h
        for layer in layers:
            y = y + mlp_branch(layer, h)
        x = y
    return model.head(model.final(x))


@pytest.mark.parametrize("family", ["handwritten", "handwritten_layernorm"])
@pytest.mark.parametrize("groups", [[[1, 2]], [[0, 1, 2]], [[0, 1], [2, 3]]])
def test_flatten_computes_the_parallel_form(family, groups):
    model = perturb(build(family, Shape(layers=4)))
    flat = run(FlattenPass(groups), capture(model))
    ids, _ = tokens()
    expected = parallel_by_hand(model, ids, groups)
    torch.testing.assert_close(logits(flat), expected, **EXACT)
    # Not vacuous: the parallel form is measurably different from the serial model.
    assert (expected - parallel_by_hand(model, ids, [])).abs().max() > 1e-2


# -- fuse -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FuseCase:
    family: str
    shape: Shape
    groups: list[list[int]]
    attention_bias: bool = False
    mlp_bias: bool = False

    def model(self) -> nn.Module:
        model = build(self.family, self.shape)
        if self.attention_bias or self.mlp_bias:  # only Llama offers these switches
            config = model.config
            config.attention_bias, config.mlp_bias = self.attention_bias, self.mlp_bias
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(config).eval()
        return perturb(model)

    @property
    def output_biases(self) -> int:
        """How many of (o_proj, down_proj) carry a bias: the biases that add when fused."""
        return sum(OUTPUT_BIASES.get(self.family, (self.attention_bias, self.mlp_bias)))


@st.composite
def fuse_cases(draw, families: list[str]) -> FuseCase:
    family = draw(st.sampled_from(families))
    layers = draw(st.integers(2, 4))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([4, 8]))
    hidden = heads * draw(st.sampled_from([4, 8]))
    shape = Shape(layers, heads, kv_heads, head_dim, hidden, draw(st.integers(4, 24)))
    # Cut the layers into runs of adjacent blocks; at least one run has two or more.
    cuts = draw(st.lists(st.booleans(), min_size=layers - 1, max_size=layers - 1).filter(lambda c: not all(c)))
    units, unit = [], [0]
    for index, cut in enumerate(cuts, start=1):
        if cut:
            units.append(unit)
            unit = []
        unit.append(index)
    groups = [group for group in units + [unit] if len(group) > 1]
    biases = draw(st.tuples(st.booleans(), st.booleans())) if family == "llama" else (False, False)
    return FuseCase(family, shape, groups, *biases)


def check_fuse_is_exact(case: FuseCase) -> None:
    graph = capture(case.model())
    flat = run(FlattenPass(case.groups), graph)
    folded = run(FoldNormsPass(), flat)
    fuse = FusePass()
    result = fuse(folded)
    assert result.modified and fuse.skipped == {}
    torch.testing.assert_close(logits(result.graph_module), logits(flat), **EXACT)
    torch.testing.assert_close(logits(result.graph_module, pad=3), logits(flat, pad=3), **EXACT)

    block_map = discover_blocks(result.graph_module)
    units = partition(case.shape.layers, case.groups)
    assert len(block_map.blocks) == len(units)
    kv_heads = case.shape.heads if case.family in NO_GQA else case.shape.kv_heads
    for block, unit in zip(block_map.blocks, units):
        size = len(unit)
        attention, mlp = block.attention[0].attention, block.mlp[0].mlp
        assert block.parallel == 1
        assert (attention.num_heads, attention.num_kv_heads, attention.head_dim) == (
            size * case.shape.heads, size * kv_heads, case.shape.head_dim)
        assert mlp.width == size * case.shape.width

    # Widening keeps every weight; only the G output biases of a stage add up into one.
    merged = sum(len(group) - 1 for group in case.groups) * case.output_biases * block_map.hidden_size
    assert parameter_count(flat) == parameter_count(graph)
    assert parameter_count(result.graph_module) == parameter_count(folded) - merged


SLOW_EXAMPLES = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3"])
@SLOW_EXAMPLES
@given(data=st.data())
def test_fuse_is_exact_and_widens_heads_and_mlp_by_the_group_size(family, data):
    check_fuse_is_exact(data.draw(fuse_cases([family])))


@settings(SLOW_EXAMPLES, max_examples=3)
@given(case=fuse_cases(["mistral", "handwritten", "handwritten_layernorm"]))
def test_fuse_is_exact_on_the_other_families(case):
    check_fuse_is_exact(case)


def test_fuse_of_a_group_of_three_with_llama_biases_is_exact():
    check_fuse_is_exact(FuseCase("llama", Shape(layers=4, heads=4, kv_heads=2), [[1, 2, 3]], True, True))


def test_fuse_refuses_unfolded_norms_and_leaves_the_blocks_parallel():
    flat = run(FlattenPass([[0, 1]]), capture(perturb(build("llama", Shape(layers=3)))))
    fuse = FusePass()
    result = fuse(flat)
    assert not result.modified and result.graph_module is flat
    assert list(fuse.skipped) == [0] and "not folded" in fuse.skipped[0]
    assert [block.parallel for block in discover_blocks(result.graph_module).blocks] == [2, 1]


def test_fuse_of_a_graph_without_parallel_blocks_changes_nothing():
    graph = pipeline("llama").graph
    fuse = FusePass()
    result = fuse(graph)
    assert not result.modified and result.graph_module is graph and fuse.skipped == {}


# -- composition, re-export, ONNX -------------------------------------------------------------

@dataclass
class Profiler:
    """One model through every pass, with what the inputs looked like before any pass ran."""

    model: nn.Module
    graph: GraphModule
    model_state: dict[str, torch.Tensor]
    graph_parameters: dict[str, torch.Tensor]
    graph_logits: torch.Tensor
    flat: GraphModule
    folded: GraphModule
    fused: GraphModule


GROUPS = [[1, 2]]


@functools.cache
def pipeline(family: str) -> Profiler:
    model = perturb(build(family, Shape(layers=3)))
    graph = capture(model)
    model_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    graph_parameters = {name: tensor.clone() for name, tensor in graph.named_parameters()}
    graph_logits = logits(graph)
    flat = run(FlattenPass(GROUPS), graph)
    folded = run(FoldNormsPass(), flat)
    fused = run(FusePass(), folded)
    return Profiler(model, graph, model_state, graph_parameters, graph_logits, flat, folded, fused)


@pytest.mark.parametrize("stage", ["flat", "folded", "fused"])
def test_every_pass_output_exports_again_with_dynamic_batch_and_length(stage):
    gm = getattr(pipeline("llama"), stage)
    again = recapture(gm)
    for batch, length in [(1, 5), (3, 9)]:
        torch.testing.assert_close(logits(again, batch, length), logits(gm, batch, length), **EXACT)


def test_passes_compose_in_a_pass_manager_and_leave_their_input_untouched():
    profiler = pipeline("llama")
    result = PassManager(passes=[FlattenPass(GROUPS), FoldNormsPass(), FusePass()])(profiler.graph)
    assert result.modified
    assert [block.parallel for block in discover_blocks(result.graph_module).blocks] == [1, 1]
    torch.testing.assert_close(logits(result.graph_module), logits(profiler.fused), rtol=0, atol=0)
    # Neither the pass manager nor the passes run one by one touched the graph or the model.
    assert dict(profiler.graph.named_parameters()).keys() == profiler.graph_parameters.keys()
    for name, parameter in profiler.graph.named_parameters():
        assert torch.equal(parameter, profiler.graph_parameters[name]), name
    torch.testing.assert_close(logits(profiler.graph), profiler.graph_logits, rtol=0, atol=0)
    state = profiler.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in profiler.model_state.items())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_graph_exports_to_onnx_and_runs_in_onnxruntime(family, tmp_path):
    pytest.importorskip("onnxruntime")
    from fxflatten.export import ort, to_onnx

    fused = pipeline(family).fused
    session = ort.session(to_onnx(fused, tmp_path / f"{family}.onnx").path)
    for batch, length in [(2, 11), (3, 6)]:
        ids, mask = tokens(batch, length)
        (out,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), logits(fused, batch, length), **ONNX)


# -- greedy_groups ----------------------------------------------------------------------------

def similarity(layers: int, high: dict[tuple[int, int], float], base: float = 0.5) -> torch.Tensor:
    """A symmetric (layers + 1)^2 similarity matrix: ``base`` everywhere but ``high``."""
    matrix = torch.full((layers + 1, layers + 1), base)
    matrix.fill_diagonal_(1.0)
    for (i, j), value in high.items():
        matrix[i, j] = matrix[j, i] = value
    return matrix


BLOCKS = [100] * 6  # six blocks of 100 parameters in a model of 1000


def test_greedy_groups_merges_the_most_similar_adjacent_pair_first():
    sim = similarity(6, {(0, 1): 0.8, (3, 4): 0.95, (4, 5): 0.9})
    assert greedy_groups(sim, BLOCKS, 1000, ratio=0.1) == ([[3, 4]], 100)


def test_greedy_groups_never_removes_more_than_the_ratio():
    sim = similarity(6, {(0, 1): 0.8, (2, 3): 0.85, (4, 5): 0.9})
    for ratio, expected in [(0.05, []), (0.1, [[4, 5]]), (0.25, [[2, 3], [4, 5]]), (0.3, [[0, 1], [2, 3], [4, 5]])]:
        groups, removed = greedy_groups(sim, BLOCKS, 1000, ratio)
        assert groups == expected and removed <= ratio * 1000
    # Unequal blocks: a group removes its parameters less one mean-sized block (rounded down).
    groups, removed = greedy_groups(similarity(2, {(0, 1): 0.9}), [100, 51], 1000, ratio=0.1)
    assert (groups, removed) == ([[0, 1]], 151 - 151 // 2)
    assert greedy_groups(similarity(2, {(0, 1): 0.9}), [100, 51], 1000, ratio=0.07) == ([], 0)


def test_hidden_similarity_is_the_mean_cosine_of_the_streams_entering_each_block():
    model = build("llama", Shape(layers=4))
    windows = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = model(windows, output_hidden_states=True).hidden_states[:4]  # the last has the final norm
    unit = [F.normalize(h.flatten(0, 1), dim=-1) for h in states]
    expected = torch.tensor([[float((a * b).sum(-1).mean()) for b in unit] for a in unit])
    # Batches of 4 over 6 windows: the sums run over uneven batches, one at a time.
    got = hidden_similarity(capture(model), windows, batch_size=4, max_tokens=10_000)
    torch.testing.assert_close(got[:4, :4], expected, atol=1e-5, rtol=1e-5)
    # A token budget of two windows samples evenly spaced windows 0 and 5.
    sampled = hidden_similarity(capture(model), windows, max_tokens=32)
    ends = [F.normalize(h[[0, 5]].flatten(0, 1), dim=-1) for h in states]
    torch.testing.assert_close(sampled[0, 3], (ends[0] * ends[3]).sum(-1).mean(), atol=1e-5, rtol=1e-5)


def test_greedy_groups_with_a_wider_width_merges_more_groups_for_the_same_ratio():
    sim = similarity(6, {(0, 1): 0.8, (3, 4): 0.95, (4, 5): 0.9})
    # Pruned back to 1.5 blocks, a pair removes half a block: two pairs for 10% of the model.
    assert greedy_groups(sim, BLOCKS, 1000, ratio=0.1, width=1.5) == ([[0, 1], [3, 4]], 100)


@given(
    similarities=st.lists(st.floats(0, 1), min_size=12 * 12, max_size=12 * 12),
    ratio=st.floats(0.05, 0.6),
    width=st.floats(1.0, 1.9),
)
def test_greedy_groups_never_overshoots_the_ratio_at_any_width(similarities, ratio, width):
    sim = torch.tensor(similarities).reshape(12, 12)  # greedy_groups reads entries [i, j] with i < j < 12
    parameters = [100] * 12
    groups, removed = greedy_groups(sim, parameters, 1500, ratio, width=width)
    assert removed == sum(group_removes([100] * len(g), width) for g in groups)
    assert removed <= ratio * 1500


def test_greedy_groups_grows_a_group_only_when_its_far_end_similarity_is_highest():
    # After [3, 4], extending to 5 scores cos(x_3, x_5) and to 2 scores cos(x_2, x_4).
    grows = similarity(6, {(3, 4): 0.95, (3, 5): 0.9, (0, 1): 0.85, (2, 4): 0.6})
    assert greedy_groups(grows, BLOCKS, 1000, ratio=0.2) == ([[3, 4, 5]], 200)
    stays = similarity(6, {(3, 4): 0.95, (3, 5): 0.8, (0, 1): 0.85, (2, 4): 0.6})
    assert greedy_groups(stays, BLOCKS, 1000, ratio=0.2) == ([[0, 1], [3, 4]], 200)
    # The pair score of the neighbours (x_4 vs x_5) does not count once 4 is in a group.
    ignores_pair = similarity(6, {(3, 4): 0.95, (4, 5): 0.94, (3, 5): 0.3, (0, 1): 0.85})
    assert greedy_groups(ignores_pair, BLOCKS, 1000, ratio=0.2)[0] == [[0, 1], [3, 4]]


def test_greedy_groups_respects_max_group():
    sim = similarity(6, {(3, 4): 0.95, (3, 5): 0.9, (2, 5): 0.88, (0, 1): 0.7})
    assert greedy_groups(sim, BLOCKS, 1000, ratio=0.3) == ([[2, 3, 4, 5]], 300)
    assert greedy_groups(sim, BLOCKS, 1000, ratio=0.3, max_group=3) == ([[0, 1], [3, 4, 5]], 300)
    # With pairs only, nothing is left to merge after [0, 1] and [3, 4]: it stops short of the ratio.
    assert greedy_groups(sim, BLOCKS, 1000, ratio=0.3, max_group=2) == ([[0, 1], [3, 4]], 200)


def test_parallel_error_of_a_pair_is_its_measured_deviation_from_the_serial_blocks():
    from fxflatten.selection import parallel_error

    model = build("handwritten", Shape(layers=3))
    windows = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    errors = parallel_error(capture(model), windows, batch_size=2)
    with torch.no_grad():
        x = model.embed(windows)
        a, b = model.stack[0], model.stack[1]
        serial = b(a(x))
        h = x + a.attn(a.n1(x)) + b.attn(b.n1(x))
        parallel = h + a.fc_out(F.gelu(a.fc_in(a.n2(h)))) + b.fc_out(F.gelu(b.fc_in(b.n2(h))))
        expected = (parallel - serial).double().pow(2).sum() / (serial - x).double().pow(2).sum()
    assert errors.shape == (2,)
    torch.testing.assert_close(errors[0].double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_a_consuming_fuse_frees_each_stage_parallel_weights_once_fused_and_fuses_the_same(family, monkeypatch):
    profiler = pipeline(family)
    folded = run(FoldNormsPass(), run(FlattenPass(GROUPS), profiler.graph))
    block = next(block for block in discover_blocks(folded).blocks if len(block.attention) > 1)
    names = {name for name, _ in folded.named_parameters()}
    # The second branch's q weight: folding made it, so only the folded graph holds it.
    second = weakref.ref(get_tensor(folded, block.attention[1].attention.q.linear.weight))
    freed = []  # before each stage is fused: is the first stage's second branch gone?
    fuse_stage = fuse_module.fuse_stage
    monkeypatch.setattr(fuse_module, "fuse_stage", lambda *args: (freed.append(second() is None), fuse_stage(*args)))
    fused = run(FusePass(consume=True), folded)
    assert freed == [False, True]  # the attention stage, then the MLP stage
    torch.testing.assert_close(logits(fused), logits(profiler.fused), **EXACT)
    left = {name for name, _ in folded.named_parameters()}
    assert left == {name for name, _ in fused.named_parameters()} and len(left) < len(names)
