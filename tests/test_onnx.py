"""ONNX export and ONNX Runtime: parity with PyTorch, the decoding form, generation, the CLI."""

import json

import onnx
import pytest
import torch

from fxflatten import FxflattenError, capture, compress, discover_blocks
from fxflatten.cli import main
from fxflatten.export import ort, to_onnx
from fxflatten.export.hf import to_pretrained
from fxflatten.export.onnx import DECODING_OPSET
from fxflatten.export.program import save_program
from tests.checkpoints import byte_tokenizer, tiny_llama
from tests.graphs import CALIB, ONNX, logits, pipeline, tokens
from tests.models import Shape, build

IDS = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(2))


def compressed(model):
    """The model with blocks 1 and 2 merged into one: a standard model one layer shallower."""
    graph = capture(model)
    result = compress(graph, calib=CALIB, groups=[[1, 2]])
    return result.graph, to_pretrained(result.graph, model, discover_blocks(graph))


@torch.no_grad()
def torch_greedy(model, prompt, steps):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, num_beams=1, repetition_penalty=1.0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "compressed"])
def test_onnx_logits_match_the_graph(family, dense, tmp_path):
    model = build(family, Shape(layers=3))
    graph = capture(model) if dense else compressed(model)[0]
    export = to_onnx(graph, tmp_path / "model.onnx")
    assert export.form == "logits" and not export.external_data
    assert set(export.differences) == {"1x8", "2x16"} and max(export.differences.values()) < 1e-5
    sess = ort.session(tmp_path / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    got = sess.run(None, {"input_ids": IDS.numpy(), "attention_mask": torch.ones_like(IDS).numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), graph(IDS, torch.ones_like(IDS)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "dense"), [("llama", True), ("qwen2", True), ("gpt2", True), ("llama", False)],
                         ids=["llama-dense", "qwen2-dense", "gpt2-dense", "llama-compressed"])
def test_with_past_decodes_like_pytorch(family, dense, tmp_path):
    model = build(family, Shape(layers=3))
    model = model if dense else compressed(model)[1]
    export = to_onnx(model, tmp_path / "model.onnx", with_past=True)
    assert export.form == "with-past" and max(export.differences.values()) < 1e-5
    sess = ort.session(tmp_path / "model.onnx")
    layers = model.config.num_hidden_layers
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert [o.name for o in sess.get_outputs()][1:] == [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    prompt = IDS[0].tolist()
    assert ort.greedy(sess, prompt, 6) == torch_greedy(model, prompt, 6)
    # At the decoding opset attention (and, in rotary RMS-norm families, the rotary embedding and
    # the norms) are single nodes: the step's speed in ONNX Runtime rests on it.
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == DECODING_OPSET
    fused = {"Attention", "RotaryEmbedding", "RMSNormalization"} if family != "gpt2" else {"Attention"}
    assert fused <= {node.op_type for node in graph.graph.node}


def test_greedy_from_the_logits_form_equals_the_cached_form(tmp_path):
    model = build("llama", Shape(layers=2))
    to_onnx(capture(model), tmp_path / "logits.onnx")
    to_onnx(model, tmp_path / "past.onnx", with_past=True)
    prompt = IDS[1].tolist()
    assert ort.greedy(ort.session(tmp_path / "logits.onnx"), prompt, 5) == ort.greedy(ort.session(tmp_path / "past.onnx"), prompt, 5)


def test_a_failed_check_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(FxflattenError, match="differ from PyTorch's by .* nothing was written"):
        to_onnx(capture(build("llama", Shape(layers=2))), target, atol=0.0, rtol=0.0)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_graph_cannot_be_exported_with_past(tmp_path):
    with pytest.raises(FxflattenError, match="needs a Hugging Face model"):
        to_onnx(capture(build("llama", Shape(layers=2))), tmp_path / "model.onnx", with_past=True)


def test_export_and_run_onnx_commands(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", str(tiny_llama_dir), "--out", str(out), "--with-past"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["form"] == "with-past" and report["onnx"]["path"] == "model.onnx"
    assert (out / "tokenizer.json").is_file()
    assert "largest logit difference" in capsys.readouterr().out
    assert main(["run-onnx", str(out), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    prompt = byte_tokenizer()("hello").input_ids
    assert printed.startswith("hello") and printed.rstrip("\n") == byte_tokenizer().decode(prompt + torch_greedy(tiny_llama(), prompt, 4))
    assert main(["export", str(tiny_llama_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tiny_llama_dir), "--out", str(out), "--force"]) == 0
    assert json.loads((out / "report.json").read_text())["onnx"]["form"] == "logits"


def test_export_refuses_what_it_cannot_do(tiny_llama_dir, tmp_path, capsys):
    program = tmp_path / "program"
    program.mkdir()
    save_program(capture(tiny_llama()), program)
    byte_tokenizer().save_pretrained(program)
    assert main(["export", str(program), "--out", str(tmp_path / "x"), "--with-past"]) == 2
    assert "needs a Hugging Face model" in capsys.readouterr().err
    assert main(["export", str(tiny_llama_dir), "--out", str(tmp_path / "model.onnx")]) == 2
    assert "give a directory" in capsys.readouterr().err
    assert main(["run-onnx", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "no ONNX model here" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(program), "--out", str(tmp_path / "x")]) == 0  # a program exports in the logits form


def test_compress_writes_onnx_beside_the_checkpoint(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    text = str(tiny_llama_dir / "config.json")
    args = ["compress", str(tiny_llama_dir), "--ratio", "0.3", "--out", str(out), "--calib", text, "--samples", "4",
            "--seq-len", "32", "--eval-text", text, "--eval-windows", "2", "--onnx"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "huggingface" and report["onnx"]["form"] == "logits"
    assert (out / "config.json").is_file() and (out / "model.onnx").is_file()
    capsys.readouterr()
    assert main(["run-onnx", str(out), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("hi")


@pytest.mark.slow
def test_default_model_generates_the_same_text_in_onnx_runtime(default_model, tmp_path):
    """The real model, decoding form: ONNX Runtime's greedy tokens are PyTorch's."""
    model, tokenizer = default_model
    export = to_onnx(model, tmp_path / "model.onnx", with_past=True)
    assert max(export.differences.values()) <= export.tolerance
    prompt = tokenizer("The capital of France is").input_ids
    got = ort.greedy(ort.session(tmp_path / "model.onnx"), prompt, 12)
    assert got == torch_greedy(model, prompt, 12)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_graph_exports_to_onnx_and_runs_in_onnxruntime(family, tmp_path):
    pytest.importorskip("onnxruntime")
    from fxflatten.export import ort, to_onnx

    fused = pipeline(family).fused
    session = ort.session(to_onnx(fused, tmp_path / f"{family}.onnx").path)
    for batch, length in [(2, 11), (3, 6)]:
        ids, mask = tokens(batch, length)
        (out,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), logits(fused, batch, length), **ONNX)
