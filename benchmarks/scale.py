"""How `compress` grows with depth on models of the size people compress, in memory and streamed.

``python -m benchmarks.scale`` writes randomly initialised Llama-shaped bf16 checkpoints (hidden
2048, MLP 8192, 16 heads / 8 KV heads, vocabulary 49152 with the default model's tokenizer) at
12, 24 and 36 layers (1.0, 1.7 and 2.5 billion parameters) and runs
``fxflatten compress --ratio 0.2`` on 4 x 128 calibration tokens on each, with the whole model in
memory and with ``--stream``, every run in a fresh process: the time and peak RSS of each step
come from the run's ``report.json``. Then the default model, in memory and streamed, alternately,
``--repeats`` times each (on 4 x 128 calibration tokens the compressed default model is far
from its quality at the default 64 x 512; this pair measures cost, not quality). Models are written under ``--work`` (default: a temporary directory,
removed at the end; about 11 GB for the three).

Both paths compute in float32 on the CPU (what ``--dtype auto`` takes there); the checkpoint's
own bf16 size is the yardstick for the streamed path's peak. ``--modes stream`` reruns one path
only and keeps the other's rows from the last results, marked with the date they were measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import transformers

from benchmarks.common import RESULTS, write_results
from fxflatten.load import load_model, saved_dtype
from fxflatten.tables import format_table

log = logging.getLogger(__name__)

SHAPE = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=8,
             max_position_embeddings=2048, tie_word_embeddings=False)


def write_checkpoint(path: Path, layers: int, tokenizer: transformers.PreTrainedTokenizerBase | None,
                     shape: dict = SHAPE) -> dict:
    """A random bf16 Llama of ``shape`` with ``layers`` layers saved at ``path`` (with ``tokenizer``,
    if given); its parameter count and size on disk."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(shape | {"num_hidden_layers": layers}))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    # Drawn tensor by tensor in bf16: a float32 model of 36 layers would take 10 GB to build.
    state = {name: torch.ones(t.shape, dtype=torch.bfloat16) if "norm" in name else
             (torch.randn(t.shape, dtype=torch.bfloat16) * 0.02) for name, t in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    parameters = sum(t.numel() for t in state.values())
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"parameters": parameters, "checkpoint_bytes": size}


def compress_run(model: Path | str, out: Path, args: argparse.Namespace, mode: str) -> dict:
    """``fxflatten compress`` on ``model`` in a fresh process; its report's steps, layers and total time."""
    command = [sys.executable, "-m", "fxflatten.cli", "compress", str(model), "--ratio", str(args.ratio), "--out", str(out),
               "--force", "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--eval-windows", "2",
               *(["--stream"] if mode == "stream" else [])]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "loads_in_transformers": loads_in_transformers(out, report["layers"]["after"], saved_dtype(model)), "steps": report["steps"], "layers": report["layers"], "groups": report["groups"],
            "peak_rss_mib": max(step["peak_rss_mib"] for step in report["steps"].values()),
            "x_dense": report.get("x_dense_geometric_mean"),
            "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
            "measured": time.strftime("%Y-%m-%d")}


