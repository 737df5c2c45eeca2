"""Weights that stay on disk: a graph parameter that is read from its file each time an op uses it.

A model larger than memory cannot be held whole, but every step of fxflatten uses one block's
weights at a time. A :class:`StreamedTensor` is a tensor with a shape, dtype and device and no
storage: any op it takes part in reads it (from a checkpoint's safetensors shard, or from the
scratch file a pass wrote it to), converts it to the compute dtype and device, runs, and lets
the copy go. So a captured graph whose parameters are streamed runs, is rewritten by the passes
and is written out like any other, and only the weights of the op running are resident.

Reads go through ``os.pread`` into fresh buffers rather than a memory map: the page cache keeps
recently read shards fast without counting in the process's resident memory, and nothing of a
shard stays mapped after the read. :data:`RESIDENT` counts the bytes of streamed weights
materialised at once, which tests and benchmarks read to prove the whole model never was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_map_only

from fxflatten.errors import FxflattenError

#: GraphModule.meta key of a streamed graph's :class:`ScratchStore`.
STORE = "fxflatten_store"

@dataclass
class ResidentBytes:
    """Bytes of streamed weights materialised now, and the most there ever were at once."""

    now: int = 0
    peak: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, tensor: torch.Tensor) -> None:
        size = tensor.untyped_storage().nbytes()
        with self._lock:
            self.now += size
            self.peak = max(self.peak, self.now)
        weakref.finalize(tensor, self._sub, size)  # the storage's Python object is made afresh on each call

    def _sub(self, size: int) -> None:
        with self._lock:
            self.now -= size

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.now


#: Every streamed read in this process.
RESIDENT = ResidentBytes()


@dataclass(frozen=True)
class FileSlice:
    """Raw tensor bytes at ``offset`` in ``file``: a safetensors entry or a scratch file."""

    file: Path
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    #: What must outlive the file (the scratch store that deletes it when freed).
    owner: object = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize

    def read(self) -> torch.Tensor:
        buffer = bytearray(self.nbytes)
        fd = os.open(self.file, os.O_RDONLY)
        try:
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                got = os.preadv(fd, [view[done:]], self.offset + done)
                if got == 0:
                    raise FxflattenError(f"{self.file} ends before the tensor at byte {self.offset + done}: "
                                         "the file was truncated while in use; run again on a complete checkpoint")
                done += got
        finally:
            os.close(fd)
        if not buffer:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(buffer, dtype=self.dtype).reshape(self.shape)


class StreamedTensor(torch.Tensor):
    """A parameter that lives in a file and is read, in ``dtype`` on ``device``, for each op using it."""

    source: FileSlice

    @staticmethod
    def __new__(cls, source: FileSlice, dtype: torch.dtype, device: torch.device) -> StreamedTensor:
        tensor = torch.Tensor._make_wrapper_subclass(cls, source.shape, dtype=dtype, device=device, requires_grad=False)
        tensor.source = source
        return tensor

    def __repr__(self) -> str:
        return f"StreamedTensor({self.source.file.name}@{self.source.offset}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def materialize(self) -> torch.Tensor:
        value = self.source.read().to(device=self.device, dtype=self.dtype)
        RESIDENT.add(value)
        return value

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default or func is torch.ops.aten.alias.default:
            (tensor,) = args
            return StreamedTensor(tensor.source, tensor.dtype, tensor.device)
        # One read per tensor, however often it appears (``eq(t, t)``, which ``isfinite`` becomes).
        read: dict[int, torch.Tensor] = {}

        def materialize(tensor: StreamedTensor) -> torch.Tensor:
            if id(tensor) not in read:
                read[id(tensor)] = tensor.materialize()
            return read[id(tensor)]

        args, kwargs = tree_map_only(StreamedTensor, materialize, (args, kwargs or {}))
        read.clear()
        return func(*args, **kwargs)

    def __deepcopy__(self, memo) -> StreamedTensor:
        return StreamedTensor(self.source, self.dtype, self.device)


class ScratchStore:
    """Where a streamed graph's rewritten weights go: one file per tensor in a directory of TMPDIR.

    Folding, fusing and pruning make new weights; in a streamed graph they are written here
    and installed as :class:`StreamedTensor`, so the merged blocks waiting to be pruned do not
    pile up in memory. A file goes when the last tensor reading it is freed, the directory when
    the store is.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fxflatten-weights-"))
        self._count = 0
        self._lock = threading.Lock()
        weakref.finalize(self, shutil.rmtree, self.root, True)

    def put(self, value: torch.Tensor) -> StreamedTensor:
        with self._lock:
            self._count += 1
            file = self.root / f"{self._count}.bin"
        host = value.detach().contiguous().cpu()
        with open(file, "wb") as handle:
            if host.numel():
                handle.write(memoryview(host.view(torch.uint8).numpy()))
        source = FileSlice(file, 0, tuple(host.shape), host.dtype, self)
        # A weight a later pass replaces is deleted once nothing reads it: the scratch holds the
        # weights of the graphs alive, not every version each pass made.
        weakref.finalize(source, file.unlink, True)
        return StreamedTensor(source, value.dtype, value.device)


@contextlib.contextmanager
def standins(module: nn.Module, device: torch.device) -> Iterator[dict[int, nn.Parameter]]:
    """Swap every meta or streamed parameter of ``module`` for an untouched empty tensor, and back.

    Yields the originals by the id of their stand-in (tied parameters share one), so that
    :func:`bind` can put them into the graph that export makes from the stand-ins.
    ``torch.export`` traces with fake copies of the parameters and never reads them, but it
    cannot take meta tensors beside real inputs, nor tensor subclasses. An empty tensor on the
    CPU is address space the kernel backs only once written, so this costs no memory there;
    on a GPU it is allocated for as long as the export runs.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    made: dict[int, nn.Parameter] = {}  # id of an original -> its stand-in
    originals: dict[int, nn.Parameter] = {}  # id of a stand-in -> the original
    for owner in module.modules():
        for leaf, param in list(owner._parameters.items()):
            if param is None or not (param.is_meta or isinstance(param, StreamedTensor)):
                continue
            standin = made.get(id(param))
            if standin is None:
                standin = made[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                                                         requires_grad=False)
                originals[id(standin)] = param
            owner._parameters[leaf] = standin
            swapped.append((owner, leaf, param))
    try:
        yield originals
    finally:
        for owner, leaf, param in swapped:
            owner._parameters[leaf] = param


def bind(graph: GraphModule, originals: dict[int, nn.Parameter]) -> None:
    """Put back the parameters :func:`standins` replaced, in the graph export made from them."""
    for owner in graph.modules():
        for leaf, param in list(owner._parameters.items()):
            if param is not None and id(param) in originals:
                owner._parameters[leaf] = originals[id(param)]


def resident(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with its values in memory: a streamed one is read once, for several ops to use.

    Each op on a :class:`StreamedTensor` reads it anew, and an op the dispatcher decomposes
    (``isfinite`` into ``eq``, ``abs`` and ``ne``) reads it once per part.
    """
    return tensor.materialize() if isinstance(tensor, StreamedTensor) else tensor
