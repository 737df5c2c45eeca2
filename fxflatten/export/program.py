"""Save and load a rewritten graph as a ``torch.export`` program file.

A model whose blocks are not all of the original shape (widened, or pruned to other widths) is
not a standard Hugging Face checkpoint; its graph is still a complete, runnable program.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule
from transformers import PreTrainedTokenizerBase

from fxflatten.errors import FxflattenError
from fxflatten.graph.capture import MAX_LEN, to_program

PROGRAM_FILE = "model.pt2"


def save_program(gm: GraphModule, directory: Path) -> Path:
    path = Path(directory) / PROGRAM_FILE
    torch.export.save(to_program(gm), path)
    return path


def load_program(path: str | Path) -> GraphModule:
    """Load a saved program (a ``model.pt2`` file or a directory holding one) as a GraphModule."""
    path = Path(path)
    if path.is_dir():
        path = path / PROGRAM_FILE
    if not path.is_file():
        raise FxflattenError(f"{path}: no saved program here; pass a directory written by fxflatten")
    program = torch.export.load(path)
    graph_module = program.module()
    seq = [d for d in program.range_constraints.values()]
    graph_module.meta[MAX_LEN] = max((int(r.upper) for r in seq if r.upper.is_integer), default=8192)
    return graph_module


def load_source(spec: str | Path) -> tuple[nn.Module | GraphModule, PreTrainedTokenizerBase]:
    """A model (``load_model``'s sources) or, for a directory holding only a program, its graph.

    fxflatten writes a program when a result is not a standard checkpoint; such a directory has
    the tokenizer beside ``model.pt2`` but no ``config.json``.
    """
    from transformers import AutoTokenizer

    from fxflatten.load import load_model

    path = Path(spec).expanduser()
    if spec != "default" and path.is_dir() and (path / PROGRAM_FILE).is_file() and not (path / "config.json").is_file():
        return load_program(path), AutoTokenizer.from_pretrained(path)
    return load_model(spec)
