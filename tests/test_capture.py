"""capture(): the exported graph computes the model's logits at any batch size and length."""

import pytest
import torch

from fxflatten import FxflattenError, capture
from fxflatten.graph.capture import recapture
from tests.graphs import EXACT, logits, pipeline
from tests.models import FAMILIES, build


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_captured_graph_matches_eager_at_several_shapes(family):
    model = build(family)
    graph = capture(model)
    for batch, length in [(1, 5), (2, 16), (3, 37)]:
        ids = torch.randint(0, 128, (batch, length))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            out = model(ids) if family.startswith("handwritten") else model(input_ids=ids, attention_mask=mask, use_cache=False)
            eager = out if isinstance(out, torch.Tensor) else out.logits
            traced = graph(ids, mask)
        assert traced.shape == (batch, length, 128)
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


def test_captured_graph_respects_the_attention_mask():
    model = build("llama")
    graph = capture(model)
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on the second row
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(graph(ids, mask)[:, 4:], eager[:, 4:], rtol=1e-5, atol=1e-5)


def test_capture_leaves_the_model_untouched():
    model = build("llama")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    capture(model)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


def test_capture_refuses_a_model_in_training_mode():
    model = build("llama").train()
    with pytest.raises(FxflattenError, match="eval"):
        capture(model)


def test_captured_graph_names_parameters_as_the_model_does():
    model = build("qwen2")
    graph = capture(model)
    targets = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    assert "model.model.layers.0.self_attn.q_proj.bias" in targets


@pytest.mark.parametrize("stage", ["flat", "folded", "fused"])
def test_every_pass_output_exports_again_with_dynamic_batch_and_length(stage):
    gm = getattr(pipeline("llama"), stage)
    again = recapture(gm)
    for batch, length in [(1, 5), (3, 9)]:
        torch.testing.assert_close(logits(again, batch, length), logits(gm, batch, length), **EXACT)
