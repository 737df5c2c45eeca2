"""FoldNormsPass: folding the branch norms' scales and shifts into the linears is exact.

Models get non-trivial norm scales and shifts and non-zero biases first (``perturb``), so that
folding changes numbers that matter.
"""

from __future__ import annotations

import pytest
import torch

from fxflatten import discover_blocks
from fxflatten.graph.capture import capture
from fxflatten.passes.fold_norms import FoldNormsPass
from tests.graphs import EXACT, layer_norm_parameters, logits, parameter_count, perturb, pipeline, run
from tests.models import FAMILIES, Shape, build


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
