"""Reliability: bad input fails in one line, nothing is half-written or lost, runs repeat
exactly, and non-finite numbers stop a run with a message saying where they are.

tests/README.md maps each failure mode to the test here (or elsewhere) covering it. Tests of one
module's own checks live in that module's test file.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from fxflatten import capture, compress, load_model
from fxflatten import load as load_module
from fxflatten.cli import main
from fxflatten.errors import FxflattenError
from tests.checkpoints import byte_tokenizer, nan_model, old_output, partial_dirs, snapshot, tiny_llama
from tests.models import build

REPO = Path(__file__).resolve().parent.parent
#: Put on the command's PYTHONPATH as ``sitecustomize.py``: it stops the process where it would
#: write report.json (the last file) into an unfinished output directory, after touching the
#: file named by FXFLATTEN_TEST_STOPPED, and waits there for the test's signal.
STOP_BEFORE_REPORT = """\
import os
import pathlib
import time

write_text = pathlib.Path.write_text


def write_text_or_stop(self, *args, **kwargs):
    if self.name == "report.json" and ".partial-" in self.parent.name:
        pathlib.Path(os.environ["FXFLATTEN_TEST_STOPPED"]).touch()
        while True:
            time.sleep(1)
    return write_text(self, *args, **kwargs)


pathlib.Path.write_text = write_text_or_stop
"""


# -- helpers ----------------------------------------------------------------------------------

def compress_args(model: Path | str, out: Path, texts: tuple[Path, Path], *extra: str) -> list[str]:
    calib, evaluation = texts
    return ["compress", str(model), "--ratio", "0.3", "--out", str(out), "--calib", str(calib),
            "--eval-text", str(evaluation), "--samples", "4", "--seq-len", "32", "--eval-windows", "2", *extra]


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    """The single ``fxflatten: error:`` line on stderr; there must be no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fxflatten: error:")]
    assert len(lines) == 1, err
    return lines[0]


