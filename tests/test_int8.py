"""Int8 ONNX: the quantized file computes the float one's logits within int8 rounding, keeps its
held-out perplexity, holds no float weight matrix, and the CLI refuses what it should."""

import json
import sys

import numpy as np
import onnx
import pytest
import torch
import transformers

from fxflatten.cli import main
from fxflatten.export import ort, to_onnx
from fxflatten.export.quantize import BLOCK, quantize_int8

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
SETS = {"a": torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(4)),
        "b": torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(5))}


def float_weights(path) -> list[str]:
    """Float initializers of the file with at least a block's worth of values in both axes: weight matrices."""
    model = onnx.load(str(path))
    return [i.name for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and min(i.dims) >= BLOCK]


def weight_bytes(path) -> int:
    """Bytes of the file's initializers (a tiny model's file is mostly graph)."""
    return sum(len(i.raw_data) for i in onnx.load(str(path)).graph.initializer)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("with_past", [False, True], ids=["logits", "with-past"])
def test_int8_file_is_the_float_one_within_int8_rounding(tied, with_past, tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied)).eval()
    float_path = tmp_path / "float.onnx"
    to_onnx(model, float_path, with_past=with_past)
    check = quantize_int8(float_path, tmp_path / "int8.onnx", SETS)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    assert float_weights(float_path) and not float_weights(tmp_path / "int8.onnx")
    assert weight_bytes(tmp_path / "int8.onnx") < 0.4 * weight_bytes(float_path)
    want = ort.sequence_logits(ort.session(float_path), IDS.numpy())
    got = ort.sequence_logits(ort.session(tmp_path / "int8.onnx"), IDS.numpy())
    relative = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < relative < 0.02
    assert set(check.int8_perplexity) == {"a", "b"} and abs(check.ratio - 1) < 0.01


def test_export_int8_writes_a_checked_model_or_nothing(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    text = str(tiny_llama_dir / "config.json")
    check = ["--eval-text", text, "--eval-windows", "2", "--seq-len", "32"]
    assert main(["export", str(tiny_llama_dir), "--out", str(out), "--with-past", "--int8", *check]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["form"] == "with-past" and report["int8"]["ratio"] <= 1.02
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json", "tokenizer.json", "tokenizer_config.json"]
    assert "int8 held-out perplexity" in capsys.readouterr().out
    assert main(["run-onnx", str(out), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("hi")
    # Past the threshold: one line, exit 2, and nothing at all written.
    refused = tmp_path / "refused"
    assert main(["export", str(tiny_llama_dir), "--out", str(refused), "--int8", "--max-ppl-ratio", "0.5", *check]) == 2
    err = capsys.readouterr().err
    assert "over the limit 0.5; nothing was written" in err and len(err.strip().splitlines()) == 1
    assert not refused.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["int8"]


def test_int8_refusals_come_before_any_work(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "x")
    assert main(["export", str(tiny_llama_dir), "--out", out, "--max-ppl-ratio", "1.1"]) == 2
    assert "applies to --int8 and --gguf only" in capsys.readouterr().err
    assert main(["export", str(tiny_llama_dir), "--out", out, "--int8", "--max-ppl-ratio", "0"]) == 2
    assert "positive multiple" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization.matmul_nbits_quantizer", None)
    assert main(["export", "no-such-model", "--out", out, "--int8"]) == 2
    err = capsys.readouterr().err
    assert "needs onnxruntime's quantization tools" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
