"""Models whose weights stay in their checkpoint: built without weights, captured, and bound to
the safetensors files that hold them.

:func:`skeleton` builds the model with its parameters on the meta device (its buffers, such as
rotary tables, are real: they are computed, not stored) and records where its checkpoint is.
:func:`fxflatten.graph.capture.capture` exports such a model with stand-ins whose memory is never
touched and calls :func:`bind_checkpoint`, which makes every parameter of the graph a
:class:`~fxflatten.weights.StreamedTensor` reading its tensor from the checkpoint. From there on
the graph is an ordinary captured graph: passes read and rewrite its weights one op at a time,
rewritten weights go to a scratch store on disk (:func:`fxflatten.graph.params.set_tensor`), and
re-exports swap stand-ins in and out again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from fxflatten.errors import FxflattenError
from fxflatten.weights import STORE, FileSlice, ScratchStore, StreamedTensor

#: Attribute of a skeleton model holding its :class:`Checkpoint`.
CHECKPOINT = "fxflatten_checkpoint"


@dataclass(frozen=True)
class Checkpoint:
    """Where a skeleton's weights are (each tensor by its checkpoint name), and the device and dtype
    its graph computes in."""

    path: Path
    tensors: dict[str, FileSlice]
    device: torch.device
    dtype: torch.dtype


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers where they are made."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:  # a meta one is being tied: keep it the same object
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(path: Path, tensors: dict[str, FileSlice] | None, config: PretrainedConfig, dtype: torch.dtype,
             device: torch.device) -> PreTrainedModel:
    """The model of ``config`` without weights (meta parameters, real buffers on ``device``),
    remembering that its weights are ``tensors`` (:func:`fxflatten.shards.stored_tensors` of ``path``)."""
    if tensors is None:
        raise FxflattenError(f"{path}: --stream reads safetensors checkpoints; re-save this one with save_pretrained "
                             "(safe_serialization) or run without --stream")
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, buffer in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        module.register_buffer(leaf, buffer.to(device), persistent=leaf not in module._non_persistent_buffers_set)
    setattr(model, CHECKPOINT, Checkpoint(path, tensors, device, dtype))
    return model.eval()


def checkpoint_of(model: nn.Module) -> Checkpoint | None:
    """The checkpoint a :func:`skeleton` streams from; None for a model holding its weights."""
    return getattr(model, CHECKPOINT, None)


def bind_checkpoint(graph: GraphModule, model: PreTrainedModel, originals: dict[int, nn.Parameter]) -> None:
    """Make every parameter of ``graph`` (captured from the skeleton ``model`` with stand-ins
    ``originals``) a streamed tensor reading its tensor from the checkpoint.

    A parameter goes by every name the skeleton gives it (tied embeddings have two, and a
    checkpoint may keep either), with or without the base model's prefix (GPT-2 checkpoints
    say ``h.0...`` for ``transformer.h.0...``).
    """
    checkpoint = checkpoint_of(model)
    slices = checkpoint.tensors
    prefix = getattr(model, "base_model_prefix", "")
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    graph.meta[STORE] = ScratchStore()
    bound: dict[int, nn.Parameter] = {}  # by the id of its stand-in: tied names stay one parameter
    for target, standin in list(graph.named_parameters(remove_duplicate=False)):
        if id(standin) not in bound:
            choices = names[id(originals[id(standin)])]
            key = next((k for name in choices for k in (name, name.removeprefix(f"{prefix}.")) if k in slices), None)
            if key is None:
                raise FxflattenError(f"{checkpoint.path} holds no tensor for {choices[0]}: the checkpoint does not match "
                                     "config.json; re-download it or re-save it with save_pretrained")
            bound[id(standin)] = nn.Parameter(StreamedTensor(slices[key], checkpoint.dtype, checkpoint.device),
                                              requires_grad=False)
        owner, _, leaf = target.rpartition(".")
        graph.get_submodule(owner)._parameters[leaf] = bound[id(standin)]