def save_model(model: nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


# -- 1. bad input: one line, exit status 2, nothing written ----------------------------------

def truncated_safetensors(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    model = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


def garbage_gguf(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    return path


def truncated_gguf(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    """A GGUF v3 header (magic, version, tensor count) cut off before its key-value count."""
    path = tmp_path / "truncated.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQ", 3, 10) + b"\x01\x02")
    return path


def not_a_model(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    path = tmp_path / "notes"
    path.mkdir()
    (path / "README.txt").write_text("not a model")
    return path


def encoder_decoder(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    config = transformers.T5Config(vocab_size=257, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
    return save_model(transformers.T5ForConditionalGeneration(config), tmp_path / "t5")


def post_norm(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    return save_model(build("bert"), tmp_path / "bert")


def config_for_other_weights(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    """A valid config.json asking for three layers beside weights for two: transformers would
    fill the third with random values and only log it."""
    model = tmp_path / "edited"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    return model


def sharded(tmp_path: Path) -> Path:
    """The tiny Llama saved in several shards with their index."""
    model = save_model(tiny_llama(), tmp_path / "sharded")
    tiny_llama().save_pretrained(model, max_shard_size="100KB")
    (model / "model.safetensors").unlink(missing_ok=True)
    return model


def index_naming_a_missing_shard(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    model = sharded(tmp_path)
    (model / "model-00002-of-00002.safetensors").unlink()
    return model


def shard_of_the_wrong_shape(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    model = sharded(tmp_path)
    shard = model / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    save_file(tensors | {name: tensors[name][..., :-1].contiguous()}, shard, metadata={"format": "pt"})
    return model


def missing(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    return tmp_path / "nothing-here"


@pytest.mark.parametrize("make_model, fragment", [
    (missing, "no such file or directory"),
    (not_a_model, "has no config.json"),
    (truncated_safetensors, "truncated or corrupt"),
    (index_naming_a_missing_shard, "model.safetensors.index.json names model-00002-of-00002.safetensors, which is not in"),
    (shard_of_the_wrong_shape, "has shape [257, 31] but"),
    (config_for_other_weights, "does not match config.json: 9 missing tensors"),
    (garbage_gguf, "cannot read this GGUF file"),
    (truncated_gguf, "cannot read this GGUF file"),
    (encoder_decoder, "encoder-decoder"),
    (post_norm, "post-norm"),
])
def test_a_bad_model_is_a_one_line_error_and_writes_nothing(make_model, fragment, tiny_llama_dir, texts, tmp_path,
                                                             capsys, monkeypatch):
    monkeypatch.setenv("FXFLATTEN_CACHE", str(tmp_path / "cache"))
    model = make_model(tmp_path, tiny_llama_dir)
    out = tmp_path / "out"
    assert main(compress_args(model, out, texts)) == 2
    assert fragment in one_line_error(capsys)
    assert not out.exists() and partial_dirs(tmp_path, "out") == []
    # A GGUF file that cannot be read leaves no cache entry behind either.
    assert not (tmp_path / "cache" / "gguf").exists() or list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_an_unreadable_model_is_a_one_line_error(tiny_llama_dir, tmp_path, texts, capsys, monkeypatch):
    model = tmp_path / "locked"
    shutil.copytree(tiny_llama_dir, model)
    if os.geteuid() != 0:
        model.chmod(0)
    else:  # root reads every file, so the refusal an ordinary user gets is simulated
        real_stat = Path.stat

        def stat(self: Path, *args, **kwargs):
            if self != model and model in self.parents:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_stat(self, *args, **kwargs)

        monkeypatch.setattr(Path, "stat", stat)
    try:
        assert main(compress_args(model, tmp_path / "out", texts)) == 2
    finally:
        model.chmod(0o755)
    assert "permission denied" in one_line_error(capsys)


@pytest.mark.parametrize("ratio", ["0", "-0.1", "0.95", "1.5"])
def test_a_ratio_outside_the_range_is_refused_before_loading(ratio, tmp_path, texts, capsys):
    # The model does not exist: the ratio is checked first, so a bad one costs no load.
    args = compress_args(tmp_path / "no-model", tmp_path / "out", texts)
    args[args.index("--ratio") + 1] = ratio
    assert main(args) == 2
    assert "--ratio must be in (0, 0.9]" in one_line_error(capsys)


def test_a_ratio_too_small_for_one_block_is_refused_before_calibration(tiny_llama_dir, tmp_path, texts, capsys,
                                                                       monkeypatch):
    def calibration_must_not_run(*args, **kwargs):
        raise AssertionError("similarities were computed for a ratio that cannot remove a block")

    monkeypatch.setattr("fxflatten.selection.hidden_similarity", calibration_must_not_run)
    args = compress_args(tiny_llama_dir, tmp_path / "out", texts)
    args[args.index("--ratio") + 1] = "0.01"
    assert main(args) == 2
    line = one_line_error(capsys)
    assert "too small to remove one block" in line and "removes 0.242 of the model" in line


def test_too_short_a_calibration_text_says_how_much_is_needed(tiny_llama_dir, tmp_path, texts, capsys):
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)  # 100 tokens; 4 windows of 32 need 128
    assert main(compress_args(tiny_llama_dir, tmp_path / "out", (short, texts[1]))) == 2
    line = one_line_error(capsys)
    assert "need 128 tokens but the text has 100" in line


def test_too_little_room_for_the_spill_is_a_one_line_error_naming_tmpdir(tiny_llama_dir, tmp_path, texts, capsys,
                                                                        monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    assert main(compress_args(tiny_llama_dir, out, texts)) == 2
    line = one_line_error(capsys)
    assert f"to {tmp_path / 'tmp'} (TMPDIR), which has 0.00 GiB free; point TMPDIR at a disk with more room" in line
    assert not out.exists() and partial_dirs(tmp_path, "out") == [] and list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB")])
def test_running_out_of_memory_names_the_stage_and_what_to_shrink(error, tiny_llama_dir, tmp_path, texts, capsys,
                                                                  monkeypatch):
    def exhausted(self, graph_module):
        raise error

    monkeypatch.setattr("fxflatten.passes.prune.PrunePass.call", exhausted)
    out = tmp_path / "out"
    assert main(compress_args(tiny_llama_dir, out, texts)) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"fxflatten: error: out of memory during prune ({str(error).splitlines()[0]}); pass fewer --samples")
    assert not out.exists() and partial_dirs(tmp_path, "out") == []


def test_other_runtime_errors_keep_their_traceback(tiny_llama_dir, tmp_path, texts, monkeypatch):
    def broken(self, graph_module):
        raise RuntimeError("shape mismatch in a pass")

    monkeypatch.setattr("fxflatten.passes.prune.PrunePass.call", broken)
    with pytest.raises(RuntimeError, match="shape mismatch in a pass"):
        main(compress_args(tiny_llama_dir, tmp_path / "out", texts))


@pytest.mark.parametrize("command", ["compress", "flatten"])
def test_an_existing_output_is_refused_without_force_before_loading(command, tmp_path, texts, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's earlier result")
    args = compress_args(tmp_path / "no-model", out, texts)
    args[0] = command
    assert main(args) == 2
    assert "already exists; pass --force" in one_line_error(capsys)
    assert (out / "keep.txt").read_text() == "the user's earlier result"


# -- 2. nothing half-written, nothing lost ----------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tiny_llama_dir, texts, tmp_path_factory) -> dict[str, object]:
    """Two compress runs of one source with one seed, and the source's files before and after."""
    root = tmp_path_factory.mktemp("two-runs")
    before = snapshot(tiny_llama_dir)
    outs = [root / "first", root / "second"]
    codes = [main(compress_args(tiny_llama_dir, out, texts, "--seed", "7")) for out in outs]
    return {"codes": codes, "outs": outs, "before": before, "after": snapshot(tiny_llama_dir)}


def test_compress_leaves_the_source_model_directory_unchanged(two_runs):
    assert two_runs["codes"] == [0, 0]
    assert two_runs["after"] == two_runs["before"]


def test_compress_leaves_the_source_gguf_file_unchanged(tmp_path, texts, monkeypatch):
    monkeypatch.setenv("FXFLATTEN_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(bytes(random.Random(3).randrange(256) for _ in range(1 << 16)))
    dequantized = []

    def dequantize(path: Path):
        # transformers' own reading of a GGUF file is its business; what fxflatten does with
        # the file around it (fingerprint, cache, compress) is what must leave it unchanged.
        dequantized.append(path)
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": path.name}
        return model, byte_tokenizer()

    monkeypatch.setattr(load_module, "_dequantize", dequantize)
    before = snapshot(gguf)
    assert main(compress_args(gguf, tmp_path / "out", texts)) == 0
    assert dequantized == [gguf] and (tmp_path / "out" / "report.json").is_file()
    assert snapshot(gguf) == before


@pytest.mark.parametrize("sig, with_old_output", [
    pytest.param(signal.SIGINT, False, id="SIGINT-no-old-output"),
    pytest.param(signal.SIGKILL, True, id="SIGKILL-old-output"),
])
def test_a_run_killed_while_saving_leaves_the_old_output_or_none(sig, with_old_output, tiny_llama_dir, texts,
                                                                 tmp_path):
    """Start the real command, wait until it is stopped inside the save (weights written,
    report.json not yet), and signal it there."""
    out = tmp_path / "out"
    before = old_output(out) if with_old_output else None
    hook, stopped = tmp_path / "hook", tmp_path / "stopped"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_BEFORE_REPORT)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path, "FXFLATTEN_TEST_STOPPED": str(stopped)}
    args = [sys.executable, "-m", "fxflatten.cli", *compress_args(tiny_llama_dir, out, texts, "--force")]
    with (tmp_path / "stderr").open("w") as stderr:
        # A runner started in the background (CI, nohup) hands its children SIGINT ignored, and
        # Python then never turns it into KeyboardInterrupt: restore the default, as a terminal has.
        process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 300
            while not stopped.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stopped.exists(), f"the command never reached the save:\n{(tmp_path / 'stderr').read_text()}"
            # Stopped mid-save: one unfinished directory, holding files but no report.json.
            (partial,) = partial_dirs(tmp_path, "out")
            written = {p.name for p in partial.iterdir()}
            assert written and "report.json" not in written
            process.send_signal(sig)
            process.wait(timeout=300)  # a loaded machine may take long to unwind and exit
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    err = (tmp_path / "stderr").read_text()
    # Killed mid-save: neither finished (0) nor failed for another reason.
    assert process.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
    if with_old_output:
        assert snapshot(out) == before
    else:
        assert not out.exists()
    leftovers = partial_dirs(tmp_path, "out")
    assert not any((p / "report.json").exists() for p in leftovers)
    if sig == signal.SIGINT:
        assert leftovers == []
        assert "Traceback" not in err and err.rstrip().endswith("fxflatten: interrupted; no partial output was left (an existing one is unchanged)")


# -- 3. determinism ---------------------------------------------------------------------------

def test_same_inputs_and_seed_give_bit_identical_weights_and_report(two_runs):
    first, second = two_runs["outs"]
    assert two_runs["codes"] == [0, 0]
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    weights = load_file(first / "model.safetensors")
    assert weights.keys() == load_file(second / "model.safetensors").keys() and len(weights) > 0

    def figures(out: Path) -> dict[str, object]:
        report = json.loads((out / "report.json").read_text())
        del report["steps"]  # times and memory
        return report

    assert figures(first) == figures(second)
    assert figures(first)["perplexity"]["compressed"] > 0


# -- 4. numerical safety ----------------------------------------------------------------------

def test_compress_command_stops_at_a_nan_weight_naming_its_block(tmp_path, texts, capsys):
    model = save_model(nan_model(), tmp_path / "nan")
    out = tmp_path / "out"
    assert main(compress_args(model, out, texts)) == 2
    assert "model.layers.1.mlp.down_proj.weight is not finite" in one_line_error(capsys)
    assert not out.exists()


def test_compress_api_stops_at_a_nan_weight_with_an_error_naming_its_block():
    calib = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(FxflattenError, match=r"block 1|layers\.1\."):
        compress(capture(nan_model()), ratio=0.3, calib=calib)


def test_a_bfloat16_checkpoint_loads_in_float32(tmp_path):
    path = save_model(tiny_llama().to(torch.bfloat16), tmp_path / "bf16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    model, _ = load_model(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_bfloat16_graph_compresses_like_its_float32_self():
    """Half-precision graphs compress (statistics in float32/64) to nearly the float32 result:
    a few times what bf16 rounding alone changes in the dense model, far less than pruning
    changes (a refit solved in bf16 would not be)."""
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    dense, dense_half = build("llama"), build("llama").to(torch.bfloat16)
    full = compress(capture(dense), calib=calib, groups=[[0, 1]]).graph
    half = compress(capture(dense_half), calib=calib, groups=[[0, 1]]).graph
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        expected = full(ids, torch.ones_like(ids))
        got = half(ids, torch.ones_like(ids)).float()
        original, original_half = dense(ids).logits, dense_half(ids).logits.float()

    def relative(a, b):
        return float((a - b).norm() / b.norm())
    assert relative(got, expected) < 5 * relative(original_half, original)
    assert relative(got, expected) < 0.1 * relative(expected, original)