def loads_in_transformers(out: Path, layers: int, dtype: torch.dtype) -> bool:
    """Whether plain transformers loads the written checkpoint, in the source's ``dtype`` and with
    ``layers`` layers, and computes finite logits with it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    return model.dtype == dtype and model.config.num_hidden_layers == layers and bool(torch.isfinite(logits).all())


def render(data: dict) -> str:
    runs = data["runs"]
    steps = list(next(iter(next(iter(runs.values()))["modes"].values()))["steps"])
    rows = []
    for layers, run in runs.items():
        for mode, result in run["modes"].items():
            rows.append([layers, mode, f"{run['parameters'] / 1e9:.2f}", f"{run['checkpoint_bytes'] / 2**30:.2f}",
                         f"{result['peak_rss_mib'] / 1024:.2f}", round(result["peak_rss_mib"] * 2**20 / run["checkpoint_bytes"], 2),
                         round(result["seconds"], 1), *(round(result["steps"][s]["seconds"], 1) for s in steps),
                         {True: "yes", False: "no"}.get(result.get("loads_in_transformers"), "not checked"), result["measured"]])
    lines = [
        "# compress against depth, in memory and streamed", "",
        f"`python -m benchmarks.scale`: random Llama-shaped bf16 checkpoints ({SHAPE['hidden_size']} hidden, "
        f"{SHAPE['intermediate_size']} MLP, {SHAPE['num_attention_heads']} heads / {SHAPE['num_key_value_heads']} KV heads, "
        f"vocabulary {SHAPE['vocab_size']}); `fxflatten compress --ratio {data['ratio']}` on {data['samples']} x {data['seq_len']} "
        "calibration tokens, each in a fresh process, on the CPU in float32 (`--dtype auto`): `memory` holds the whole "
        "model, `stream` (`--stream`) reads each weight from the checkpoint when it is used. "
        f"{data['cpus']} CPU cores, {data['memory_gib']:.0f} GiB RAM; one run per depth and mode.", "",
        "```",
        format_table(["layers", "weights", "parameters (B)", "checkpoint GiB", "peak RSS GiB", "peak / checkpoint", "total s",
                      *(f"{s} s" for s in steps), "loads in transformers", "measured"], rows),
        "```", "",
    ]
    for mode in ("memory", "stream"):
        depths = [layers for layers, run in runs.items() if mode in run["modes"]]
        if len(depths) > 1:
            first, last = (runs[d]["modes"][mode] for d in (min(depths, key=int), max(depths, key=int)))
            lines.append(f"- {mode}: peak RSS at {max(depths, key=int)} layers is {last['peak_rss_mib'] / first['peak_rss_mib']:.2f}x "
                         f"the {min(depths, key=int)}-layer peak and {last['peak_rss_mib'] * 2**20 / runs[max(depths, key=int)]['checkpoint_bytes']:.2f}x "
                         f"the checkpoint's own bf16 size; time {last['seconds'] / first['seconds']:.2f}x for "
                         f"{int(max(depths, key=int)) / int(min(depths, key=int)):.0f}x the depth.")
    default = data.get("default")
    if default:
        lines += ["", f"The default model (SmolLM2-135M, GGUF dequantized to float32), same settings, {default['repeats']} runs "
                  "of each mode alternating; medians:", "", "```",
                  format_table(["weights", "total s", "peak RSS MiB", "groups", "held-out perplexity x dense (geo. mean)"],
                               [[mode, round(r["seconds"], 1), round(r["peak_rss_mib"]), r["groups"], r["x_dense"]["compressed"]]
                                for mode, r in default["modes"].items()]),
                  "```", "",
                  f"Streamed against in memory: {default['modes']['stream']['seconds'] / default['modes']['memory']['seconds']:.2f}x "
                  f"the time, {default['modes']['stream']['peak_rss_mib'] / default['modes']['memory']['peak_rss_mib']:.2f}x the peak."]
    return "\n".join(lines) + "\n"


def median_run(runs: list[dict]) -> dict:
    """Median time and peak of repeated runs (the perplexity is the same in each)."""
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "x_dense": runs[0]["x_dense"], "groups": runs[0]["groups"], "all_seconds": [r["seconds"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 36])
    parser.add_argument("--modes", nargs="+", choices=["memory", "stream"], default=["memory", "stream"])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode on the default model (0: keep the last results')")
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoints are written (default: a temporary directory)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _, tokenizer = load_model("default")
    previous = json.loads((RESULTS / "scale.json").read_text()) if (RESULTS / "scale.json").is_file() else {}
    data = {"ratio": args.ratio, "samples": args.samples, "seq_len": args.seq_len, "cpus": psutil.cpu_count(),
            "memory_gib": psutil.virtual_memory().total / 2**30, "shape": SHAPE,
            "runs": {layers: run for layers, run in previous.get("runs", {}).items() if int(layers) not in args.layers}}
    with tempfile.TemporaryDirectory(prefix="fxflatten-scale-", dir=args.work) as work:
        for layers in args.layers:
            model, out = Path(work) / f"llama-{layers}", Path(work) / f"out-{layers}"
            log.info("writing a %d-layer checkpoint", layers)
            run = data["runs"][str(layers)] = write_checkpoint(model, layers, tokenizer)
            kept = previous.get("runs", {}).get(str(layers), {}).get("modes", {})
            run["modes"] = {mode: kept[mode] for mode in ("memory", "stream") if mode not in args.modes and mode in kept}
            for mode in args.modes:
                log.info("compressing it (%s)", mode)
                run["modes"][mode] = compress_run(model, out, args, mode)
                shutil.rmtree(out)
            run["modes"] = {mode: run["modes"][mode] for mode in ("memory", "stream") if mode in run["modes"]}
            data["runs"] = dict(sorted(data["runs"].items(), key=lambda item: int(item[0])))
            shutil.rmtree(model)
            write_results("scale", render(data), data)
        if args.repeats:
            runs: dict[str, list[dict]] = {"memory": [], "stream": []}
            for _ in range(args.repeats):
                for mode in runs:
                    out = Path(work) / f"default-{mode}"
                    runs[mode].append(compress_run("default", out, args, mode))
                    shutil.rmtree(out)
            data["default"] = {"repeats": args.repeats, "modes": {mode: median_run(r) for mode, r in runs.items()}}
        elif "default" in previous:
            data["default"] = previous["default"]
    write_results("scale", render(data), data)
    print(render(data))


if __name__ == "__main__":
    main()
