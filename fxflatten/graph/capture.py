"""Capture a language model as a graph with `torch.export`.

Every later step works on the GraphModule this returns: an unlifted program (parameters are
`get_attr` nodes named as in the model, prefixed by ``model.``) whose inputs are
``input_ids, attention_mask`` with dynamic batch and sequence dimensions and whose output is the
logits. `torch.fx.symbolic_trace` cannot trace Hugging Face models any more; `torch.export`
(non-strict) can, and it records `nn_module_stack` on every node, which maps graph results back
to the model's own module and parameter names.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn
from torch.export import Dim

from fxflatten.device import device_of
from fxflatten.errors import FxflattenError
from fxflatten.stream import bind_checkpoint, checkpoint_of
from fxflatten.weights import STORE, bind, standins

log = logging.getLogger(__name__)

#: Prefix that parameter targets in a captured graph carry in front of the model's own names.
PARAM_PREFIX = "model."
#: GraphModule.meta key holding the longest sequence the graph was exported for.
MAX_LEN = "fxflatten_max_len"


class LogitsOnly(nn.Module):
    """Calls a causal LM as ``logits = f(input_ids, attention_mask)`` and nothing else.

    Hugging Face models get ``use_cache=False`` (a cache would add outputs and mutable state to
    the graph); plain modules get the mask only if their forward takes one.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters
        self._takes_mask = "attention_mask" in params
        self._takes_cache = "use_cache" in params

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self._takes_mask:
            kwargs["attention_mask"] = attention_mask
        if self._takes_cache:
            kwargs["use_cache"] = False
        out = self.model(input_ids, **kwargs)
        if isinstance(out, torch.Tensor):
            return out
        if getattr(out, "logits", None) is not None:
            return out.logits
        if isinstance(out, (tuple, list)) and isinstance(out[0], torch.Tensor):
            return out[0]
        raise FxflattenError(
            f"the model returned {type(out).__name__}, not logits: wrap it so that "
            "forward(input_ids) returns a (batch, seq, vocab) tensor"
        )


def vocab_size_of(model: nn.Module) -> int:
    """The vocabulary size, from the config if there is one, else from the input embedding."""
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if size:
        return int(size)
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings().num_embeddings
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.num_embeddings
    raise FxflattenError("cannot tell the vocabulary size: the model has no config and no nn.Embedding")


def example_inputs(model: nn.Module, batch: int = 2, seq_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and an all-ones mask on the model's device, batch >= 2 so that export
    keeps batch dynamic."""
    return random_tokens(vocab_size_of(model), batch, seq_len, device_of(model))


def max_positions_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 8192


def capture(model: nn.Module, *, batch: int = 2, seq_len: int = 16) -> torch.fx.GraphModule:
    """Export ``model`` to a GraphModule ``logits = gm(input_ids, attention_mask)``.

    Batch and sequence length are dynamic; the example used for tracing has ``batch`` rows of
    ``seq_len`` random tokens. The model is neither modified nor copied: the graph's parameters
    are the model's own tensors, so passes that rewrite weights must replace them, not edit
    them in place. A model from ``load_model(..., stream=True)`` is captured without reading its
    weights, and the graph streams them from the checkpoint (:mod:`fxflatten.stream`).
    """
    if model.training:
        raise FxflattenError("the model is in training mode: call model.eval() before capture")
    checkpoint = checkpoint_of(model)
    if checkpoint is None and any(p.is_meta for p in model.parameters()):
        raise FxflattenError("the model has weights on the meta device: load them first, or load the model with "
                             "load_model(..., stream=True) to stream them from its checkpoint")
    with standins(model, checkpoint.device if checkpoint else device_of(model)) as originals:
        args = example_inputs(model, batch, seq_len)
        graph_module = export_logits(LogitsOnly(model).eval(), args, max(max_positions_of(model), seq_len),
                                     type(model).__name__).module()
    if checkpoint is not None:
        bind_checkpoint(graph_module, model, originals)
    graph_module.meta[MAX_LEN] = max(max_positions_of(model), seq_len)
    log.info("captured %s: %d graph nodes", type(model).__name__, len(graph_module.graph.nodes))
    return graph_module


def recapture(graph_module: torch.fx.GraphModule, *, batch: int = 2, seq_len: int = 16) -> torch.fx.GraphModule:
    """Export a (rewritten) captured graph again, which re-checks it and refreshes its metadata.

    Passes that change shapes leave stale shape metadata on the nodes they touch; exporting the
    result anew recomputes every node's metadata and fails loudly if the rewrite is inconsistent.
    Streamed weights are exported as stand-ins and put back, never read.
    """
    with standins(graph_module, device_of(graph_module)) as originals:
        program = to_program(graph_module, batch, seq_len)
    rewritten = program.module()
    bind(rewritten, originals)
    for key in (MAX_LEN, STORE):
        if key in graph_module.meta:
            rewritten.meta[key] = graph_module.meta[key]
    return rewritten


def to_program(graph_module: torch.fx.GraphModule, batch: int = 2, seq_len: int = 16) -> torch.export.ExportedProgram:
    """The ExportedProgram of a captured graph, e.g. to ``torch.export.save`` it."""
    args = graph_example_inputs(graph_module, batch, seq_len)
    return export_logits(graph_module, args, graph_module.meta[MAX_LEN], "the rewritten graph")


def graph_example_inputs(graph_module: torch.fx.GraphModule, batch: int = 2, seq_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Example inputs for a captured graph: token ids below its embedding table's size."""
    tables = [
        node.args[0] for node in graph_module.graph.nodes
        if node.op == "call_function" and getattr(node.target, "overloadpacket", None) is torch.ops.aten.embedding
    ]
    vocab = min((graph_module.get_parameter(table.target).shape[0] for table in tables if table.op == "get_attr"), default=2)
    return random_tokens(int(vocab), batch, seq_len, device_of(graph_module))


def random_tokens(vocab: int, batch: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random token ids below ``vocab`` and an all-ones mask, on ``device``.

    Drawn on the CPU, so that a graph gets the same examples wherever it runs.
    """
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator).to(device)
    return input_ids, torch.ones_like(input_ids)


def export_logits(module: nn.Module, args: tuple[torch.Tensor, torch.Tensor], max_len: int, what: str) -> torch.export.ExportedProgram:
    batch_dim = Dim("batch", min=1, max=4096)
    seq_dim = Dim("seq", min=2, max=max_len)
    dims = {0: batch_dim, 1: seq_dim}
    try:
        program = torch.export.export(module, args, dynamic_shapes=(dims, dims), strict=False)
    except FxflattenError:
        raise
    except Exception as error:  # torch.export raises many types; the first line is the useful one
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FxflattenError(f"torch.export could not capture {what}: {first} (run with --debug for the traceback)") from error
    return program
