"""GGUF output: transformers reads back what fxflatten writes (weights, config, tokenizer) for
every covered architecture and type, dense and compressed; everything else is refused in one line."""

import json

import gguf
import pytest
import torch
import transformers

from fxflatten import capture, compress, discover_blocks
from fxflatten.cli import main
from fxflatten.errors import FxflattenError
from fxflatten.export.gguf_file import write_gguf
from fxflatten.export.hf import to_pretrained
from fxflatten.export.program import save_program
from tests.checkpoints import byte_tokenizer, tiny_llama
from tests.graphs import CALIB
from tests.models import Shape, build
from tests.test_reliability import compress_args, one_line_error

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(6))
#: Relative norm of the logit error each type may leave on a random tiny model.
TOLERANCE = {"f16": 3e-3, "bf16": 2e-2, "q8_0": 4e-2}


def read_back(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", sorted(TOLERANCE))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "compressed"])
def test_transformers_reads_back_the_model(family, kind, dense, tmp_path):
    model = build(family, Shape(layers=3, hidden=64, width=96)).eval()
    if not dense:  # blocks 1 and 2 merged: one layer fewer, a standard model
        graph = capture(model)
        model = to_pretrained(compress(graph, calib=CALIB, groups=[[1, 2]]).graph, model, discover_blocks(graph))
    written = write_gguf(model, None, tmp_path / "model.gguf", kind)
    back = read_back(written.path)
    assert back.config.num_hidden_layers == model.config.num_hidden_layers
    with torch.no_grad():
        want, got = model(IDS).logits, back(IDS).logits
    error = float((got - want).norm() / want.norm())
    assert 0 < error < TOLERANCE[kind]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(written.path)).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_down.weight"] == kind.upper()


def test_a_tied_head_is_written_once():
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)).eval()
    import tempfile
    from pathlib import Path
    path = Path(tempfile.mkdtemp()) / "tied.gguf"
    write_gguf(tied, None, path, "f16")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    back = read_back(path)
    assert back.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, tied(IDS).logits, rtol=0, atol=5e-3)


def test_export_gguf_carries_the_tokenizer(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "gguf"
    text = str(tiny_llama_dir / "config.json")
    assert main(["export", str(tiny_llama_dir), "--out", str(out), "--gguf", "q8_0", "--eval-text", text,
                 "--eval-windows", "2", "--seq-len", "32"]) == 0
    report = json.loads((out / "report.json").read_text())["gguf"]
    assert report["path"] == "model.gguf" and report["tokenizer"] and report["perplexity_ratio"] <= 1.02
    assert "held-out perplexity read back by transformers" in capsys.readouterr().out
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    sample = "def f(x):\n    return x ** 2  # héllo"
    assert tokenizer(sample).input_ids == byte_tokenizer()(sample).input_ids
    with torch.no_grad():
        got = read_back(out / "model.gguf")(IDS).logits
        want = tiny_llama()(IDS).logits
    assert float((got - want).norm() / want.norm()) < TOLERANCE["q8_0"]


def test_compress_writes_gguf_beside_the_checkpoint(tiny_llama_dir, tmp_path, texts):
    out = tmp_path / "out"
    assert main(compress_args(tiny_llama_dir, out, texts, "--gguf", "bf16")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["gguf"]["kind"] == "bf16" and report["gguf"]["perplexity_ratio"] <= 1.02
    checkpoint = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want, got = checkpoint(IDS).logits, read_back(out / "model.gguf")(IDS).logits
    assert float((got - want).norm() / want.norm()) < TOLERANCE["bf16"]


def test_gguf_refusals_write_nothing(tiny_llama_dir, tmp_path, texts, capsys):
    gpt2 = tmp_path / "gpt2"
    build("gpt2", Shape(layers=2)).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    program = tmp_path / "program"
    program.mkdir()
    save_program(capture(tiny_llama()), program)
    byte_tokenizer().save_pretrained(program)
    out = str(tmp_path / "x")
    cases = [
        (["export", str(gpt2), "--out", out, "--gguf", "f16"], "--gguf writes llama and qwen2 models; this one is 'gpt2'"),
        (["export", str(program), "--out", out, "--gguf", "f16"], "--gguf needs a Hugging Face model"),
        (["export", str(tiny_llama_dir), "--out", out, "--gguf", "f16", "--int8"], "drop --int8 and --with-past"),
        (["export", str(tiny_llama_dir), "--out", str(tmp_path / "m.gguf"), "--gguf", "f16"], "give a directory"),
        (compress_args(tiny_llama_dir, tmp_path / "x", texts, "--gguf", "f16", "--width", "1.5"), "cannot describe"),
        (compress_args(gpt2, tmp_path / "x", texts, "--gguf", "q8_0"), "this one is 'gpt2'"),
    ]
    for args, message in cases:
        assert main(args) == 2
        assert message in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "program"]
    with pytest.raises(FxflattenError, match="choose one of f16, bf16, q8_0"):
        write_gguf(tiny_llama(), None, tmp_path / "m.gguf", "q4_0")


@pytest.mark.slow
def test_default_model_round_trips_through_gguf(default_model, tmp_path):
    """The real model in q8_0: the file's tokenizer is the model's, and transformers reads back its weights."""
    model, tokenizer = default_model
    from fxflatten.load import default_gguf
    written = write_gguf(model, tokenizer, tmp_path / "model.gguf", "q8_0", default_gguf())
    fields = gguf.GGUFReader(str(written.path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    back_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    sample = "The capital of France is Paris. 12345 def f(x): return x**2  # ünïcödé"
    assert back_tokenizer(sample).input_ids == tokenizer(sample).input_ids
    assert (back_tokenizer.eos_token_id, back_tokenizer.bos_token_id) == (tokenizer.eos_token_id, tokenizer.bos_token_id)
    ids = tokenizer(sample * 4, return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = model(ids).logits, read_back(written.path)(ids).logits
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
