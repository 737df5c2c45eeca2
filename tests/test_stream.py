"""Streamed weights: a model loaded with ``stream=True`` compresses to the same result as the
same model in memory, without ever holding all its weights, and is written tensor by tensor."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file, save_file

from fxflatten import capture, compress
from fxflatten.cli.main import main
from fxflatten.errors import FxflattenError
from fxflatten.export.hf import to_pretrained
from fxflatten.export.sharded import write_checkpoint
from fxflatten.graph.discovery import discover_blocks
from fxflatten.load import load_model
from fxflatten.passes.prune import PrunePass
from fxflatten.pipeline import flatten
from fxflatten.plans import PruneConfig
from fxflatten.shards import INDEX
from fxflatten.weights import RESIDENT, StreamedTensor
from tests.checkpoints import byte_tokenizer, partial_dirs, tiny_llama
from tests.graphs import EXACT, FuseCase, fuse_cases
from tests.graphs import logits as graph_logits
from tests.models import VOCAB, Shape, build
from tests.test_properties import CALIB as PROPERTY_CALIB
from tests.test_properties import keep_everything
from tests.test_reliability import compress_args, one_line_error

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(2))


def saved(family: str, path: Path, layers: int = 4, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny ``family`` model saved as a checkpoint with a byte tokenizer."""
    build(family, Shape(layers=layers)).to(dtype).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def logits(graph: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return graph(IDS, torch.ones_like(IDS))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3"])
def test_a_streamed_model_captures_with_no_weight_in_memory_and_runs_the_same(family, tmp_path):
    path = saved(family, tmp_path / family)
    model, _ = load_model(path)
    skeleton, _ = load_model(path, stream=True)
    assert all(p.is_meta for p in skeleton.parameters())
    graph, dense = capture(skeleton), capture(model)
    assert all(isinstance(p, StreamedTensor) for p in graph.parameters())
    # Tied embeddings (GPT-2's) stay one parameter, as in memory.
    assert [(n, p.shape) for n, p in graph.named_parameters()] == [(n, p.shape) for n, p in dense.named_parameters()]
    assert torch.equal(logits(graph), logits(dense))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuse_cases(["llama", "mistral", "qwen2", "phi3", "gpt2"]))
def test_the_streamed_chain_computes_what_the_in_memory_chain_does(case: FuseCase):
    """Flatten, fold, fuse and prune keeping everything, on random shapes and groups: every pass
    reads and rewrites streamed weights exactly as it does weights in memory."""
    model = case.model()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
        skeleton, _ = load_model(tmp, stream=True)
        results = []
        for graph in (capture(model), capture(skeleton)):
            fused = flatten(graph, groups=case.groups)
            plans = keep_everything(fused.graph, case.groups, case.shape.layers)
            results.append(PrunePass(PROPERTY_CALIB, plans, PruneConfig(target="widened"))(fused.graph).graph_module)
        torch.testing.assert_close(graph_logits(results[1]), graph_logits(results[0]), **EXACT)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_streamed_and_in_memory_compress_agree(family, tmp_path):
    path = saved(family, tmp_path / family)
    model, _ = load_model(path)
    skeleton, _ = load_model(path, stream=True)
    in_memory = compress(capture(model), 0.3, CALIB)
    streamed = compress(capture(skeleton), 0.3, CALIB)
    assert streamed.groups == in_memory.groups and streamed.groups
    want = logits(in_memory.graph)
    assert float((logits(streamed.graph) - want).abs().max() / want.abs().max()) < 1e-5
    # Every weight the passes rewrote went to the scratch store, none into memory.
    assert all(isinstance(p, StreamedTensor) for p in streamed.graph.parameters())


def test_the_weights_are_never_all_in_memory_at_once(tmp_path):
    path = saved("llama", tmp_path / "llama", layers=8)
    skeleton, _ = load_model(path, stream=True)
    graph = capture(skeleton)
    whole = sum(p.numel() * p.dtype.itemsize for p in graph.parameters())
    block = sum(p.numel() * p.dtype.itemsize for name, p in graph.named_parameters() if ".layers.0." in name)
    RESIDENT.reset_peak()
    result = compress(graph, 0.3, CALIB)
    logits(result.graph)
    assert len(result.groups) >= 2
    # A block's weights are all held while its batches run (so the count sees them at once), and
    # one widened block, the embedding and the head at most: well under half the model.
    assert block <= RESIDENT.peak < whole / 2


