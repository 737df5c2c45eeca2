"""A Hugging Face checkpoint's safetensors files, read from their headers alone: which file
holds each tensor, where in it, in what shape and dtype.

Read before any weight is allocated, so that a checkpoint whose index names a missing file,
or whose tensors do not have the shapes its config.json asks for, is refused in one line naming
the file and the tensor: not after a long load, and not as transformers' multi-line load report.
Headers are a few kilobytes per file, whatever the model's size. The same map tells a streamed
model where to read each weight (:class:`fxflatten.weights.FileSlice`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from fxflatten.errors import FxflattenError
from fxflatten.weights import FileSlice

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_REMEDY = "re-download the checkpoint or re-save it with save_pretrained"

#: safetensors dtype names and the torch dtypes they hold.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def stored_tensors(path: Path) -> dict[str, FileSlice] | None:
    """Every tensor of the safetensors checkpoint in directory ``path``, by name; None for a
    checkpoint in another format (``pytorch_model.bin``), which transformers reads on its own."""
    index = path / INDEX
    if index.is_file():
        weight_map = _weight_map(index)
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (path / name).is_file():
                raise FxflattenError(f"{index} names {name}, which is not in {path}; {_REMEDY}")
    elif (path / SINGLE).is_file():
        weight_map, files = {}, [SINGLE]
    else:
        return None
    tensors = {key: tensor for name in files for key, tensor in _read_header(path / name).items()}
    for key, name in weight_map.items():
        if tensors.get(key) is None or tensors[key].file.name != name:
            raise FxflattenError(f"{index} puts {key} in {name}, which does not hold it; {_REMEDY}")
    return tensors


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise FxflattenError(f"{index}: not a safetensors index (no readable weight_map); {_REMEDY}") from error
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FxflattenError(f"{index}: weight_map must map tensor names to file names; {_REMEDY}")
    return weight_map


def _read_header(file: Path) -> dict[str, FileSlice]:
    """The tensors of one safetensors file: an 8-byte length, a JSON header, then the data."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if 8 + length > size:
                raise ValueError(f"a {length}-byte header in a {size}-byte file")
            header = json.loads(handle.read(length))
        slices = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"{key} is stored as {entry['dtype']}, which fxflatten cannot read")
            begin, end = entry["data_offsets"]
            if 8 + length + end > size:
                raise ValueError(f"{key} ends at byte {8 + length + end} of a {size}-byte file")
            slices[key] = FileSlice(file, 8 + length + begin, tuple(entry["shape"]), DTYPES[entry["dtype"]])
        return slices
    except PermissionError:
        raise  # load_model says what to do about an unreadable model
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FxflattenError(f"{file}: cannot read this safetensors file ({reason}); it may be truncated or "
                             f"corrupt: {_REMEDY}") from error


def check_shapes(path: Path, config: PretrainedConfig, tensors: dict[str, FileSlice]) -> None:
    """Refuse a checkpoint holding a tensor whose shape differs from what ``config`` builds.

    The model is built on the meta device (no memory) to learn the shapes. A checkpoint name
    matches a parameter of the same name, or of that name under the base model's prefix
    (GPT-2 checkpoints say ``h.0...`` for ``transformer.h.0...``). Names matching nothing are
    left to the loader, which reports missing and unexpected tensors itself.
    """
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # no causal LM for this config: loading says so in its own words
        return
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "")
    for key, stored in tensors.items():
        want = expected.get(key, expected.get(f"{prefix}.{key}"))
        if want is not None and want != stored.shape:
            raise FxflattenError(
                f"{stored.file}: {key} has shape {list(stored.shape)} but {path / 'config.json'} asks for "
                f"{list(want)}; fix config.json or {_REMEDY}")
