"""What every fxflatten pass shares: the torch.fx pass shape, and checks that run the graph.

A pass is a :class:`torch.fx.passes.infra.pass_base.PassBase`: ``requires`` checks its
preconditions, ``call`` rewrites and returns ``PassResult(graph_module, modified)``, ``ensures``
checks the result. Unlike the base class we check the graph module ``call`` returned: our
passes never mutate their input (its tensors belong to the user's model), they return a new
graph module, re-exported so that every node's metadata is fresh.

Each pass states its own contract: ``requires`` refuses a graph or a request it cannot serve
with an :class:`FxflattenError` ahead of any rewriting, and ``ensures`` rediscovers the blocks of
the result and checks the promise the pass makes (fewer blocks, parallel stages, folded norms),
so a broken rewrite fails at the pass that broke it.
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
from fxflatten.graph.discovery import discover_blocks
from fxflatten.graph.layout import BlockMap
from fxflatten.run.spill import release_free_memory

log = logging.getLogger(__name__)


class GraphPass(PassBase):
    """Base of all fxflatten passes: ``requires``, ``call``, ``ensures``, with block maps shared.

    ``requires``, ``call`` and ``ensures`` all need the blocks of the graphs they see, and
    discovery walks the whole graph, so within one run of the pass each graph is discovered
    once (:meth:`blocks_of`). ``requires`` records the input's map (:meth:`record_input`) for
    ``ensures`` to compare the result against. Both live for one run only: the same pass object
    may be applied to many graphs.
    """

    _input: BlockMap | None = None
    _discovered: list[tuple[GraphModule, BlockMap]] | None = None

    def __call__(self, graph_module: GraphModule) -> PassResult:
        self._discovered = []
        try:
            self.requires(graph_module)
            result = self.call(graph_module)
            if result.modified:
                # A pass that rewrites its input in place (``FusePass(consume=True)``) makes the
                # input's map stale; the recorded input map stays for comparison.
                self._discovered = []
            self.ensures(result.graph_module)
        finally:
            self._discovered = self._input = None
        return result

    def requires(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()

    def ensures(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()
        check_runs(graph_module, type(self).__name__)

    def blocks_of(self, graph_module: GraphModule) -> BlockMap:
        """The block map of ``graph_module``, discovered once per run of the pass."""
        for seen, block_map in self._discovered or ():
            if seen is graph_module:
                return block_map
        block_map = discover_blocks(graph_module)
        if self._discovered is not None:
            self._discovered.append((graph_module, block_map))
        return block_map

    def record_input(self, graph_module: GraphModule) -> BlockMap:
        """The input's block map, kept for ``ensures`` (see :meth:`input_blocks`)."""
        self._input = self.blocks_of(graph_module)
        return self._input

    def input_blocks(self) -> BlockMap:
        """The block map ``requires`` recorded for the graph this run started from."""
        if self._input is None:
            raise FxflattenError(
                f"{type(self).__name__}.ensures compares with the input requires saw: run the pass as pass_(graph_module)"
            )
        return self._input


def contract_error(who: str, promise: str, found: str) -> FxflattenError:
    """The error of a pass whose result breaks its own postcondition: a bug in the pass."""
    return FxflattenError(
        f"{who} broke its own contract ({promise}; found {found}); this is a bug in fxflatten: "
        "report it with the model and the command that produced it"
    )


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
    that leaves every node's shape unchanged (rewiring, weight folding) may skip the re-export
    (``reexport=False``): its metadata stays true, and the re-export, which traces the whole
    model again, is the costliest step of a pass. The graph still runs in ``ensures``.
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
    # of the passes, and the rewritten weights they hold (a model's worth for a weight pass),
    # are only freed by the cycle collector, which otherwise may not run until the next stage
    # has allocated its own.
    gc.collect()
    release_free_memory()
    return result
