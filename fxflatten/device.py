"""Where the work runs and in which precision: ``--device`` and ``--dtype``.

A model is compressed where its statistics are cheapest to compute (a GPU when one is
visible) and in the precision its checkpoint was saved in there (bf16 for most models people
compress), while the statistics themselves (Gram matrices, cross terms, leverages, solves)
accumulate in float32 or float64 whatever the model runs in. On a CPU, float32 is the default:
CPUs run bf16 matrix products no faster, and the default model's checks are float32 ones.
The checkpoint written at the end is in the source's own dtype either way.
"""

from __future__ import annotations

import torch
from torch import nn

from fxflatten.errors import FxflattenError

#: ``--dtype`` names and the dtypes they select ("auto" is resolved by :func:`compute_dtype`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when a GPU is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``,
    checked against the GPUs this process can see."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise FxflattenError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from error
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise FxflattenError(f"--device {spec!r}: fxflatten runs on the CPU or on CUDA GPUs; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise FxflattenError(f"--device {spec}: no CUDA GPU is visible to this process (check CUDA_VISIBLE_DEVICES "
                             "and that torch is a CUDA build); use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise FxflattenError(f"--device {spec}: this process sees {count} GPU(s), numbered 0 to {count - 1}")
    return device


def compute_dtype(spec: str, device: torch.device, source: torch.dtype) -> torch.dtype:
    """The dtype the model runs in: ``auto`` is the checkpoint's own on a GPU and float32 on a CPU."""
    if spec == "auto":
        return source if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise FxflattenError(f"--dtype {spec!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's (a graph's) first parameter or buffer; the CPU if it has none."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
