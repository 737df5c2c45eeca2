"""The training-free peers the quality benchmark compares with (benchmarks/baselines): ReplaceMe
and LinearPatch remove a span of blocks and bridge it with one fitted linear map."""

import pytest
import torch

from benchmarks.baselines.linearpatch import PatchSpanPass, hadamard, patch_span
from benchmarks.baselines.replaceme import fit_lstsq, replace_span
from benchmarks.baselines.span import closest_span, span_activations
from fxflatten import capture, discover_blocks
from fxflatten.passes.remove import RemoveBlocksPass
from tests.models import VOCAB, Shape, llama


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    graph = capture(llama(Shape(layers=6)).eval())
    windows = torch.randint(VOCAB, (6, 24))
    similarity = torch.eye(7) * 0.5 + 0.5
    similarity[2, 4] = 0.99  # blocks 2..3 have the closest ends: the span to remove
    return graph, windows, similarity


def span_error(graph, windows, start, count, transform=None):
    """Squared error of bridging the span: M T + Y against the stream the span leaves."""
    acts = span_activations(graph, windows, start, count)
    mlp_out = acts.mlp_out if transform is None else acts.mlp_out @ transform
    return float((mlp_out + acts.mlp_residual - acts.stream_after).pow(2).sum())


def test_the_span_is_the_one_whose_ends_are_closest_and_never_starts_at_block_0(setup):
    _, _, similarity = setup
    assert closest_span(similarity, 2) == 2
    similarity = similarity.clone()
    similarity[0, 2] = 1.0
    assert closest_span(similarity, 2) != 0


def test_span_activations_add_up_to_the_stream_entering_the_span(setup):
    graph, windows, _ = setup
    acts = span_activations(graph, windows, 2, 2)
    assert acts.mlp_out.shape == acts.stream_after.shape == (6 * 24, 32)
    entering = span_activations(graph, windows, 2, 0).stream_after
    torch.testing.assert_close(acts.stream_before, entering)


@pytest.mark.parametrize("objective", ["lstsq", "cosine"])
def test_replaceme_removes_the_span_and_folds_its_map_into_the_previous_down_projection(setup, objective):
    graph, windows, similarity = setup
    replaced, start = replace_span(graph, windows, similarity, 2, objective)
    assert start == 2 and len(discover_blocks(replaced).blocks) == 4
    assert sum(p.numel() for p in replaced.parameters()) == sum(p.numel() for p in RemoveBlocksPass([2, 3])(graph).graph_module.parameters())
    removed = RemoveBlocksPass([2, 3])(graph).graph_module
    ids = windows[:2]
    assert not torch.allclose(replaced(ids, torch.ones_like(ids)), removed(ids, torch.ones_like(ids)))


def test_replaceme_least_squares_bridges_the_span_better_than_removing_it(setup):
    graph, windows, _ = setup
    acts = span_activations(graph, windows, 2, 2)
    transform = fit_lstsq(acts.mlp_out, acts.stream_after - acts.mlp_residual)
    assert span_error(graph, windows, 2, 2, transform) < span_error(graph, windows, 2, 2)


def test_the_folded_down_projection_computes_the_fitted_map_of_the_mlp_output(setup):
    graph, windows, similarity = setup
    acts = span_activations(graph, windows, 2, 2)
    transform = fit_lstsq(acts.mlp_out, acts.stream_after - acts.mlp_residual)
    replaced, _ = replace_span(graph, windows, similarity, 2)
    leaving = span_activations(replaced, windows, 2, 0).stream_after  # the stream block 1 leaves
    torch.testing.assert_close(leaving, acts.mlp_out @ transform + acts.mlp_residual, atol=1e-4, rtol=1e-4)


def test_the_patch_rotation_is_orthogonal_for_any_width():
    for d in (8, 12, 576):
        h = hadamard(d)
        torch.testing.assert_close(h @ h.T, torch.eye(d), atol=1e-5, rtol=0)
        assert h.abs().max() < 3 / d**0.5  # spread: no entry dominates a column


def test_linearpatch_adds_one_patch_matrix_and_removes_the_span(setup):
    graph, windows, similarity = setup
    patched, start = patch_span(graph, windows, similarity, 2)
    removed = RemoveBlocksPass([2, 3])(graph).graph_module
    assert start == 2 and len(discover_blocks(patched).blocks) == 4
    extra = sum(p.numel() for p in patched.parameters()) - sum(p.numel() for p in removed.parameters())
    assert extra == 32 * 32


def test_an_identity_patch_computes_what_removing_the_span_computes(setup):
    graph, windows, _ = setup
    patched = PatchSpanPass(2, 2, torch.eye(32))(graph).graph_module
    removed = RemoveBlocksPass([2, 3])(graph).graph_module
    ids = windows[:2]
    torch.testing.assert_close(patched(ids, torch.ones_like(ids)), removed(ids, torch.ones_like(ids)))

