"""How `compress` grows with depth on models of the size people compress: time and peak memory.

``python -m benchmarks.scale`` writes randomly initialised Llama-shaped bf16 checkpoints (hidden
2048, MLP 8192, 16 heads / 8 KV heads, vocabulary 49152 with the default model's tokenizer) at
12, 24 and 36 layers (1.0, 1.7 and 2.5 billion parameters) and runs
``fxflatten compress --ratio 0.2`` on 4 x 128 calibration tokens on each, every run in a fresh
process: the time and peak RSS of each step come from the run's ``report.json``. Models are
written under ``--work`` (default: a temporary directory, removed at the end; about 11 GB for the
three).

This measures the in-memory path (the whole model in float32 on the CPU, what ``--dtype auto``
takes there); the checkpoint's own bf16 size is the yardstick a streaming path would have to stay
below.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import transformers

from benchmarks.common import write_results
from fxflatten.load import load_model
from fxflatten.tables import format_table

log = logging.getLogger(__name__)

SHAPE = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=8,
             max_position_embeddings=2048, tie_word_embeddings=False)


def write_checkpoint(path: Path, layers: int, tokenizer: transformers.PreTrainedTokenizerBase) -> dict:
    """A random bf16 Llama of ``layers`` layers saved at ``path``; its parameter count and size on disk."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPE, num_hidden_layers=layers)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    # Drawn tensor by tensor in bf16: a float32 model of 36 layers would take 10 GB to build.
    state = {name: torch.ones(t.shape, dtype=torch.bfloat16) if "norm" in name else
             (torch.randn(t.shape, dtype=torch.bfloat16) * 0.02) for name, t in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    parameters = sum(t.numel() for t in state.values())
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"parameters": parameters, "checkpoint_bytes": size}


def compress_run(model: Path, out: Path, args: argparse.Namespace) -> dict:
    """``fxflatten compress`` on ``model`` in a fresh process; its report's steps, layers and total time."""
    command = [sys.executable, "-m", "fxflatten.cli", "compress", str(model), "--ratio", str(args.ratio), "--out", str(out),
               "--force", "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--eval-windows", "2"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "steps": report["steps"], "layers": report["layers"], "groups": report["groups"],
            "peak_rss_mib": max(step["peak_rss_mib"] for step in report["steps"].values()),
            "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}


def render(data: dict) -> str:
    runs = data["runs"]
    steps = list(next(iter(runs.values()))["steps"])
    rows = []
    for layers, run in runs.items():
        rows.append([layers, f"{run['parameters'] / 1e9:.2f}", f"{run['checkpoint_bytes'] / 2**30:.2f}",
                     f"{run['peak_rss_mib'] / 1024:.2f}", round(run["peak_rss_mib"] * 2**20 / run["checkpoint_bytes"], 2),
                     round(run["seconds"], 1), *(round(run["steps"][s]["seconds"], 1) for s in steps)])
    first, last = runs[min(runs, key=int)], runs[max(runs, key=int)]
    return "\n".join([
        "# compress against depth", "",
        f"`python -m benchmarks.scale`: random Llama-shaped bf16 checkpoints ({SHAPE['hidden_size']} hidden, "
        f"{SHAPE['intermediate_size']} MLP, {SHAPE['num_attention_heads']} heads / {SHAPE['num_key_value_heads']} KV heads, "
        f"vocabulary {SHAPE['vocab_size']}); `fxflatten compress --ratio {data['ratio']}` on {data['samples']} x {data['seq_len']} "
        "calibration tokens, each in a fresh process, on the CPU in float32 (`--dtype auto`), the whole model in memory. "
        f"{data['cpus']} CPU cores, {data['memory_gib']:.0f} GiB RAM; one run per depth.", "",
        "```",
        format_table(["layers", "parameters (B)", "checkpoint GiB", "peak RSS GiB", "peak / checkpoint", "total s",
                      *(f"{s} s" for s in steps)], rows),
        "```", "",
        f"Peak RSS at {max(runs, key=int)} layers is {last['peak_rss_mib'] / first['peak_rss_mib']:.2f}x the "
        f"{min(runs, key=int)}-layer peak and {last['peak_rss_mib'] * 2**20 / last['checkpoint_bytes']:.2f}x the checkpoint's "
        "own bf16 size: the in-memory path holds the whole model in float32 (twice the bf16 checkpoint) and grows with depth.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 36])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoints are written (default: a temporary directory)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _, tokenizer = load_model("default")
    data = {"ratio": args.ratio, "samples": args.samples, "seq_len": args.seq_len, "cpus": psutil.cpu_count(),
            "memory_gib": psutil.virtual_memory().total / 2**30, "shape": SHAPE, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="fxflatten-scale-", dir=args.work) as work:
        for layers in args.layers:
            model, out = Path(work) / f"llama-{layers}", Path(work) / f"out-{layers}"
            log.info("writing a %d-layer checkpoint", layers)
            data["runs"][str(layers)] = write_checkpoint(model, layers, tokenizer)
            log.info("compressing it")
            data["runs"][str(layers)] |= compress_run(model, out, args)
            for path in (model, out):
                shutil.rmtree(path)
            write_results("scale", render(data), data)
    print(render(data))


if __name__ == "__main__":
    main()
