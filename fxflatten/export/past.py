"""The decoding form of a causal LM: one step that reads and returns its KV cache as flat tensors.

ONNX has no cache object, so the exported step takes the cache as one key and one value tensor
per layer, shaped (batch, kv_heads, past, head_dim), and returns them grown by the new tokens.
The names follow the ONNX Runtime GenAI / Optimum convention (``past_key_values.N.key``,
``present.N.value``) so that their runtimes and ours read the same files. A first step passes
empty past tensors (past = 0), so one model serves the prompt and every later token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from fxflatten.errors import FxflattenError

#: Inputs and outputs every decoding step has besides the cache.
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"


@dataclass(frozen=True)
class CacheShape:
    """How many layers the cache has and each layer's (kv_heads, head_dim)."""

    layers: tuple[tuple[int, int], ...]

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(len(self.layers)) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(len(self.layers)) for kind in ("key", "value")]

    def empty(self, batch: int, past: int = 0, dtype: torch.dtype = torch.float32,
              generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Past tensors of length ``past``: random when a generator is given, else zeros."""
        tensors = []
        for kv_heads, head_dim in self.layers:
            for _ in range(2):
                shape = (batch, kv_heads, past, head_dim)
                tensors.append(torch.randn(shape, generator=generator, dtype=dtype) if generator else torch.zeros(shape, dtype=dtype))
        return tensors


@torch.no_grad()
def cache_shape(model: PreTrainedModel) -> CacheShape:
    """Read the cache layout off one tiny forward pass, so no family's config names are assumed."""
    out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if not isinstance(cache, DynamicCache):
        raise FxflattenError(f"{type(model).__name__} does not keep a DynamicCache; only such models can be exported --with-past")
    return CacheShape(tuple((layer.keys.shape[1], layer.keys.shape[3]) for layer in cache.layers))


class WithPast(nn.Module):
    """``logits, *presents = step(input_ids, attention_mask, position_ids, *pasts)``.

    ``attention_mask`` covers past and new tokens, (batch, past + seq); ``pasts`` alternate key
    and value per layer. The transformers cache is built inside the traced function from the flat
    tensors, so export sees only tensors going in and out.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        if not isinstance(model, PreTrainedModel):
            raise FxflattenError(
                "--with-past needs a Hugging Face model, and a graph has no KV cache: export it without "
                "--with-past, or compress with --width 1.0 to get a checkpoint"
            )
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *pasts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(ddp_cache_data=list(zip(pasts[0::2], pasts[1::2])), config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])
