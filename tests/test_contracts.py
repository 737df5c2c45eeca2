"""Every pass states its contract: ``requires`` refuses what it cannot do before any rewriting,
and ``ensures`` catches a result that breaks the pass's own promise.

A broken result is made by replacing the pass's ``call`` with one that returns the input
unchanged (or rewrites the wrong blocks); the pass must then fail with an FxflattenError
instead of handing the graph on. A refused request must never reach ``call``.
"""

from __future__ import annotations

import functools

import pytest
import torch.nn.functional as F
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

import fxflatten.passes.base as base_module
from fxflatten.errors import FxflattenError
from fxflatten.graph.capture import capture
from fxflatten.graph.discovery import discover_blocks
from fxflatten.passes.base import GraphPass
from fxflatten.passes.flatten import FlattenPass
from fxflatten.passes.fold_norms import FoldNormsPass
from fxflatten.passes.fuse import FusePass
from fxflatten.passes.remove import RemoveBlocksPass
from tests.models import HandWritten, Layer, Shape, build


@functools.cache
def llama() -> GraphModule:
    """A captured three-block tiny Llama; shared, never modified (passes return new graphs)."""
    return capture(build("llama", Shape(layers=3)))


@functools.cache
def llama_folded_pair() -> GraphModule:
    """Blocks 0 and 1 of ``llama()`` flattened and their norms folded: ready to fuse."""
    return FoldNormsPass()(FlattenPass([[0, 1]])(llama()).graph_module).graph_module


def never_called(pass_: GraphPass) -> GraphPass:
    """The pass, with a ``call`` that fails the test: ``requires`` must refuse first."""
    def call(graph_module: GraphModule) -> PassResult:
        pytest.fail(f"{type(pass_).__name__}.call ran although its precondition does not hold")
    pass_.call = call
    return pass_


def returning_input(pass_: GraphPass) -> GraphPass:
    """The pass, with a ``call`` that does nothing: a result that breaks every promise."""
    pass_.call = lambda graph_module: PassResult(graph_module, False)
    return pass_


# -- flatten ----------------------------------------------------------------------------------

@pytest.mark.parametrize("groups, reason", [
    ([[0, 2]], "not a run of adjacent blocks"),
    ([[2, 3]], "outside 0..2"),
    ([[0, 1], [1, 2]], "overlaps"),
])
def test_flatten_requires_disjoint_runs_of_existing_blocks_before_any_rewrite(groups, reason):
    with pytest.raises(FxflattenError, match=reason):
        never_called(FlattenPass(groups))(llama())


def test_flatten_requires_serial_blocks_before_any_rewrite():
    flat = FlattenPass([[0, 1]])(llama()).graph_module
    with pytest.raises(FxflattenError, match="already flattened"):
        never_called(FlattenPass([[0, 1]]))(flat)


def test_flatten_ensures_catches_a_result_with_as_many_blocks():
    with pytest.raises(FxflattenError, match="FlattenPass broke its own contract.*leaves 2 of 3 blocks"):
        returning_input(FlattenPass([[0, 1]]))(llama())


def test_flatten_ensures_catches_the_wrong_group_flattened():
    flatten = FlattenPass([[0, 1]])
    flatten.call = FlattenPass([[1, 2]]).call
    with pytest.raises(FxflattenError, match=r"group \[0, 1\] becomes one block of 2 parallel branches"):
        flatten(llama())


# -- fold_norms -------------------------------------------------------------------------------

class NormReadTwice(Layer):
    """A block whose MLP branch also adds its normalised input: ``fc_out(gelu(fc_in(h))) + h``."""

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        h = self.n2(x)
        return x + (self.fc_out(F.gelu(self.fc_in(h))) + h)


