"""Tiny randomly initialised models of every family discovery supports, built from configs.

Each factory takes the few sizes that matter to the graph (layers, hidden size, heads, KV heads,
head dim, MLP width) so that property tests can draw them at random.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn

VOCAB = 128


@dataclass(frozen=True)
class Shape:
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    hidden: int = 32
    width: int = 48


def llama(shape: Shape) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.width,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config)


def mistral(shape: Shape) -> nn.Module:
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.width,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, max_position_embeddings=256,
    )
    return transformers.MistralForCausalLM(config)


def qwen2(shape: Shape) -> nn.Module:
    # Qwen2 derives head_dim from hidden / heads and has q/k/v biases.
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=shape.heads * shape.head_dim, intermediate_size=shape.width,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=256,
    )
    return transformers.Qwen2ForCausalLM(config)


def phi3(shape: Shape) -> nn.Module:
    # Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj; head_dim = hidden / heads.
    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=shape.heads * shape.head_dim, intermediate_size=shape.width,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    return transformers.Phi3ForCausalLM(config)


def gpt2(shape: Shape) -> nn.Module:
    # GPT-2: Conv1D weights stored (in, out), fused c_attn split in three, LayerNorm with bias,
    # no GQA, and an MLP of fixed width n_inner.
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=shape.heads * shape.head_dim, n_layer=shape.layers,
        n_head=shape.heads, n_inner=shape.width, n_positions=256, bos_token_id=1, eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(config)


def bert(shape: Shape) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=shape.heads * shape.head_dim, intermediate_size=shape.width,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, max_position_embeddings=256,
    )
    return transformers.BertForMaskedLM(config)


def gemma3(shape: Shape) -> nn.Module:
    # Gemma 3: sandwich norms (each branch's output normalised before the add) and q/k norms.
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.width,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, max_position_embeddings=256,
    )
    return transformers.Gemma3ForCausalLM(config)


def gemma2(shape: Shape) -> nn.Module:
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.width,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, max_position_embeddings=256,
    )
    return transformers.Gemma2ForCausalLM(config)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.query = nn.Linear(hidden, heads * head_dim)
        self.key = nn.Linear(hidden, heads * head_dim)
        self.value = nn.Linear(hidden, heads * head_dim)
        self.out = nn.Linear(heads * head_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, self.head_dim).transpose(1, 2) for p in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, -1))


class Layer(nn.Module):
    def __init__(self, shape: Shape, layer_norm: bool) -> None:
        super().__init__()
        hidden = shape.hidden
        norm = (lambda: nn.LayerNorm(hidden)) if layer_norm else (lambda: RMSNorm(hidden))
        self.n1, self.n2 = norm(), norm()
        self.attn = SelfAttention(hidden, shape.heads, shape.head_dim)
        self.fc_in, self.fc_out = nn.Linear(hidden, shape.width), nn.Linear(shape.width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        return x + self.fc_out(F.gelu(self.fc_in(self.n2(x))))


class HandWritten(nn.Module):
    """A pre-norm transformer with no Hugging Face code: forward(input_ids) -> logits."""

    def __init__(self, shape: Shape, layer_norm: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, shape.hidden)
        self.stack = nn.ModuleList(Layer(shape, layer_norm) for _ in range(shape.layers))
        self.final = nn.LayerNorm(shape.hidden)
        self.head = nn.Linear(shape.hidden, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.stack:
            x = layer(x)
        return self.head(self.final(x))


def handwritten(shape: Shape) -> nn.Module:
    return HandWritten(shape)


def handwritten_layernorm(shape: Shape) -> nn.Module:
    return HandWritten(shape, layer_norm=True)


#: Pre-norm families: name -> factory. GPT-2 and the hand-written model have no GQA.
FAMILIES = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "phi3": phi3,
    "gpt2": gpt2,
    "handwritten": handwritten,
    "handwritten_layernorm": handwritten_layernorm,
}
NO_GQA = {"gpt2", "handwritten", "handwritten_layernorm"}
#: Families fxflatten refuses, with the reason discovery finds in their graphs.
REFUSED = {"bert": bert, "gemma2": gemma2, "gemma3": gemma3}


def build(family: str, shape: Shape = Shape(), seed: int = 0) -> nn.Module:
    """A model of ``family`` with ``shape``, in eval mode, deterministic for ``seed``."""
    if family in NO_GQA:
        shape = Shape(shape.layers, shape.heads, shape.heads, shape.head_dim, shape.hidden, shape.width)
    torch.manual_seed(seed)
    model = (FAMILIES | REFUSED)[family](shape)
    return model.eval()
