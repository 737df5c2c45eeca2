"""Activations kept on disk instead of in memory while a pass walks the blocks, and giving
freed memory back to the system between steps.

Pruning toward the original model's outputs needs, for every calibration batch, the original
model's own stream and the targets it gives at the current depth, next to the compressed
model's stream. Held in memory, that is several copies of a layer's calibration activations
(each windows x seq_len x hidden x 4 bytes); on disk, only the batch being used is. Each batch
is read back whole once per pass, so the cost is sequential I/O the page cache usually absorbs.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from fxflatten.errors import FxflattenError
from fxflatten.run.runner import SegmentRunner


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


def check_free_space(needed: int) -> None:
    """Refuse to start a pass whose spill (``needed`` bytes) would not fit where :class:`Spill` writes it.

    A spill that fills the disk fails deep into a run, after the hours it took to get there,
    and may take the user's other work down with it; the space is known before the pass starts.
    """
    directory = tempfile.gettempdir()
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise FxflattenError(
            f"pruning spills about {needed / 2**30:.2f} GiB of activations to {directory} (TMPDIR), which has "
            f"{free / 2**30:.2f} GiB free; point TMPDIR at a disk with more room, or pass fewer --samples "
            "or a shorter --seq-len")


class SpilledStream(Sequence[torch.Tensor]):
    """The compressed model's stream between blocks, one file per batch, in memory one batch at a time.

    Between blocks the pass holds every batch's stream; in memory that is a layer's calibration
    activations (windows x seq_len x hidden x 4 bytes). :meth:`batches` puts each batch's
    stream into its environment only while that batch runs; :meth:`store` writes the stream a
    block left back to disk. Indexing loads one batch's stream, for a consumer that reads it
    once (the reference's seed).
    """

    def __init__(self, spill: Spill, runner: SegmentRunner, batches: list[tuple[torch.Tensor, torch.Tensor]],
                 name: str) -> None:
        """Run the prologue on every batch, moving each batch's stream ``name`` to disk as it is made."""
        self.spill = spill
        self.names = [name] * len(batches)
        self.envs = runner.prologue(batches, each=lambda index, env: self.spill.put(f"compressed-{index}", env.pop(name)))

    def store(self, index: int, env: dict[str, object], name: str) -> None:
        """Move batch ``index``'s value ``name`` (the stream a block left) out of ``env`` to disk."""
        self.spill.put(f"compressed-{index}", env.pop(name))
        self.names[index] = name

    def batches(self) -> Iterator[tuple[int, dict[str, object]]]:
        """Each batch's index and environment, its stream loaded under the name it was stored
        with; once the caller moves on, the stream leaves the environment (unless stored anew).

        After the last batch the allocator's free memory goes back to the system: a pass leaves
        heap holes the size of one batch's intermediates, which the step after it (a Gram
        matrix's linear algebra, another pass) would otherwise hold beside its own. Once per
        pass is enough: trimming after every batch lowers the peak no further and costs time
        (benchmarks/results/NOTES.md).
        """
        for index, env in enumerate(self.envs):
            name = self.names[index]
            env[name] = self[index]
            try:
                yield index, env
            finally:
                env.pop(name, None)
        release_free_memory()

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        return self.spill.get(f"compressed-{index}")

    def __len__(self) -> int:
        return len(self.envs)


@functools.cache
def _malloc_trim():
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_free_memory() -> None:
    """Give the allocator's free memory back to the system (glibc); elsewhere do nothing.

    glibc's malloc serves blocks below its mmap threshold (which rises as large
    blocks are freed) from its heaps and keeps what is freed there for later requests. After a
    step that builds and drops a widened block's intermediates the process would hold that
    memory, so its peak would grow with each step after it although the live tensors stay the
    same. ``malloc_trim`` returns the free pages.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
