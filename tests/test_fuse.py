"""FusePass: a flattened, folded block's parallel layers become one wider layer, exactly.

Every comparison is between two graphs run on the same tokens, in float32, on models with
non-trivial norms and non-zero biases (``perturb``), so that bias merging changes numbers that
matter.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxflatten.passes.fuse as fuse_module
from fxflatten import discover_blocks
from fxflatten.graph.capture import capture
from fxflatten.graph.params import get_tensor
from fxflatten.passes.flatten import FlattenPass
from fxflatten.passes.fold_norms import FoldNormsPass
from fxflatten.passes.fuse import FusePass
from tests.graphs import EXACT, GROUPS, FuseCase, fuse_cases, logits, parameter_count, partition, perturb, pipeline, run
from tests.models import NO_GQA, Shape, build


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
