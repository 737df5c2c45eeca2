"""ReplaceMe (arXiv 2505.02819): replace a span of blocks by one linear map, training-free.

Written here from the paper. The n contiguous blocks whose ends are closest in angle are
removed (:func:`benchmarks.baselines.span.closest_span`); the block before them gets a linear
map T on its MLP output, fitted on calibration activations so that ``M T + Y`` approximates the
stream the removed span left (M: that MLP's output, Y: the stream it is added to, L: the stream
after the span). T folds into the MLP's down projection (``W_down <- T^T W_down``), so the
result is a standard model with n fewer blocks and no added parameters.

Two objectives, as in the paper:
- ``"lstsq"``: ``T = (M^T M)^-1 M^T (L - Y)``, in closed form;
- ``"cosine"``: T minimises the mean cosine distance between ``M T + Y`` and L, by Adam from
  the least-squares solution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from benchmarks.baselines.span import closest_span, span_activations
from fxflatten.graph.discovery import discover_blocks
from fxflatten.graph.params import bias, set_tensor, set_weight, weight
from fxflatten.leastsq import ridge_solve
from fxflatten.passes.base import editable_copy
from fxflatten.passes.remove import RemoveBlocksPass

#: Ridge of the least-squares fit, as a share of the mean diagonal of M^T M: only to keep the
#: solve well posed, far below what changes the fit.
RIDGE = 1e-6


def fit_lstsq(mlp_out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """T minimising |M T - target|^2 (target = L - Y)."""
    solution, _ = ridge_solve((mlp_out.T @ mlp_out).double(), (mlp_out.T @ target).double(), RIDGE)
    return solution.float()


def fit_cosine(mlp_out: torch.Tensor, residual: torch.Tensor, after: torch.Tensor, start: torch.Tensor,
               steps: int = 400, lr: float = 1e-4, batch: int = 4096, seed: int = 0) -> torch.Tensor:
    """T minimising mean(1 - cos(M T + Y, L)) over tokens, by Adam on minibatches from ``start``."""
    generator = torch.Generator().manual_seed(seed)
    transform = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([transform], lr=lr)
    for _ in range(steps):
        rows = torch.randint(len(mlp_out), (batch,), generator=generator)
        predicted = mlp_out[rows] @ transform + residual[rows]
        loss = (1 - F.cosine_similarity(predicted, after[rows], dim=-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return transform.detach()


def replace_span(graph: GraphModule, windows: torch.Tensor, similarity: torch.Tensor, count: int,
                 objective: str = "lstsq") -> tuple[GraphModule, int]:
    """ReplaceMe with ``count`` blocks removed; returns the graph and the span's first block.

    ``graph`` is left as it was: the refitted down projection is a new tensor, the rest shared.
    """
    start = closest_span(similarity, count)
    acts = span_activations(graph, windows, start, count)
    transform = fit_lstsq(acts.mlp_out, acts.stream_after - acts.mlp_residual)
    if objective == "cosine":
        transform = fit_cosine(acts.mlp_out, acts.mlp_residual, acts.stream_after, transform)
    elif objective != "lstsq":
        raise ValueError(f"unknown ReplaceMe objective {objective!r}")
    replaced = editable_copy(graph)
    down = discover_blocks(graph).blocks[start - 1].mlp[0].mlp.down
    w = weight(replaced, down)
    set_weight(replaced, down, (transform.T @ w.float()).to(w.dtype))
    if down.bias:
        b = bias(replaced, down)
        set_tensor(replaced, down.bias, (b.float() @ transform).to(b.dtype))
    return RemoveBlocksPass(range(start, start + count))(replaced).graph_module, start
