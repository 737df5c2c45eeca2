"""Write a compressed graph as a standard Hugging Face checkpoint when its blocks allow it.

After pruning back to the original width, every block has the original shape, so the result
is the same architecture with fewer layers: a config with ``num_hidden_layers`` reduced and a
state dict whose layer indices are renumbered. Norms folded into linears are written as the
identity (weight 1, bias 0). The written model is loaded back and its logits compared with the
graph's before anything is moved into place.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.fx import GraphModule
from transformers import AutoModelForCausalLM, PreTrainedModel

from fxflatten.device import device_of
from fxflatten.errors import FxflattenError
from fxflatten.graph.capture import PARAM_PREFIX, graph_example_inputs
from fxflatten.graph.discovery import discover_blocks
from fxflatten.graph.layout import BlockMap

log = logging.getLogger(__name__)


def block_shape(block) -> tuple:
    attention, mlp = block.attention[0].attention, block.mlp[0].mlp
    return (block.parallel, attention.num_heads, attention.num_kv_heads, attention.head_dim, mlp.width)


def why_not_standard(graph_map: BlockMap, original_map: BlockMap, model: nn.Module) -> str | None:
    """None if the graph is the original architecture with fewer layers, else why not."""
    if not isinstance(model, PreTrainedModel):
        return "the source is not a Hugging Face model"
    shapes = {block_shape(block) for block in original_map.blocks}
    if len(shapes) != 1:
        return "the original blocks differ in shape"
    if any(block_shape(block) not in shapes for block in graph_map.blocks):
        return "some blocks are wider or narrower than the original ones"
    if any(block.module is None or not block.module.rsplit(".", 1)[-1].isdigit() for block in graph_map.blocks):
        return "the blocks do not map onto numbered layers"
    return None


def renumbered_config(model: PreTrainedModel, origins: list[int]):
    """The model's config for the layers ``origins`` (original indices), in order."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    old = config.num_hidden_layers
    config.num_hidden_layers = len(origins)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old and key.startswith("layer"):
            setattr(config, key, [value[i] for i in origins])
    return config


def to_pretrained(graph: GraphModule, model: PreTrainedModel, original_map: BlockMap) -> PreTrainedModel:
    """Build the compressed model as an instance of the source model's class."""
    graph_map = discover_blocks(graph)
    reason = why_not_standard(graph_map, original_map, model)
    if reason:
        raise FxflattenError(f"cannot write a Hugging Face checkpoint: {reason}")
    layers = {}  # new module path prefix -> graph module path prefix
    origins = []
    for new_index, block in enumerate(graph_map.blocks):
        prefix, old_index = block.module.rsplit(".", 1)
        layers[f"{prefix}.{new_index}."] = f"{block.module}."
        origins.append(int(old_index))
    config = renumbered_config(model, origins)
    with torch.device("meta"):
        compressed = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    state = {}
    used = set()
    device = device_of(graph)
    tensors = dict(graph.named_parameters(remove_duplicate=False))
    folded_norms = norm_parameters(original_map)
    aliases = tied_names(model)
    for name, tensor in compressed.state_dict().items():
        source = next((old + name[len(new):] for new, old in layers.items() if name.startswith(new)), name)
        target = next((PARAM_PREFIX + n for n in (source, aliases.get(source)) if n and PARAM_PREFIX + n in tensors), None)
        if target is not None:
            state[name] = tensors[target].detach()
            used.add(target)
        else:
            suffix = next((name[len(new):] for new in layers if name.startswith(new)), None)
            folded = folded_norms.get(suffix)
            if folded == "weight":
                state[name] = torch.ones(tensor.shape, dtype=tensor.dtype, device=device)  # folded into the linears
            elif folded == "bias":
                state[name] = torch.zeros(tensor.shape, dtype=tensor.dtype, device=device)
            else:
                raise FxflattenError(f"cannot write a Hugging Face checkpoint: no tensor for {name}") from None
    left = set(tensors) - used
    if left:
        raise FxflattenError(f"cannot write a Hugging Face checkpoint: {sorted(left)[0]} has no place in {type(model).__name__}")
    compressed.load_state_dict(state, assign=True, strict=False)
    for name, buffer in list(compressed.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (rotary tables) come from the source model
            source = next((old + name[len(new):] for new, old in layers.items() if name.startswith(new)), name)
            owner, leaf = name.rsplit(".", 1)
            compressed.get_submodule(owner).register_buffer(leaf, model.get_buffer(source).clone(), persistent=False)
    compressed.tie_weights()
    compressed.generation_config = copy.deepcopy(model.generation_config)
    return compressed.eval()


def norm_parameters(block_map: BlockMap) -> dict[str, str]:
    """The blocks' norm parameters as name within the block -> "weight" or "bias"."""
    found = {}
    for block in block_map.blocks:
        prefix = f"{PARAM_PREFIX}{block.module}."
        for branch in block.branches:
            for kind, target in (("weight", branch.norm and branch.norm.weight), ("bias", branch.norm and branch.norm.bias)):
                if target and target.startswith(prefix):
                    found[target[len(prefix):]] = kind
    return found


def tied_names(model: PreTrainedModel) -> dict[str, str]:
    """Input and output embedding weight names, each mapped to the other, when they are tied.

    Export keeps a tied tensor under one of its names only.
    """
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or id(inputs) not in names or id(outputs) not in names:
        return {}
    a, b = names[id(inputs)] + ".weight", names[id(outputs)] + ".weight"
    return {a: b, b: a}


@torch.no_grad()
def check_same_logits(graph: GraphModule, model: nn.Module, atol: float | None = None) -> float:
    """The largest logit difference between the graph and the model on random tokens.

    The default tolerance is 1e-4 in float32; in half precision, where the two may round a sum
    in a different order, it is a few units in the last place of the largest logit.
    """
    input_ids, mask = graph_example_inputs(graph, batch=2, seq_len=12)
    expected = graph(input_ids, mask)
    got = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    difference = float((expected - got).abs().max())
    if atol is None:
        atol = 1e-4 if expected.dtype in (torch.float32, torch.float64) else (
            4 * torch.finfo(expected.dtype).eps * max(1.0, float(expected.abs().max())))
    if difference > atol:
        raise FxflattenError(f"the Hugging Face model differs from the compressed graph by {difference:.2e} (> {atol:g})")
    return difference
