"""The fxflatten command: tables, JSON, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from fxflatten.cli import main
from tests.models import VOCAB, Shape, build


def save_with_tokenizer(model, path):
    # As the command does: transformers' progress bars would share stderr with the error line
    # the tests read, when a test runs before any command has.
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    tokenizer.save_pretrained(path)
    return path


def test_inspect_prints_the_block_table(tmp_path, capsys):
    model_dir = save_with_tokenizer(build("qwen2", Shape(layers=3)), tmp_path / "qwen2")
    assert main(["inspect", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "3 blocks, hidden size 32" in out
    assert out.count("model.layers.") == 3


def test_inspect_json_reports_heads_and_widths(tmp_path, capsys):
    model_dir = save_with_tokenizer(build("llama", Shape(layers=2, heads=6, kv_heads=3, head_dim=4, hidden=24, width=40)), tmp_path / "llama")
    assert main(["inspect", str(model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_blocks"] == 2
    assert [(b["heads"], b["kv_heads"], b["head_dim"], b["mlp_width"]) for b in report["blocks"]] == [(6, 3, 4, 40)] * 2
    assert report["blocks"][1]["linears"]["q"] == "model.layers.1.self_attn.q_proj.weight"


def test_post_norm_model_is_refused_with_exit_status_2(tmp_path, capsys):
    model_dir = save_with_tokenizer(build("bert"), tmp_path / "bert")
    assert main(["inspect", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxflatten: error:") and "post-norm" in err and "\n" not in err


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_sandwich_norm_model_is_refused_before_selection_and_nothing_is_written(family, tmp_path, capsys, monkeypatch):
    import fxflatten.selection

    def fail(*args, **kwargs):
        raise AssertionError("selection ran before the refusal")

    monkeypatch.setattr(fxflatten.selection, "hidden_similarity", fail)
    model_dir = save_with_tokenizer(build(family, Shape(layers=4)), tmp_path / family)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{i % VOCAB}" for i in range(2000)))
    out = tmp_path / "out"
    args = ["compress", str(model_dir), "--ratio", "0.3", "--out", str(out), "--calib", str(text), "--eval-text", str(text),
            "--samples", "4", "--seq-len", "16", "--eval-windows", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxflatten: error: block 0 normalises each branch's output") and "Gemma" in err and "\n" not in err
    assert not out.exists()
    assert main([*args, "--flatten-share", "0"]) == 2  # width pruning alone is refused the same way, not crashed


def test_missing_model_path_is_a_one_line_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such file" in err and "\n" not in err


@pytest.mark.slow
def test_inspect_default_model(default_model, capsys):
    assert main(["inspect", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_blocks"] == 30 and report["hidden_size"] == 576
    assert {(b["heads"], b["kv_heads"], b["head_dim"], b["mlp_width"], b["norm"]) for b in report["blocks"]} == {(9, 3, 64, 1536, "rms")}
    assert all(b["fusable"] for b in report["blocks"])


def test_flatten_dry_run_prints_similarities_and_groups(tiny_llama_dir, capsys):
    args = ["flatten", str(tiny_llama_dir), "--ratio", "0.3", "--dry-run", "--calib", str(tiny_llama_dir / "config.json"),
            "--samples", "4", "--seq-len", "32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cos(in, next in)" in out and "groups: [[0, 1]]" in out


def test_flatten_writes_a_widened_program_with_its_perplexity(tiny_llama_dir, tmp_path):
    from fxflatten.export.program import load_program

    out = tmp_path / "widened"
    text = str(tiny_llama_dir / "config.json")
    args = ["flatten", str(tiny_llama_dir), "--ratio", "0.3", "--out", str(out), "--calib", text, "--samples", "4",
            "--seq-len", "32", "--eval-text", text, "--eval-windows", "2"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["layers"] == {"before": 2, "after": 1} and report["parameters"]["after"] < report["parameters"]["before"]
    assert report["perplexity"]["widened"] > 0
    graph = load_program(out)
    ids = torch.randint(0, 257, (2, 9))
    assert graph(ids, torch.ones_like(ids)).shape == (2, 9, 257)


def test_too_small_a_ratio_is_a_one_line_error(tiny_llama_dir, capsys):
    args = ["flatten", str(tiny_llama_dir), "--ratio", "0.01", "--dry-run", "--calib", str(tiny_llama_dir / "config.json"),
            "--samples", "4", "--seq-len", "32"]
    assert main(args) == 2
    assert "too small to remove one block" in capsys.readouterr().err


def test_a_flattened_share_above_the_ratio_is_a_one_line_error_before_loading(tmp_path, capsys):
    args = ["compress", str(tmp_path / "missing"), "--ratio", "0.2", "--flatten-share", "0.3", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "--flatten-share must be in [0, --ratio 0.2]" in capsys.readouterr().err


def test_compress_command_writes_a_checkpoint_and_report(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    source = {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir() if p.is_file()}
    args = ["compress", str(tiny_llama_dir), "--ratio", "0.3", "--out", str(out), "--calib", str(tiny_llama_dir / "config.json"),
            "--samples", "4", "--seq-len", "32", "--eval-text", str(tiny_llama_dir / "config.json"), "--eval-windows", "2"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "huggingface" and report["layers"]["after"] < report["layers"]["before"]
    assert 0 < report["ratio"]["achieved"] <= 0.3
    assert report["prune"]["config"]["refit_inputs"] is True
    # Each of compress's steps has its own time and memory, beside loading and evaluating.
    assert {"load", "capture", "select", "flatten", "prune", "evaluate"} <= report["steps"].keys()
    assert all(stage["seconds"] > 0 and stage["peak_rss_mib"] > 0 for stage in report["steps"].values())
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == report["layers"]["after"]
    assert {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir() if p.is_file()} == source
    assert main(args) == 2  # the output exists: refused without --force
    assert "already exists" in capsys.readouterr().err


def test_compress_command_with_no_flattened_share_width_prunes_into_a_program(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    args = ["compress", str(tiny_llama_dir), "--ratio", "0.3", "--flatten-share", "0", "--no-input-refit", "--out", str(out),
            "--calib", str(tiny_llama_dir / "config.json"), "--samples", "4", "--seq-len", "32",
            "--eval-text", str(tiny_llama_dir / "config.json"), "--eval-windows", "2"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["flatten_share"] == 0 and report["groups"] == []
    assert report["prune"]["config"]["refit_inputs"] is False
    assert report["layers"]["after"] == report["layers"]["before"]
    assert report["ratio"]["achieved"] == pytest.approx(0.3, abs=0.03)
    assert report["format"] == "torch.export" and (out / "model.pt2").is_file()
    assert "flatten" not in report["steps"]  # nothing to flatten, so the flatten passes do not run


def test_the_command_speaks_only_for_itself(tmp_path):
    """``import fxflatten`` defers torch and transformers, so the command sets up logging before
    transformers imports torchao (when installed), whose import logs about its CUDA kernels."""
    imported = subprocess.run([sys.executable, "-c", "import sys, fxflatten, fxflatten.cli; print('transformers' in sys.modules)"],
                              capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"
    import fxflatten

    assert all(getattr(fxflatten, name) is not None for name in fxflatten.__all__)
    model_dir = save_with_tokenizer(build("llama", Shape(layers=2)), tmp_path / "llama")
    run = subprocess.run([sys.executable, "-c", "import sys; from fxflatten.cli import main; sys.exit(main(sys.argv[1:]))",
                          "inspect", str(model_dir)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
