"""LinearPatch (arXiv 2505.24680): bridge a removed span with one symmetric patch matrix.

Written here from the paper. After the n contiguous blocks closest in angle are removed (the
same span as ReplaceMe's), the stream entering the gap is multiplied by ``P = H D H^T`` before
the blocks after it read it: H an orthogonal Hadamard-type rotation that spreads the massive
per-token outliers over all channels, D a channel-wise scale, in the rotated basis, that matches
the magnitudes of the stream the span used to leave. P is one d x d matrix on the stream at the
interface, d^2 parameters (a fraction of one block's), training-free.

H for a hidden size d = 2^k m is ``kron(C_m, H_2^k)``: a normalised Walsh-Hadamard matrix of
the largest power of two dividing d, and for the odd rest the orthonormal DCT-II (the paper's
models have power-of-two widths; the default model's 576 = 9 x 64 does not).
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from benchmarks.baselines.span import closest_span, span_activations
from fxflatten.errors import FxflattenError
from fxflatten.graph.discovery import block_boundaries
from fxflatten.graph.params import set_tensor
from fxflatten.passes.base import GraphPass, contract_error, editable_copy, finish

aten = torch.ops.aten
PATCH = "linear_patch.weight"  # holds P - I (see PatchSpanPass.call)


def hadamard(d: int) -> torch.Tensor:
    """An orthogonal d x d matrix whose entries are all of similar size (see the module docstring)."""
    power = d & -d
    walsh = torch.ones(1, 1)
    while walsh.shape[0] < power:
        walsh = torch.cat([torch.cat([walsh, walsh], 1), torch.cat([walsh, -walsh], 1)])
    walsh /= math.sqrt(power)
    m = d // power
    k = torch.arange(m, dtype=torch.float64)
    dct = torch.cos(math.pi * (k[None, :] + 0.5) * k[:, None] / m) * math.sqrt(2 / m)
    dct[0] /= math.sqrt(2)
    return torch.kron(dct.float(), walsh)


def fit_patch(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``H D H^T`` with D the ratio of per-channel RMS of the rotated streams after / before."""
    rotation = hadamard(before.shape[1])
    scale = (after @ rotation).pow(2).mean(0).sqrt() / (before @ rotation).pow(2).mean(0).sqrt().clamp(min=1e-12)
    return rotation @ torch.diag(scale) @ rotation.T


class PatchSpanPass(GraphPass):
    """Remove blocks [start, start + count) and feed ``patch @ stream`` to the blocks after them.

    Requires: the span lies inside the model and leaves a block. Ensures: the model has
    ``count`` blocks fewer.
    """

    def __init__(self, start: int, count: int, patch: torch.Tensor) -> None:
        self.start, self.count, self.patch = start, count, patch

    def requires(self, graph_module: GraphModule) -> None:
        super().requires(graph_module)
        blocks = len(self.record_input(graph_module).blocks)
        if not (0 <= self.start and self.start + self.count <= blocks and self.count < blocks):
            raise FxflattenError(f"cannot patch blocks {self.start}..{self.start + self.count - 1} of {blocks}")

    def call(self, graph_module: GraphModule) -> PassResult:
        block_map = self.blocks_of(graph_module)
        gm = editable_copy(graph_module)
        nodes = {node.name: node for node in gm.graph.nodes}
        boundaries = block_boundaries(gm, block_map)
        before, after = nodes[boundaries[self.start]], nodes[boundaries[self.start + self.count]]
        # P x is written x + (P - I) x: a residual add, so the stream stays one chain of adds
        # that discovery follows past the patch.
        set_tensor(gm, PATCH, self.patch - torch.eye(self.patch.shape[0], dtype=self.patch.dtype))
        with gm.graph.inserting_after(before):
            weight = gm.graph.get_attr(PATCH)
        with gm.graph.inserting_after(weight):
            change = gm.graph.call_function(aten.linear.default, (before, weight))
        with gm.graph.inserting_after(change):
            patched = gm.graph.call_function(aten.add.Tensor, (before, change))
        after.replace_all_uses_with(patched)
        return PassResult(finish(gm), True)

    def ensures(self, graph_module: GraphModule) -> None:
        super().ensures(graph_module)
        before, after = len(self.input_blocks().blocks), len(self.blocks_of(graph_module).blocks)
        if after != before - self.count:
            raise contract_error("PatchSpanPass", f"{before - self.count} blocks", f"{after}")


def patch_span(graph: GraphModule, windows: torch.Tensor, similarity: torch.Tensor,
               count: int) -> tuple[GraphModule, int]:
    """LinearPatch with ``count`` blocks removed; returns the graph and the span's first block."""
    start = closest_span(similarity, count)
    acts = span_activations(graph, windows, start, count)
    patch = fit_patch(acts.stream_before, acts.stream_after)
    return PatchSpanPass(start, count, patch)(graph).graph_module, start
