"""fxflatten.errors: what is not finite is named, down to the weight and so its block."""

import pytest
import torch

from fxflatten.errors import FxflattenError, check_finite, check_parameters_finite
from tests.checkpoints import nan_model, tiny_llama


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_what_is_not_finite(bad):
    check_finite(torch.ones(4), "block 3 MLP covariance")
    values = torch.ones(4)
    values[2] = bad
    with pytest.raises(FxflattenError, match=r"block 3 MLP covariance is not finite \(1 of 4 values"):
        check_finite(values, "block 3 MLP covariance")
    with pytest.raises(FxflattenError, match="held-out perplexity"):
        check_finite(bad, "held-out perplexity")


def test_check_parameters_finite_names_the_weight_and_so_its_block():
    check_parameters_finite(tiny_llama())
    with pytest.raises(FxflattenError, match=r"weight model\.layers\.1\.mlp\.down_proj\.weight is not finite"):
        check_parameters_finite(nan_model())
