"""Least squares: ridge leverage, ridge solves, pruning by error and accumulated Gram matrices."""

import pytest
import torch

from fxflatten.leastsq import add_gram, prune_by_error, ridge_leverage, ridge_solve


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


def test_ridge_solve_recovers_a_linear_map_and_grows_the_ridge_when_singular():
    x = torch.randn(400, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solution, ridge = ridge_solve(x.T @ x, x.T @ (x @ w), 1e-9)
    torch.testing.assert_close(solution, w, rtol=1e-4, atol=1e-4)
    singular = torch.zeros(4, 4, dtype=torch.float64)
    singular[0, 0] = 1.0
    _, grown = ridge_solve(singular, torch.ones(4, 1, dtype=torch.float64), 0.0)
    assert grown > 0


@pytest.mark.parametrize("columns", [1, 5, 13, 64])
@pytest.mark.parametrize("pieces", [1, 3, 4])
def test_add_gram_is_x_transpose_x_accumulated_in_place(columns, pieces):
    x = torch.randn(50, columns, generator=torch.Generator().manual_seed(columns))
    total = add_gram(None, x, pieces)
    assert total is add_gram(total, 2 * x, pieces) and total.dtype == torch.float32
    torch.testing.assert_close(total.double(), 5 * x.double().T @ x.double(), rtol=1e-5, atol=1e-4)
