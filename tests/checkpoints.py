"""A tiny model and tokenizer that can be saved as a Hugging Face checkpoint, built offline;
texts for them; and what a directory of saved files holds."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from fxflatten.cli.output import write_report

EOS = "<|endoftext|>"
WORDS = "river stone light cloud sea fire wind moon field storm bread iron".split()


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


def nan_model() -> transformers.LlamaForCausalLM:
    """``tiny_llama()`` with a NaN in block 1's MLP down projection."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    return model


def words(seed: int, count: int = 3000) -> str:
    """Random words: two seeds give texts that share no 13-word passage (12^13 possibilities)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


def snapshot(path: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``path`` (a directory or one file) with its size, mtime and sha256."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {
        str(f.relative_to(path) if path.is_dir() else f.name):
            (f.stat().st_size, f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in files
    }


def partial_dirs(parent: Path, name: str) -> list[Path]:
    """Temporary directories an output ``name`` is built in (see fxflatten.cli.output)."""
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def old_output(path: Path) -> dict[str, tuple[int, int, str]]:
    """A complete earlier output at ``path``; returns its snapshot."""
    path.mkdir()
    (path / "weights.bin").write_bytes(b"old weights")
    write_report(path, {"old": True})
    return snapshot(path)
