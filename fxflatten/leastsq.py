"""The linear algebra of pruning back: scores, subset choice and ridge compensation.

Everything works on accumulated second moments, never on stored activations: ``G = X^T X``
over calibration tokens (X the inputs of an output projection: attention heads' outputs or MLP
intermediate channels, with a trailing 1 for the bias when there is one) and ``B = X^T Y`` for
the target output Y. Keeping the inputs S and refitting the projection by ridge least squares,

    W_S^T = (G_SS + lam I)^-1 B_S,        residual = tr(Y^T Y) - tr(B_S^T (G_SS + lam I)^-1 B_S),

is the paper's Lemma 3.1 (Nystrom) when Y is the full-width output (then B = G W^T), and
absorbs the flattening error as well when Y is the original serial blocks' output.
"""

from __future__ import annotations

import logging

import torch

from fxflatten.errors import FxflattenError

log = logging.getLogger(__name__)


def ridge_leverage(gram: torch.Tensor, ridge: float = 10.0, block: int = 768) -> torch.Tensor:
    """``diag(C (C + lam I)^-1)`` with ``lam = ridge * mean eigenvalue of C``: each channel's
    share of the well-determined directions of the activation covariance.

    Computed as ``1 - lam diag((C + lam I)^-1)``, the diagonal of the inverse being the column
    sums of squares of ``L^-1`` for the Cholesky factor L: several times faster than an
    eigendecomposition. ``L^-1`` is lower triangular, so its columns are solved ``block`` at a
    time against the trailing part of L only: beside L, two n x ``block`` matrices are held
    instead of two n x n ones. A ridge this
    large (the condition number is at most n / ridge + 1) makes float32 accurate enough to rank
    channels, at half the time of float64.
    """
    shifted = gram.to(torch.float32, copy=True)  # the caller's moments stay as they are
    lam = ridge * shifted.diagonal().mean().clamp(min=1e-12)
    shifted.diagonal().add_(lam)
    factor = torch.linalg.cholesky(shifted)
    del shifted  # n x n matrices are the largest things held here: keep as few as possible
    n = gram.shape[0]
    inverse_diagonal = torch.empty(n, dtype=factor.dtype, device=factor.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        identity = torch.eye(n - start, stop - start, dtype=factor.dtype, device=factor.device)
        columns = torch.linalg.solve_triangular(factor[start:, start:], identity, upper=False)
        inverse_diagonal[start:stop] = columns.pow_(2).sum(0)
    return 1 - lam * inverse_diagonal


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """Solve ``(G + lam I) W^T = B`` with ``lam = ridge * mean(diag G)``.

    If the system is too ill-conditioned for a Cholesky factorisation, lam grows tenfold until
    it is not; the lam used is returned so callers can report it.
    """
    shifted, cross = gram.to(torch.float64, copy=True), cross.double()  # G + lam I, built in place
    scale = shifted.diagonal().mean().clamp(min=1e-12)
    lam, added = ridge * scale, 0.0
    for _ in range(8):
        shifted.diagonal().add_(lam - added)
        added = lam
        factor, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            return torch.cholesky_solve(cross, factor), float(lam / scale)
        lam = lam * 10 if lam > 0 else 1e-8 * scale
    raise FxflattenError("a least-squares refit stayed singular even with a ridge 1e7 times the asked one; "
                         "the calibration activations are degenerate (use more or longer calibration windows)")


def explained(gram: torch.Tensor, cross: torch.Tensor, keep: torch.Tensor, ridge: float) -> float:
    """``tr(B_S^T (G_SS + lam I)^-1 B_S)``: how much of the target the inputs ``keep`` reproduce."""
    solution, _ = ridge_solve(gram[keep[:, None], keep], cross[keep], ridge)
    return float((cross[keep].double() * solution).sum())


def group_energy(gram: torch.Tensor, weight: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Mean output energy of each input group through the projection: ``tr(W_g G_gg W_g^T)``."""
    return torch.stack([
        ((weight[:, g].double() @ gram[g][:, g].double()) * weight[:, g].double()).sum() for g in groups
    ])


def greedy_groups_by_error(gram: torch.Tensor, cross: torch.Tensor, groups: list[torch.Tensor],
                           keep: int, ridge: float, always: torch.Tensor | None = None) -> list[int]:
    """Choose ``keep`` groups one at a time, each time the one that best reproduces the target."""
    chosen: list[int] = []
    base = always if always is not None else torch.empty(0, dtype=torch.long, device=gram.device)
    for _ in range(keep):
        best = max(
            (g for g in range(len(groups)) if g not in chosen),
            key=lambda g: explained(gram, cross, torch.cat([base, *[groups[c] for c in chosen], groups[g]]), ridge),
        )
        chosen.append(best)
    return sorted(chosen)


def prune_by_error(gram: torch.Tensor, cross: torch.Tensor, keep: int, ridge: float, rounds: int = 4,
                   always: torch.Tensor | None = None) -> torch.Tensor:
    """Choose ``keep`` input channels that best reproduce the target, dropping the rest in rounds.

    Each round fits all active channels by ridge least squares (``W = (G + lam I)^-1 B``) and
    drops the channels whose removal raises the residual least: by the optimal-brain-surgeon
    identity, removing channel i alone (and refitting the rest) costs
    ``|W_i|^2 / [(G + lam I)^-1]_ii``. Unlike ridge leverage, this sees the target, so it
    keeps the channels the output needs, not just the ones with the most independent energy.
    Channels in ``always`` (a bias column) are kept and not counted.
    """
    fixed = always if always is not None else torch.empty(0, dtype=torch.long, device=gram.device)
    free = torch.ones(gram.shape[0], dtype=torch.bool, device=gram.device)
    free[fixed] = False
    candidates = free.nonzero().flatten()
    for done in range(rounds):
        # Drop an equal share of what is left to drop in each remaining round.
        target = len(candidates) - -(-(len(candidates) - keep) // (rounds - done))
        if target >= len(candidates):
            break
        active = torch.cat([candidates, fixed])
        g = gram[active[:, None], active].double()
        lam = ridge * g.diagonal().mean().clamp(min=1e-12)
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(g + lam * torch.eye(len(active), dtype=g.dtype, device=g.device)))
        solution = inverse @ cross[active].double()
        cost = solution.pow(2).sum(1) / inverse.diagonal()
        order = cost[: len(candidates)].argsort(descending=True)
        candidates = candidates[order[:target]].sort().values
    return candidates


def add_gram(total: torch.Tensor | None, x: torch.Tensor, pieces: int = 4) -> torch.Tensor:
    """``total + x^T x`` in x's dtype (``total`` itself when given), for x (tokens, n).

    The product is symmetric, so only the blocks on and above the diagonal of a ``pieces`` x
    ``pieces`` tiling are multiplied and the others mirrored: 10 of 16 block products for the
    default 4; for a widened MLP's channels this is most of a pruned block's statistics time. Summed in float32, not float64: a batch's product already sums thousands
    of tokens in float32, and a sum over batches adds less rounding than that, far below the
    ridges every use adds (1e-3 of the mean diagonal and more); at half the size, the widened
    MLP's matrix and the linear algebra on it hold half the memory at the prune peak.
    """
    n = x.shape[1]
    if total is None:
        total = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    edges = [round(n * i / pieces) for i in range(pieces + 1)]
    spans = [slice(a, b) for a, b in zip(edges, edges[1:]) if b > a]
    for i, rows in enumerate(spans):
        left = x[:, rows].T
        for columns in spans[i:]:
            block = left @ x[:, columns]
            total[rows, columns] += block
            if columns != rows:
                total[columns, rows] += block.T
    return total
