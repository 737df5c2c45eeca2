"""A tiny model and tokenizer that can be saved as a Hugging Face checkpoint, built offline."""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOS = "<|endoftext|>"


def byte_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A tokenizer with one token per byte (ids 0-255) and an EOS (256), built offline.

    One token per byte makes token counts exact: ASCII text of n characters is n tokens.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)} | {EOS: len(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)


def tiny_llama(vocab_size: int = 257) -> transformers.LlamaForCausalLM:
    """A randomly initialised two-layer Llama with GQA, small enough to build in milliseconds."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).eval()
