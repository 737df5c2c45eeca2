"""The statistics and weight surgery of pruning: running moments of a linear's input, keeping
rows of input projections, and refitting an output projection on the kept columns.

A pruned branch keeps a subset S of its channels (MLP) or of its KV groups' columns
(attention). Its input projections keep the rows that make S; its output projection keeps the
columns that read S and, refitted by ridge least squares on the calibration moments, reproduces
the target output from them: ``W_S^T = (X_S^T X_S + lam I)^-1 X_S^T Y`` (the paper's Lemma 3.1
when Y is the full-width output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from fxflatten.errors import check_finite
from fxflatten.graph.layout import AttentionLayout, Linear, Projection
from fxflatten.graph.params import bias, set_tensor, set_weight, weight
from fxflatten.leastsq import add_gram, ridge_solve


@dataclass
class Moments:
    """Running ``X^T X`` and ``X^T Y`` (with a trailing 1 in X when fitting a bias)."""

    with_bias: bool
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    tokens: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        # Products in float32; the cross term (small) is summed over batches in float64, the
        # Gram matrix (a widened MLP's is the largest tensor of the statistics) in place in float32.
        x = x.flatten(0, -2).float()
        if self.with_bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        self.gram = add_gram(self.gram, x)
        if y is not None:
            self.cross = accumulate(self.cross, x.T @ y.flatten(0, -2).float())
        self.tokens += x.shape[0]

    def check(self, what: str) -> None:
        """Stop with an error naming the block if a NaN or Inf reached the statistics."""
        check_finite(self.gram, what)
        if self.cross is not None:
            check_finite(self.cross, what)

    def default_target(self, gm: GraphModule, linear: Linear) -> None:
        """Without a serial target, the target is the linear's own full-width output: B = G W^T."""
        if self.cross is None:
            w = weight(gm, linear)
            full = torch.cat([w, bias(gm, linear)[:, None]], 1) if self.with_bias else w
            self.cross = (self.gram @ full.float().T).double()


def accumulate(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """``total + term`` in float64, adding into ``total`` itself."""
    return term.double() if total is None else total.add_(term)


def rows_of(projection: Projection, keep: torch.Tensor) -> torch.Tensor:
    return projection.start + keep


def slice_inputs(gm: GraphModule, projections: list[Projection], keeps: list[torch.Tensor]) -> None:
    """Keep rows ``keeps[i]`` (relative) of projection i; projections sharing a linear stay in order."""
    by_linear: dict[Linear, list[int]] = {}
    for index, projection in enumerate(projections):
        by_linear.setdefault(projection.linear, []).append(index)
    for linear, indices in by_linear.items():
        indices.sort(key=lambda i: projections[i].start)
        rows = torch.cat([rows_of(projections[i], keeps[i]) for i in indices])
        set_weight(gm, linear, weight(gm, linear)[rows])
        if linear.bias:
            set_tensor(gm, linear.bias, bias(gm, linear)[rows])


def refit_output(gm: GraphModule, linear: Linear, keep: torch.Tensor, moments: Moments, ridge: float,
                 refit: bool) -> float | None:
    """Keep input columns ``keep`` of the output linear, refitted by ridge least squares if asked."""
    w = weight(gm, linear)
    if not refit:
        set_weight(gm, linear, w[:, keep])
        return None
    columns = torch.cat([keep, torch.tensor([w.shape[1]], device=keep.device)]) if moments.with_bias else keep
    solution, used = ridge_solve(moments.gram[columns[:, None], columns], moments.cross[columns], ridge)
    fitted = solution.T.to(w.dtype)
    set_weight(gm, linear, fitted[:, : len(keep)].contiguous())
    if moments.with_bias:
        set_tensor(gm, linear.bias, fitted[:, -1].contiguous())
    return used


def head_groups(layout: AttentionLayout, count: int, device: torch.device | None = None) -> list[torch.Tensor]:
    """Output-projection input columns of each KV group (its query heads' outputs), on ``device``."""
    per_group = layout.num_heads // layout.num_kv_heads * layout.head_dim
    return [torch.arange(g * per_group, (g + 1) * per_group, device=device) for g in range(count)]