def test_the_writer_shards_a_model_that_transformers_loads_back_exactly(tmp_path):
    path = saved("llama", tmp_path / "llama", dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    out = tmp_path / "out"
    out.mkdir()
    write_checkpoint(model, out, torch.bfloat16, shard_bytes=20_000)
    index = json.loads((out / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert back.dtype == torch.bfloat16
    want = model.state_dict()
    assert back.state_dict().keys() == want.keys()
    assert all(torch.equal(value, want[name]) for name, value in back.state_dict().items())


def test_untouched_streamed_weights_are_copied_without_being_read(tmp_path):
    path = saved("llama", tmp_path / "llama", dtype=torch.bfloat16)
    skeleton, _ = load_model(path, stream=True, dtype=torch.float32)
    graph = capture(skeleton)
    pretrained = to_pretrained(graph, skeleton, discover_blocks(graph))
    out = tmp_path / "out"
    out.mkdir()
    RESIDENT.reset_peak()
    before = RESIDENT.peak
    write_checkpoint(pretrained, out, torch.bfloat16, shard_bytes=20_000)
    assert RESIDENT.peak == before
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    want = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert back.dtype == torch.bfloat16
    assert all(torch.equal(value, want[name]) for name, value in back.state_dict().items())


def test_a_streamed_compress_writes_what_the_in_memory_one_writes(tmp_path, texts):
    path = tmp_path / "llama"
    tiny_llama().to(torch.bfloat16).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    outs, read = {}, {}
    for mode in ("memory", "stream"):
        outs[mode] = tmp_path / mode
        RESIDENT.reset_peak()
        before = RESIDENT.peak
        assert main(compress_args(path, outs[mode], texts, *(["--stream"] if mode == "stream" else []))) == 0
        read[mode] = RESIDENT.peak - before
    # Only the streamed run read weights from the checkpoint, a few at a time.
    whole = sum(t.numel() * 4 for t in load_file(path / "model.safetensors").values())
    assert read["memory"] == 0 and 0 < read["stream"] < whole
    assert sorted(p.name for p in outs["stream"].iterdir()) == sorted(p.name for p in outs["memory"].iterdir())
    weights = {mode: load_file(out / "model.safetensors") for mode, out in outs.items()}
    assert weights["stream"].keys() == weights["memory"].keys()
    assert all(t.dtype == torch.bfloat16 for t in weights["stream"].values())
    assert all(torch.equal(t, weights["memory"][name]) for name, t in weights["stream"].items())
    reports = {mode: json.loads((out / "report.json").read_text()) for mode, out in outs.items()}
    for report in reports.values():
        del report["steps"], report["stream"]
    assert reports["stream"] == reports["memory"]
    back = transformers.AutoModelForCausalLM.from_pretrained(outs["stream"])
    assert back.dtype == torch.bfloat16 and back.config.num_hidden_layers < 2


@pytest.mark.parametrize("extra, says", [
    (["--onnx"], "--onnx exports the whole model in memory"),
    (["--width", "1.5"], "--width and --flatten-share give blocks of other shapes"),
])
def test_stream_with_an_output_it_cannot_stream_is_refused_before_loading(extra, says, tiny_llama_dir, tmp_path, texts,
                                                                          capsys):
    out = tmp_path / "out"
    assert main(compress_args(tiny_llama_dir, out, texts, "--stream", *extra)) == 2
    assert says in one_line_error(capsys)
    assert not out.exists() and partial_dirs(tmp_path, "out") == []


def test_stream_needs_safetensors(tmp_path):
    path = tmp_path / "bin"
    model = build("llama")
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(FxflattenError, match="--stream reads safetensors checkpoints"):
        load_model(path, stream=True)


def test_a_checkpoint_lacking_a_tensor_is_refused_when_streamed(tmp_path):
    path = saved("llama", tmp_path / "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    skeleton, _ = load_model(path, stream=True)
    with pytest.raises(FxflattenError, match="holds no tensor for model.layers.1.mlp.up_proj.weight"):
        capture(skeleton)


@pytest.mark.slow
def test_the_default_model_streamed_compresses_like_in_memory(default_model):
    """The real model, streamed from its dequantized GGUF cache: same groups, same logits."""
    model, tokenizer = default_model
    from fxflatten.text import calibration_windows

    calib = calibration_windows(tokenizer, None, 8, 128)
    skeleton, _ = load_model("default", stream=True)
    dense = capture(model)
    in_memory = compress(dense, 0.1, calib)
    streamed = compress(capture(skeleton), 0.1, calib)
    assert streamed.groups == in_memory.groups
    ids = calib[:2, :64]
    with torch.no_grad():
        want = in_memory.graph(ids, torch.ones_like(ids))
        got = streamed.graph(ids, torch.ones_like(ids))
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    pretrained = to_pretrained(streamed.graph, skeleton, discover_blocks(dense))
    assert pretrained.config.num_hidden_layers == 30 - sum(len(g) - 1 for g in streamed.groups)
