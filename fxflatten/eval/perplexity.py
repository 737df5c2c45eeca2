"""Held-out perplexity of a captured (or rewritten) graph on token windows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import GraphModule
from tqdm.auto import tqdm

from fxflatten.device import device_of


@dataclass(frozen=True)
class Perplexity:
    value: float
    tokens: int  # predicted tokens: windows x (length - 1)
    windows: int
    seq_len: int

    def __str__(self) -> str:
        return f"{self.value:.3f} ({self.measured_on})"

    @property
    def measured_on(self) -> str:
        return f"{self.windows} windows of {self.seq_len} tokens, {self.tokens} predicted"


@torch.no_grad()
def perplexity(gm: GraphModule | Callable[[torch.Tensor, torch.Tensor], torch.Tensor], windows: torch.Tensor,
               batch_size: int = 1, progress: bool = False) -> Perplexity:
    """exp(mean next-token cross-entropy) over non-overlapping windows, each scored on its own.

    ``gm`` is a graph, or any callable taking ``(input_ids, attention_mask)`` on the CPU and giving
    logits (an ONNX Runtime session through :class:`fxflatten.export.ort.SessionModel`).

    One window at a time by default: a window's logits (seq_len x vocabulary x 4 bytes) and
    its log-softmax as much again would, batched, dominate a run's peak memory, while one
    window of a few hundred tokens already keeps the matrix products efficient.
    """
    total, count = 0.0, 0
    device = device_of(gm) if isinstance(gm, torch.nn.Module) else torch.device("cpu")
    for chunk in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, leave=False):
        chunk = chunk.to(device)
        logits = gm(chunk, torch.ones_like(chunk))
        for row, ids in zip(logits, chunk):
            total += F.cross_entropy(row[:-1].float(), ids[1:], reduction="sum").item()
        count += chunk[:, 1:].numel()
    return Perplexity(math.exp(total / count), count, windows.shape[0], windows.shape[1])


def perplexities(gm: GraphModule | Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sets: dict[str, torch.Tensor], progress: bool = False) -> dict[str, Perplexity]:
    """:func:`perplexity` on each named set of windows (one per domain)."""
    return {name: perplexity(gm, windows, progress=progress) for name, windows in sets.items()}


def perplexity_values(gm: GraphModule | Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sets: dict[str, torch.Tensor],
                      progress: bool = False) -> dict[str, float]:
    """:func:`perplexities` as plain numbers, for reports and comparisons."""
    return {name: result.value for name, result in perplexities(gm, sets, progress).items()}


def ratio_over_domains(values: dict[str, float], reference: dict[str, float]) -> float:
    """How many times ``reference``'s perplexity ``values`` are: the geometric mean over domains."""
    return geometric_mean([values[domain] / reference[domain] for domain in reference])


def geometric_mean(values: list[float]) -> float:
    """The geometric mean: the summary of perplexity ratios over domains, where a domain that
    doubles counts as much as one that halves."""
    return math.exp(sum(math.log(v) for v in values) / len(values))
