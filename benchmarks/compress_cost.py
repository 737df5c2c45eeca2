"""Time and peak memory of compressing the default model, next to two plain forward passes.

Measured side by side in one process on the same calibration windows, so the ratio holds on a
noisy machine: `compress` (select, flatten, fold, fuse, prune) against two forward passes of
the captured dense graph over the same windows, and the peak RSS of each against the float32
weights plus one layer's calibration activations: of the whole process, above what it holds
before loading anything, and above what it holds once the code a run loads is in too.

    python -m benchmarks.compress_cost [--samples 128] [--seq-len 512] [--repeats 1]

Writes benchmarks/results/compress_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import gc
import statistics

import psutil
import torch

from benchmarks.common import write_results
from fxflatten import capture, compress, discover_blocks, load_model
from fxflatten.run.profiler import Profiler, Step
from fxflatten.run.spill import release_free_memory
from fxflatten.tables import format_table
from fxflatten.text import calibration_windows


def code_rss_mib() -> float:
    """RSS once the code a run imports on the way is loaded, but none of its data.

    Loading a Llama imports transformers' model code and capturing it imports torch.export's
    machinery (about 150 MiB on this machine); a 2-layer toy Llama built from a config and
    captured, then freed, loads the same code with almost no data. (Imported here, so that the
    RSS measured before it is what the runtime holds before any model code is imported.)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    toy = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).eval()
    capture(toy)
    del toy
    gc.collect()
    release_free_memory()
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    # What the interpreter, torch and transformers hold before any model or data is loaded.
    runtime_mib = psutil.Process().memory_info().rss / 2**20
    code_mib = code_rss_mib()
    torch.manual_seed(0)
    model, tokenizer = load_model("default")
    calib = calibration_windows(tokenizer, None, args.samples, args.seq_len)
    graph = capture(model)
    block_map = discover_blocks(graph)
    forward, compressing = [], []
    profiler = Profiler()
    for repeat in range(args.repeats):
        with torch.no_grad(), profiler(f"two forward passes #{repeat}"):
            for _ in range(2):
                for chunk in calib.split(4):
                    graph(chunk, torch.ones_like(chunk))
        forward.append(profiler.done[-1])
        steps = Profiler()  # select, flatten and prune inside this compress
        with profiler(f"compress #{repeat}"):
            compress(graph, args.ratio, calib, profiler=steps)
        compressing.append(profiler.done[-1])
        profiler.done += [Step(f"  {s.name} #{repeat}", s.seconds, s.peak_rss_mib) for s in steps.done]
    weights_mib = sum(p.numel() * p.element_size() for p in graph.parameters()) / 2**20
    layer_mib = calib.numel() * block_map.hidden_size * 4 / 2**20
    two = statistics.median(s.seconds for s in forward)
    comp = statistics.median(s.seconds for s in compressing)
    peak = max(s.peak_rss_mib for s in compressing)
    summary = {
        "windows": args.samples, "seq_len": args.seq_len, "ratio": args.ratio, "repeats": args.repeats,
        "two_forward_seconds_median": two, "compress_seconds_median": comp, "compress_over_two_forward": comp / two,
        "compress_peak_rss_mib": peak, "float32_weights_mib": weights_mib, "one_layer_activations_mib": layer_mib,
        "peak_over_two_weights_plus_layer": peak / (2 * weights_mib + layer_mib),
        "runtime_rss_mib": runtime_mib,
        "peak_above_runtime_over_two_weights_plus_layer": (peak - runtime_mib) / (2 * weights_mib + layer_mib),
        "code_rss_mib": code_mib,
        "peak_above_code_over_two_weights_plus_layer": (peak - code_mib) / (2 * weights_mib + layer_mib),
        "stages": profiler.as_dict(),
    }
    table = format_table(["measure", "value"], [
        ["two forward passes, s (median)", two],
        ["compress, s (median)", comp],
        ["compress / two forward passes", comp / two],
        ["compress peak RSS, MiB (whole process)", peak],
        ["float32 weights, MiB", weights_mib],
        ["one layer's calibration activations, MiB", layer_mib],
        ["peak / (2 x weights + one layer)", peak / (2 * weights_mib + layer_mib)],
        ["RSS before loading anything (interpreter, torch, transformers), MiB", runtime_mib],
        ["(peak - that) / (2 x weights + one layer)", (peak - runtime_mib) / (2 * weights_mib + layer_mib)],
        ["RSS once the code is loaded too (a toy Llama loaded, captured, freed), MiB", code_mib],
        ["(peak - that) / (2 x weights + one layer)", (peak - code_mib) / (2 * weights_mib + layer_mib)],
    ])
    write_results(
        "compress_cost",
        f"# Cost of compress on the default model\n\n{args.samples} windows x {args.seq_len} tokens, --ratio {args.ratio}, "
        f"{args.repeats} repeat(s), measured side by side in one process. Regenerate: python -m benchmarks.compress_cost\n\n```\n{table}\n```\n\n"
        f"By stage (peak RSS of the whole process while the stage ran):\n\n```\n{profiler.table()}\n```\n",
        summary,
    )
    print(table)
    print(profiler.table())


if __name__ == "__main__":
    main()
