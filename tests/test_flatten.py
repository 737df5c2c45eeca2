"""FlattenPass: a group of adjacent blocks becomes one block computing the parallel form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxflatten import FxflattenError, discover_blocks
from fxflatten.graph.capture import capture
from fxflatten.passes.flatten import FlattenPass
from tests.graphs import EXACT, logits, parameter_count, partition, perturb, run, tokens
from tests.models import Shape, build


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
