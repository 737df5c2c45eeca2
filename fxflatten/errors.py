"""The one exception users see, and the checks that raise it on non-finite values.

Every failure that a user can fix (a wrong path, a model we cannot flatten, too little text)
raises :class:`FxflattenError` with a one-line message that says what went wrong and what to do.
The CLI prints that line and exits with status 2; anything else is a bug and keeps its traceback.

A NaN in one weight spreads to every activation after it, then to the calibration statistics,
and a compression built on them is garbage that may still save without complaint. Checking
where values enter (the loaded weights) and where they leave (statistics, held-out loss) turns
that into a one-line error naming the tensor, and so the block, at fault.
"""

from __future__ import annotations

import torch
from torch import nn


class FxflattenError(Exception):
    """A user-facing error whose message is one line saying what to do."""


def check_finite(value: torch.Tensor | float, what: str) -> None:
    """Raise :class:`FxflattenError` naming ``what`` if ``value`` holds a NaN or an Inf."""
    tensor = torch.as_tensor(value)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = tensor.numel() - int(finite.sum())
        raise FxflattenError(
            f"{what} is not finite ({bad} of {tensor.numel()} values are NaN or Inf); the model's "
            "weights may be corrupt, or overflow in half precision (load it in float32)"
        )


def check_parameters_finite(module: nn.Module) -> None:
    """Check every parameter and buffer of ``module``; the error names the first bad one.

    Parameter names carry the layer index (``model.layers.7.mlp.down_proj.weight``), which is
    the block a user has to look at.
    """
    from fxflatten.weights import resident  # weights reports its own errors with FxflattenError

    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point():
            check_finite(resident(tensor.detach()), f"weight {name}")
