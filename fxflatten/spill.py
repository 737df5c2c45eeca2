"""Per-batch activations kept on disk instead of in memory while pruning.

Pruning toward the original model's outputs needs, for every calibration batch, the original
model's own stream and the targets it gives at the current depth, next to the compressed
model's stream. Held in memory, that is four copies of a layer's calibration activations
(0.6 GiB for 128 x 512 tokens of a 576-wide model, 16 GiB for 128 x 2048 tokens of a 4096-wide
one); on disk, only the batch being used is. Each batch is read back whole once per
pass, so the cost is sequential I/O the page cache usually absorbs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


class Spill:
    """Tensors by key in a temporary directory, removed by :meth:`close` (use it as a context manager)."""

    def __init__(self) -> None:
        self.temporary = tempfile.TemporaryDirectory(prefix="fxflatten-spill-", ignore_cleanup_errors=True)
        self.directory = Path(self.temporary.name)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        torch.save(tensor.contiguous(), self.directory / f"{key}.pt")

    def get(self, key: str) -> torch.Tensor:
        return torch.load(self.directory / f"{key}.pt", weights_only=True)

    def close(self) -> None:
        self.temporary.cleanup()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

