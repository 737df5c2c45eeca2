"""The graph ``compress`` returns goes straight into torchao's PT2E int8 flow: prepare with a stock
quantizer, calibrate, convert; the result computes the float graph within int8 rounding, exports
with torch.export, and exports to ONNX as QDQ that ONNX Runtime runs to the same logits."""

import numpy as np
import pytest
import torch

from fxflatten import capture, compress
from fxflatten.export import ort
from fxflatten.export.onnx import check_model, export_logits
from fxflatten.graph.capture import graph_example_inputs
from tests.graphs import CALIB
from tests.models import Shape, build

pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
x86 = pytest.importorskip("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_a_compressed_graph_quantizes_with_pt2e(family, tmp_path):
    graph = capture(build(family, Shape(layers=3, hidden=64, width=96)))
    compressed = compress(graph, calib=CALIB, groups=[[1, 2]]).graph
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = pt2e.prepare_pt2e(compressed, quantizer)
    for window in CALIB:
        prepared(window[None], torch.ones_like(window[None]))
    quantized = pt2e.convert_pt2e(prepared)
    targets = {str(node.target) for node in quantized.graph.nodes if node.op == "call_function"}
    assert {"quantized_decomposed.quantize_per_tensor.default", "quantized_decomposed.dequantize_per_channel.default"} <= targets
    ids, mask = graph_example_inputs(compressed, 2, 16)
    with torch.no_grad():
        want, got = compressed(ids, mask), quantized(ids, mask)
    relative = float((got - want).norm() / want.norm())
    assert 0 < relative < 0.05
    program = torch.export.export(quantized, (ids, mask))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids, mask), got, rtol=1e-5, atol=1e-5)
    export_logits(quantized, tmp_path / "model.onnx")
    check_model(tmp_path / "model.onnx")
    sess = ort.session(tmp_path / "model.onnx")
    logits = ort.sequence_logits(sess, ids.numpy())
    assert np.linalg.norm(logits - got.numpy()) / np.linalg.norm(got.numpy()) < 1e-3
