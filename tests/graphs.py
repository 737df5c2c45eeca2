"""Graphs of the tiny models through the passes, and the inputs they are compared on.

Shared by the tests of the passes, of capture, of ONNX export and by the property tests. Kept
apart from ``models.py``, which the benchmarks import to build models and which needs neither
hypothesis nor the passes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
import transformers
from hypothesis import strategies as st
from torch import nn
from torch.fx import GraphModule

from fxflatten.graph.capture import capture
from fxflatten.passes.flatten import FlattenPass
from fxflatten.passes.fold_norms import FoldNormsPass
from fxflatten.passes.fuse import FusePass
from tests.models import VOCAB, Shape, build

# Float32 tolerances for "exact" rewrites. Fold and flatten reorder a few roundings; fuse turns
# G matmuls plus adds into one matmul G times as long. Measured on 40+ random configs: at most
# 5e-7 absolute and 4e-7 relative to the largest logit (logits here are 0.1 to 3 in size).
EXACT = dict(rtol=1e-5, atol=1e-6)
ONNX = dict(rtol=1e-4, atol=1e-4)
#: (o_proj has a bias, down_proj has a bias) for families that always have them; Llama's come
#: from its attention_bias / mlp_bias switches, the other families have none.
OUTPUT_BIASES = {"gpt2": (True, True), "handwritten": (True, True), "handwritten_layernorm": (True, True)}


def tokens(batch: int = 2, length: int = 11, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random token ids; the last row is left-padded by ``pad`` positions."""
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))
    mask = torch.ones_like(ids)
    mask[-1, :pad] = 0
    return ids, mask


@torch.no_grad()
def logits(gm: GraphModule, batch: int = 2, length: int = 11, pad: int = 0) -> torch.Tensor:
    """Logits at the positions every row can see (after the padding)."""
    return gm(*tokens(batch, length, pad))[:, pad:]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "rmsnorm" in type(module).__name__.lower()


def in_layer(name: str) -> bool:
    """Module names inside a numbered layer (``model.layers.3.mlp``), not the final norm."""
    return re.search(r"\.\d+(\.|$)", name) is not None


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Norm scales around 1 +- 0.5, norm shifts and every bias around 0 +- 0.3."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if is_norm(module):
            module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def layer_norm_parameters(model: nn.Module) -> int:
    """Parameters of the norms in front of the branches: all norms but the final one."""
    return sum(
        parameter.numel() for name, module in model.named_modules() if is_norm(module) and in_layer(name)
        for parameter in module.parameters()
    )


def run(pass_, gm: GraphModule) -> GraphModule:
    return pass_(gm).graph_module


def partition(layers: int, groups: list[list[int]]) -> list[list[int]]:
    """All blocks as units after flattening ``groups``: the groups and the blocks left alone."""
    starts = {group[0]: group for group in groups}
    units, index = [], 0
    while index < layers:
        unit = starts.get(index, [index])
        units.append(unit)
        index += len(unit)
    return units


@dataclass(frozen=True)
class FuseCase:
    family: str
    shape: Shape
    groups: list[list[int]]
    attention_bias: bool = False
    mlp_bias: bool = False

    def model(self) -> nn.Module:
        model = build(self.family, self.shape)
        if self.attention_bias or self.mlp_bias:  # only Llama offers these switches
            config = model.config
            config.attention_bias, config.mlp_bias = self.attention_bias, self.mlp_bias
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(config).eval()
        return perturb(model)

    @property
    def output_biases(self) -> int:
        """How many of (o_proj, down_proj) carry a bias: the biases that add when fused."""
        return sum(OUTPUT_BIASES.get(self.family, (self.attention_bias, self.mlp_bias)))


@st.composite
def fuse_cases(draw, families: list[str]) -> FuseCase:
    family = draw(st.sampled_from(families))
    layers = draw(st.integers(2, 4))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([4, 8]))
    hidden = heads * draw(st.sampled_from([4, 8]))
    shape = Shape(layers, heads, kv_heads, head_dim, hidden, draw(st.integers(4, 24)))
    # Cut the layers into runs of adjacent blocks; at least one run has two or more.
    cuts = draw(st.lists(st.booleans(), min_size=layers - 1, max_size=layers - 1).filter(lambda c: not all(c)))
    units, unit = [], [0]
    for index, cut in enumerate(cuts, start=1):
        if cut:
            units.append(unit)
            unit = []
        unit.append(index)
    groups = [group for group in units + [unit] if len(group) > 1]
    biases = draw(st.tuples(st.booleans(), st.booleans())) if family == "llama" else (False, False)
    return FuseCase(family, shape, groups, *biases)


# -- every pass on one model, cached ----------------------------------------------------------

@dataclass
class Profiler:
    """One model through every pass, with what the inputs looked like before any pass ran."""

    model: nn.Module
    graph: GraphModule
    model_state: dict[str, torch.Tensor]
    graph_parameters: dict[str, torch.Tensor]
    graph_logits: torch.Tensor
    flat: GraphModule
    folded: GraphModule
    fused: GraphModule


GROUPS = [[1, 2]]


@functools.cache
def pipeline(family: str) -> Profiler:
    model = perturb(build(family, Shape(layers=3)))
    graph = capture(model)
    model_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    graph_parameters = {name: tensor.clone() for name, tensor in graph.named_parameters()}
    graph_logits = logits(graph)
    flat = run(FlattenPass(GROUPS), graph)
    folded = run(FoldNormsPass(), flat)
    fused = run(FusePass(), folded)
    return Profiler(model, graph, model_state, graph_parameters, graph_logits, flat, folded, fused)


# -- calibration windows and ids for pruning and compressing ----------------------------------

CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))


def ids_logits(graph) -> torch.Tensor:
    """``graph``'s logits on ``IDS``, every position unmasked."""
    return graph(IDS, torch.ones_like(IDS))
