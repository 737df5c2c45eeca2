"""discover_blocks(): the stream, branches and blocks, found from the graph alone."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fxflatten import FxflattenError, capture, discover_blocks
from tests.models import FAMILIES, NO_GQA, Shape, build

EXPECTED = {
    # family: (norm kind, activation, gated, linear names of block 0 as q, k, v, o, up, down)
    "llama": ("rms", "silu", True, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")),
    "mistral": ("rms", "silu", True, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")),
    "qwen2": ("rms", "silu", True, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")),
    "phi3": ("rms", "silu", True, ("qkv_proj", "qkv_proj", "qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "gpt2": ("layer", "gelu_tanh", False, ("c_attn", "c_attn", "c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")),
    "handwritten": ("rms", "gelu", False, ("query", "key", "value", "out", "fc_in", "fc_out")),
    "handwritten_layernorm": ("layer", "gelu", False, ("query", "key", "value", "out", "fc_in", "fc_out")),
}


def check_layout(family, model, shape):
    block_map = discover_blocks(capture(model))
    norm, activation, gated, names = EXPECTED[family]
    kv_heads = shape.heads if family in NO_GQA else shape.kv_heads
    assert len(block_map.blocks) == shape.layers
    assert len(block_map.stream) == 2 * shape.layers
    params = dict(model.named_parameters())
    for block in block_map.blocks:
        attention, mlp = block.attention[0].attention, block.mlp[0].mlp
        assert (attention.num_heads, attention.num_kv_heads, attention.head_dim) == (shape.heads, kv_heads, shape.head_dim)
        assert (attention.q.features, attention.k.features, attention.v.features) == (
            shape.heads * shape.head_dim, kv_heads * shape.head_dim, kv_heads * shape.head_dim)
        assert mlp.width == shape.width
        assert (mlp.activation, mlp.gate is not None) == (activation, gated)
        assert block.norm_kind == norm and block.mlp[0].norm.kind == norm
        assert block.parallel == 1
        assert block.fusable
        roles = (attention.q.linear.weight, attention.k.linear.weight, attention.v.linear.weight,
                 attention.o.weight, mlp.up.linear.weight, mlp.down.weight)
        for target, name in zip(roles, names):
            assert f".{block.index}." in target and name in target
        # The block's parameter count equals the parameters under its module in the model.
        in_module = sum(p.numel() for n, p in params.items() if n.startswith(block.module + "."))
        assert block.parameters == in_module
    return block_map


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_discovery_finds_every_block_with_its_heads_width_and_norm(family):
    shape = Shape(layers=3)
    check_layout(family, build(family, shape), shape)


def test_fused_projections_are_split_into_their_row_ranges():
    block_map = discover_blocks(capture(build("phi3", Shape(heads=4, kv_heads=2, head_dim=8))))
    attention, mlp = block_map.blocks[0].attention[0].attention, block_map.blocks[0].mlp[0].mlp
    assert [(p.start, p.stop) for p in (attention.q, attention.k, attention.v)] == [(0, 32), (32, 48), (48, 64)]
    assert (mlp.gate.start, mlp.gate.stop, mlp.up.start, mlp.up.stop) == (0, 48, 48, 96)


def test_conv1d_weights_are_marked_transposed_and_carry_biases():
    block = discover_blocks(capture(build("gpt2"))).blocks[0]
    assert all(linear.transposed and linear.bias for branch in block.branches for linear in branch.linears)
    assert block.attention[0].norm.bias is not None


def test_qkv_biases_are_found():
    attention = discover_blocks(capture(build("qwen2"))).blocks[0].attention[0].attention
    assert attention.q.linear.bias and attention.k.linear.bias and attention.v.linear.bias
    assert attention.o.bias is None


def test_post_norm_model_is_refused_with_the_reason():
    with pytest.raises(FxflattenError, match="post-norm"):
        discover_blocks(capture(build("bert")))


def test_block_map_is_plain_data():
    block_map = discover_blocks(capture(build("llama")))
    data = block_map.to_dict()
    assert len(data["blocks"]) == 2 and data["blocks"][0]["attention"][0]["kind"] == "attention"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    layers=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([4, 8, 16]),
    hidden_per_head=st.integers(2, 6),
    width=st.integers(8, 64),
)
def test_discovery_on_random_shapes(family, layers, kv_heads, group, head_dim, hidden_per_head, width):
    # transformers requires the hidden size to be a multiple of the head count.
    heads = kv_heads * group
    shape = Shape(layers, heads, kv_heads, head_dim, heads * hidden_per_head, width)
    check_layout(family, build(family, shape), shape)


def test_no_residual_stream_is_refused_with_the_reason():
    class Stack(nn.Module):
        """Layers applied one after another, with no x + f(x) anywhere."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(128, 16)
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
            self.head = nn.Linear(16, 128)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(input_ids)
            for layer in self.layers:
                x = torch.relu(layer(x))
            return self.head(x)

    with pytest.raises(FxflattenError, match="no residual stream found") as excinfo:
        discover_blocks(capture(Stack().eval()))
    assert "\n" not in str(excinfo.value)
