"""A Hugging Face checkpoint's safetensors files, read from their headers alone: which file
holds each tensor, in what shape and dtype.

Read before any weight is allocated, so that a checkpoint whose index names a missing file,
or whose tensors do not have the shapes its config.json asks for, is refused in one line naming
the file and the tensor: not after a long load, and not as transformers' multi-line load report.
Headers are a few kilobytes per file, whatever the model's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig

from fxflatten.errors import FxflattenError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_REMEDY = "re-download the checkpoint or re-save it with save_pretrained"


@dataclass(frozen=True)
class StoredTensor:
    """Where a checkpoint tensor lives and what its header says it is."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # the safetensors name: "BF16", "F32", ...


def stored_tensors(path: Path) -> dict[str, StoredTensor] | None:
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


def _read_header(file: Path) -> dict[str, StoredTensor]:
    try:
        with safe_open(file, framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            return {key: StoredTensor(file, tuple(s.get_shape()), s.get_dtype()) for key, s in slices.items()}
    except PermissionError:
        raise  # load_model says what to do about an unreadable model
    except Exception as error:  # safetensors reports a bad header as its own error type
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FxflattenError(f"{file}: cannot read this safetensors file ({reason}); it may be truncated or "
                             f"corrupt: {_REMEDY}") from error


def check_shapes(path: Path, config: PretrainedConfig, tensors: dict[str, StoredTensor]) -> None:
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
