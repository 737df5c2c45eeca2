"""Write a Hugging Face model as sharded safetensors, one tensor in memory at a time.

``save_pretrained`` gathers a whole shard in memory before writing it, and converting a model
to the output dtype first (``model.to(bf16)``) makes a second copy of every weight. A streamed
model holds no weights at all, so this writer lays out every shard's header from the tensors'
shapes alone, then reads, converts and appends one tensor at a time; a streamed tensor the
passes left untouched, already in the output dtype, is copied from its source file byte for byte
(``os.copy_file_range``) without passing through memory. The files are standard:
``model.safetensors`` for one shard, else ``model-0000i-of-0000n.safetensors`` and the index
``model.safetensors.index.json``, with the config and generation config beside them, so
``AutoModelForCausalLM.from_pretrained`` reads them as it reads its own.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from fxflatten.shards import DTYPES, INDEX, SINGLE
from fxflatten.weights import FileSlice, StreamedTensor

#: Most bytes of tensor data per shard.
SHARD_BYTES = 4 << 30
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_checkpoint(model: PreTrainedModel, directory: Path, dtype: torch.dtype, shard_bytes: int = SHARD_BYTES,
                     progress: bool = False) -> None:
    """Save ``model``'s config and weights (floating point ones in ``dtype``) into ``directory``.

    Tied weights are written once, under the first name the state dict gives them (the input
    embedding), as ``save_pretrained`` does; non-persistent buffers are not written.
    """
    tensors, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor
    shards = _plan(tensors, dtype, shard_bytes)
    files = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = tqdm(total=len(tensors), desc="writing checkpoint", unit="tensor", disable=not progress)
    for file, names in zip(files, shards):
        _write_shard(directory / file, {name: tensors[name] for name in names}, dtype, bar)
    bar.close()
    if len(shards) > 1:
        total = sum(_out_dtype(t, dtype).itemsize * t.numel() for t in tensors.values())
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(directory)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(directory)


def _out_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype


def _plan(tensors: dict[str, torch.Tensor], dtype: torch.dtype, shard_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into shards of at most ``shard_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = _out_dtype(tensor, dtype).itemsize * tensor.numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype, bar: tqdm) -> None:
    """One safetensors file: the header from shapes alone, then each tensor's bytes in turn."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        out = _out_dtype(tensor, dtype)
        nbytes = out.itemsize * tensor.numel()
        header[name] = {"dtype": _NAMES[out], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors.values():
            if _copyable(tensor, dtype):
                _copy(tensor.source, handle)
                bar.update()
                continue
            value = tensor.materialize() if isinstance(tensor, StreamedTensor) else tensor.detach()
            value = value.to(device="cpu", dtype=_out_dtype(tensor, dtype)).contiguous()
            if value.numel():
                handle.write(memoryview(value.view(torch.uint8).numpy()))
            del value
            bar.update()


def _copyable(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``tensor`` is a whole file entry already stored as it is to be written."""
    return (isinstance(tensor, StreamedTensor) and tensor.source.dtype == _out_dtype(tensor, dtype)
            and tensor.source.shape == tuple(tensor.shape))


def _copy(source: FileSlice, handle) -> None:
    """Append ``source``'s bytes to ``handle`` in the kernel, file to file.

    Where the kernel cannot copy between these files (another filesystem on an old kernel), the
    rest goes through memory.
    """
    handle.flush()
    done = 0
    with open(source.file, "rb") as stored:
        try:
            while done < source.nbytes:
                got = os.copy_file_range(stored.fileno(), handle.fileno(), source.nbytes - done, source.offset + done)
                if got == 0:
                    break
                done += got
        except OSError:
            pass
    handle.seek(0, os.SEEK_END)
    if done < source.nbytes:
        handle.write(memoryview(source.read().view(torch.uint8).numpy().reshape(-1))[done:])
