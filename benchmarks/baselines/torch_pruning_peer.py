"""The PyPI peer ``torch-pruning`` (Fang et al., DepGraph) pruning an HF model's width.

Its LLM recipe (``examples/LLMs/prune_llm.py`` in the torch-pruning repository): a
``BasePruner`` with L2 magnitude importance prunes the hidden size, whole attention heads and MLP
channels by one ratio, with ``lm_head`` left alone. Builds of torch-pruning and transformers do
not always agree (torch-pruning traces the model's autograd graph), so ``prune`` runs under a
time limit and reports how it failed instead of hanging the benchmark.
"""

from __future__ import annotations

import copy
import signal
import traceback
from importlib.metadata import version

import torch
from torch import nn


class PeerFailed(RuntimeError):
    """torch-pruning could not prune the model; the message says where and how."""


def magnitude_pruner(model: nn.Module, ratio: float):
    """torch-pruning's LLM recipe: one ratio for hidden size, heads and MLP channels."""
    import torch_pruning as tp

    config = model.config
    num_heads = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = config.num_attention_heads
            num_heads[module.k_proj] = config.num_key_value_heads
            num_heads[module.v_proj] = config.num_key_value_heads
    example = torch.randint(0, config.vocab_size, (1, 16))
    return tp.pruner.BasePruner(
        model, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, output_transform=lambda out: out.logits, pruning_ratio=ratio,
        ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, round_to=4,
    )


def prune(model: nn.Module, ratio: float, timeout_s: int) -> nn.Module:
    """A pruned copy of ``model`` at torch-pruning's ``ratio``, or :class:`PeerFailed`.

    SIGALRM interrupts a pruner that does not finish in ``timeout_s`` (its dependency search is
    pure Python, so the signal lands); the failure names the torch-pruning calls it was in.
    """
    def expired(signum, frame):
        raise TimeoutError(f"did not finish within {timeout_s} s")

    pruned = copy.deepcopy(model)
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(timeout_s)
    try:
        pruner = magnitude_pruner(pruned, ratio)
        with torch.no_grad():
            for group in pruner.step(interactive=True):
                group.prune()
        update_config(pruned)
        pruned(torch.randint(0, pruned.config.vocab_size, (1, 8)))
    except Exception as error:
        frames = [f.name for f in traceback.extract_tb(error.__traceback__) if "/torch_pruning/" in f.filename]
        where = f" in torch_pruning {' > '.join(frames)}" if frames else ""
        raise PeerFailed(
            f"torch-pruning {version('torch-pruning')} with transformers {version('transformers')}: "
            f"{type(error).__name__}: {error}{where}"
        ) from error
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return pruned


def update_config(model: nn.Module) -> None:
    """Write the pruned sizes back into the config and attention modules (the recipe's last step)."""
    config = model.config
    config.hidden_size = model.lm_head.in_features
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            config.num_attention_heads = module.q_proj.out_features // module.head_dim
            config.num_key_value_heads = module.k_proj.out_features // module.head_dim
            module.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        elif name.endswith("mlp"):
            config.intermediate_size = module.gate_proj.out_features
