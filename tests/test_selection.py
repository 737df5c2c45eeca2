"""Group selection: greedy adjacent groups within the ratio, and the similarities they rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fxflatten.graph.capture import capture
from fxflatten.plans import group_removes
from fxflatten.selection import greedy_groups, hidden_similarity
from tests.models import VOCAB, Shape, build


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
