"""--device and --dtype: where compress runs, in which precision, and the dtype it writes."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from fxflatten.cli import main
from fxflatten.device import compute_dtype, resolve_device
from fxflatten.errors import FxflattenError
from fxflatten.load import saved_dtype
from tests.checkpoints import byte_tokenizer, tiny_llama


def test_auto_is_the_cpu_when_no_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec, message", [
    ("cuda", "no CUDA GPU is visible"), ("cuda:0", "no CUDA GPU is visible"),
    ("mps", "runs on the CPU or on CUDA GPUs"), ("gpu0", "is not a device"),
])
def test_a_device_that_cannot_be_used_is_refused_in_one_line(spec, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FxflattenError, match=message) as error:
        resolve_device(spec)
    assert "\n" not in str(error.value)


def test_a_gpu_index_beyond_the_visible_ones_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(FxflattenError, match="sees 2 GPU"):
        resolve_device("cuda:2")


def test_auto_dtype_is_the_checkpoints_own_on_a_gpu_and_float32_on_a_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype("auto", cpu, torch.bfloat16) == torch.float32
    assert compute_dtype("auto", cuda, torch.bfloat16) == torch.bfloat16
    assert compute_dtype("float16", cpu, torch.float32) == torch.float16
    with pytest.raises(FxflattenError, match="--dtype 'int8'"):
        compute_dtype("int8", cpu, torch.float32)


@pytest.mark.parametrize("config, dtype", [
    ({"dtype": "bfloat16"}, torch.bfloat16), ({"torch_dtype": "float16"}, torch.float16), ({}, torch.float32),
    ({"dtype": "int8"}, torch.float32),
])
def test_the_saved_dtype_is_read_from_config_json(config, dtype, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert saved_dtype(tmp_path) == dtype
    assert saved_dtype("default") == torch.float32  # the GGUF cache holds float32


def compress_args(model_dir, out, *extra):
    return ["compress", str(model_dir), "--ratio", "0.3", "--out", str(out), "--calib", str(model_dir / "config.json"),
            "--samples", "4", "--seq-len", "32", "--eval-text", str(model_dir / "config.json"), "--eval-windows", "2", *extra]


def test_compress_on_a_gpu_that_is_not_there_is_a_one_line_error_and_writes_nothing(tiny_llama_dir, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert main(compress_args(tiny_llama_dir, out, "--device", "cuda")) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA GPU is visible" in err and "--device cpu" in err and "\n" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_bfloat16_checkpoint_compresses_to_a_bfloat16_checkpoint_that_transformers_loads(tmp_path):
    source = tmp_path / "bf16"
    tiny_llama().to(torch.bfloat16).save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    out = tmp_path / "out"
    assert main(compress_args(source, out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["device"], report["dtype"]) == ("cpu", "float32")  # auto on a CPU: computed in float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"BF16"}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded.config.num_hidden_layers == report["layers"]["after"] < report["layers"]["before"]


def test_compress_can_run_in_bfloat16_and_still_writes_the_source_dtype(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert main(compress_args(tiny_llama_dir, out, "--dtype", "bfloat16")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["format"] == "huggingface"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # the source's own

