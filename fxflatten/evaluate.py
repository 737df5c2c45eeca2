"""Held-out perplexity of a captured (or rewritten) graph on token windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import GraphModule
from tqdm.auto import tqdm


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
def perplexity(gm: GraphModule, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> Perplexity:
    """exp(mean next-token cross-entropy) over non-overlapping windows, each scored on its own."""
    total, count = 0.0, 0
    for chunk in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, leave=False):
        logits = gm(chunk, torch.ones_like(chunk)).float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += chunk[:, 1:].numel()
    return Perplexity(math.exp(total / count), count, windows.shape[0], windows.shape[1])