def test_fold_norms_requires_norms_read_only_by_linears_before_any_rewrite():
    shape = Shape(layers=2, kv_heads=4)
    model = HandWritten(shape)
    model.stack[1] = NormReadTwice(shape, layer_norm=False)
    graph = capture(model.eval())
    assert len(discover_blocks(graph).blocks) == 2
    with pytest.raises(FxflattenError, match="norm of block 1's mlp branch also feeds .*not only linears"):
        never_called(FoldNormsPass())(graph)


def test_fold_norms_ensures_catches_a_norm_that_keeps_its_scale():
    with pytest.raises(FxflattenError, match="FoldNormsPass broke its own contract"):
        returning_input(FoldNormsPass())(llama())


def test_fold_norms_ensures_checks_only_parallel_blocks_when_asked_to():
    flat = FlattenPass([[0, 1]])(llama()).graph_module
    result = returning_input(FoldNormsPass(parallel_only=True))(llama())  # no parallel block
    assert result.graph_module is llama()
    with pytest.raises(FxflattenError, match="norms of all parallel blocks lose"):
        returning_input(FoldNormsPass(parallel_only=True))(flat)


# -- fuse -------------------------------------------------------------------------------------

def test_fuse_requires_a_bias_on_the_output_that_receives_the_others_before_any_rewrite():
    shape = Shape(layers=2, kv_heads=4)
    model = build("handwritten", shape)
    model.stack[0].attn.out.register_parameter("bias", None)  # block 1's out keeps its bias
    flat = FlattenPass([[0, 1]])(capture(model)).graph_module
    folded = FoldNormsPass()(flat).graph_module
    with pytest.raises(FxflattenError, match="has no bias but the parallel .* has one.*give .* a zero bias"):
        never_called(FusePass())(folded)


def test_fuse_ensures_catches_a_parallel_block_it_did_not_report():
    fuse = returning_input(FusePass())
    with pytest.raises(FxflattenError, match=r"FusePass broke its own contract.*parallel blocks \[0\]"):
        fuse(llama_folded_pair())


# -- remove -----------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks, reason", [([0, 1, 2], "cannot remove all 3 blocks"), ([1, 3], "0..2"), ([-1], "0..2")])
def test_remove_requires_existing_blocks_and_leaves_one_before_any_rewrite(blocks, reason):
    with pytest.raises(FxflattenError, match=reason):
        never_called(RemoveBlocksPass(blocks))(llama())


def test_remove_ensures_catches_a_result_with_as_many_blocks():
    with pytest.raises(FxflattenError, match="RemoveBlocksPass broke its own contract.*leaves 2 of 3 blocks"):
        returning_input(RemoveBlocksPass([1]))(llama())


# -- what the contracts cost, and that they hold for each graph on its own ----------------------

@pytest.mark.parametrize("pass_, discoveries", [
    (lambda: FlattenPass([[0, 1]]), 2),  # the input, the result
    (lambda: FlattenPass([[0], [1]]), 1),  # nothing to do: the result is the input
    (lambda: FoldNormsPass(), 2),
    (lambda: RemoveBlocksPass([]), 0),
    (lambda: RemoveBlocksPass([2]), 2),  # and its result keeps the promise
], ids=["flatten", "flatten-nothing", "fold", "remove-nothing", "remove"])
def test_a_pass_discovers_each_graph_it_checks_once(pass_, discoveries, monkeypatch):
    calls = []
    discover = base_module.discover_blocks
    monkeypatch.setattr(base_module, "discover_blocks", lambda gm: (calls.append(gm), discover(gm))[1])
    pass_()(llama())
    assert len(calls) == discoveries


def test_one_pass_object_checks_each_graph_against_its_own_input():
    flatten = FlattenPass([[0, 1]])
    flat = flatten(llama()).graph_module
    assert [block.parallel for block in discover_blocks(flat).blocks] == [2, 1]
    with pytest.raises(FxflattenError, match="already flattened"):
        flatten(flat)
    again = flatten(llama()).graph_module
    assert [block.parallel for block in discover_blocks(again).blocks] == [2, 1]
