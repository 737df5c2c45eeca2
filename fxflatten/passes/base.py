"""What every fxflatten pass shares: the torch.fx pass shape, and checks that run the graph.

A pass is a :class:`torch.fx.passes.infra.pass_base.PassBase`: ``requires`` checks its
preconditions, ``call`` rewrites and returns ``PassResult(graph_module, modified)``, ``ensures``
checks the result. Unlike the base class we check the graph module ``call`` returned: our
passes never mutate their input (its tensors belong to the user's model), they return a new
graph module, re-exported so that every node's metadata is fresh.
"""

from __future__ import annotations

import copy
import gc
import logging

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from fxflatten.errors import FxflattenError
from fxflatten.graph.capture import graph_example_inputs, recapture
from fxflatten.run.spill import release_free_memory

log = logging.getLogger(__name__)


class GraphPass(PassBase):
    """Base of all fxflatten passes: lint and run the graph before and after the rewrite."""

    def __call__(self, graph_module: GraphModule) -> PassResult:
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)
        return result

    def requires(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()

    def ensures(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()
        check_runs(graph_module, type(self).__name__)


def check_runs(graph_module: GraphModule, who: str) -> None:
    """Run the graph on a small batch; its logits must have the right shape and be finite."""
    input_ids, mask = graph_example_inputs(graph_module, batch=2, seq_len=5)
    with torch.no_grad():
        logits = graph_module(input_ids, mask)
    if logits.shape[:2] != input_ids.shape:
        raise FxflattenError(f"{who} produced a graph whose logits have shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise FxflattenError(f"{who} produced a graph whose logits are not finite")


def editable_copy(graph_module: GraphModule) -> GraphModule:
    """A graph module with its own graph and module tree but the same tensors.

    Rewriting its graph or replacing its parameters leaves ``graph_module`` untouched; the
    tensors are shared until a pass replaces them, so copying costs no weight memory.
    """
    copied = GraphModule(graph_module, copy.deepcopy(graph_module.graph))
    copied.meta.update(graph_module.meta)
    return copied


def finish(graph_module: GraphModule, reexport: bool = True) -> GraphModule:
    """Clean up a rewritten graph and export it again (fresh metadata, re-checked).

    Parameters that no node reads any more (folded norm scales, fused-away branches) are
    deleted, so parameter counts and saved checkpoints reflect the rewritten model. A pass
    that leaves every node's shape as it was (rewiring, weight folding) may skip the re-export
    (``reexport=False``): its metadata is still true, and the re-export is the costliest step
    of a pass (about 15 s on a 135M-parameter model). The graph still runs in ``ensures``.
    """
    drop_dead(graph_module)
    graph_module.graph.lint()
    graph_module.recompile()
    return recapture(graph_module) if reexport else graph_module


def drop_dead(graph_module: GraphModule) -> None:
    """Remove the nodes nothing reads and the parameters and buffers no node reads any more."""
    # Export's dtype assertions and eval-mode dropouts count as side effects and would keep
    # alive every branch a pass has cut off; a re-export adds the assertions anew.
    graph_module.graph.eliminate_dead_code(is_impure_node=lambda node: node.op in ("placeholder", "output"))
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in list(graph_module.named_parameters()) + list(graph_module.named_buffers()):
        if name not in used:
            owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            delattr(graph_module.get_submodule(owner), leaf)


def run_passes(graph_module: GraphModule, passes: list[PassBase]) -> GraphModule:
    """Run ``passes`` in a torch ``PassManager``, letting a user error through as itself.

    The pass manager re-raises whatever a pass raises as a plain ``Exception`` naming the pass;
    an :class:`FxflattenError` (bad input, a non-finite result) is unwrapped so that callers
    of the Python API can catch it and the CLI can print its one line.
    """
    try:
        result = PassManager(passes=passes)(graph_module).graph_module
    except Exception as error:
        if isinstance(error.__cause__, FxflattenError):
            raise error.__cause__ from None
        raise
    # Graph modules are reference cycles (graph <-> owning module), so the intermediate graphs
    # of the passes, and the rewritten weights they hold (0.1 GiB on the default model), are
    # only freed by the cycle collector, which otherwise may not run before the next stage.
    gc.collect()
    release_free_memory()
    return result
