"""flatten() and compress(): groups pruned back to one block, the flattened share of the ratio,
and the real default model end to end."""

import gc
import weakref

import pytest
import torch

from fxflatten import FxflattenError, capture, discover_blocks
from fxflatten.export.hf import check_same_logits, to_pretrained
from fxflatten.graph.params import get_tensor
from fxflatten.pipeline import compress, flatten
from fxflatten.plans import BlockPlan, PruneConfig
from fxflatten.tables import block_rows
from tests.graphs import CALIB
from tests.graphs import ids_logits as logits
from tests.models import Shape, build


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
