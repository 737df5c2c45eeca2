"""Inference speed of the dense and the compressed default model, in PyTorch and ONNX Runtime (CPU).

The compressed model (``--ratio 0.2``, pruned back to width 1.0) is a standard checkpoint with
fewer layers. Both are exported in the decoding form (``--with-past``), which serves the prompt
(empty cache) and every later token. Measured side by side in one process, repeats interleaved
so that a noisy machine slows every variant alike:

- prefill: one prompt of ``--prefill`` tokens, batch 1, cache returned;
- decode: ``--new-tokens`` greedy steps from the KV cache after a ``--prompt`` token prompt,
  reported per token.

The ideal speedup is the ratio of multiply-accumulates (every matmul, attention scores included)
of the two models for the same work.

    python -m benchmarks.speed [--repeats 3] [--samples 16] [--seq-len 128]

Writes benchmarks/results/speed.{md,json}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_results
from fxflatten import capture, compress, discover_blocks, load_model
from fxflatten.export import ort, to_onnx
from fxflatten.export.hf import to_pretrained
from fxflatten.tables import format_table
from fxflatten.text import calibration_windows


def macs(config, tokens: int, past: int) -> int:
    """Multiply-accumulates of one forward over ``tokens`` new tokens after ``past`` cached ones."""
    hidden, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    attended = sum(past + i + 1 for i in range(tokens))  # causal: token i sees past + i + 1 keys
    scores = 2 * heads * head_dim * attended  # q.k and attention x v
    return layers * (tokens * (projections + mlp) + scores) + tokens * hidden * config.vocab_size


def decode_macs(config, prompt: int, new_tokens: int) -> int:
    return sum(macs(config, 1, prompt + i) for i in range(new_tokens))


@torch.no_grad()
def torch_prefill(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True)
    return time.perf_counter() - start


@torch.no_grad()
def torch_decode(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds per token of greedy decoding from the cache (the prompt's prefill not counted)."""
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / new_tokens


def ort_prefill(sess, ids: np.ndarray) -> float:
    start = time.perf_counter()
    ort.step(sess, ids, ort.empty_past(sess, 1), 0)
    return time.perf_counter() - start


def ort_decode(sess, ids: np.ndarray, new_tokens: int) -> float:
    logits, past = ort.step(sess, ids, ort.empty_past(sess, 1), 0)
    length = ids.shape[1]
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = logits[:, -1:].argmax(-1).astype(np.int64)
        logits, past = ort.step(sess, token, past, length)
        length += 1
    return (time.perf_counter() - start) / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=16, help="calibration windows for compress")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense, tokenizer = load_model("default")
    graph = capture(dense)
    result = compress(graph, args.ratio, calibration_windows(tokenizer, None, args.samples, args.seq_len))
    small = to_pretrained(result.graph, dense, discover_blocks(graph))
    models = {"dense": dense, "compressed": small}
    sessions, export_seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            export = to_onnx(model, Path(tmp) / f"{name}.onnx", with_past=True)
            export_seconds[name] = export.seconds
            sessions[name] = ort.session(export.path, [ort.CPU])
        generator = torch.Generator().manual_seed(0)
        prefill_ids = torch.randint(0, dense.config.vocab_size, (1, args.prefill), generator=generator)
        prompt_ids = torch.randint(0, dense.config.vocab_size, (1, args.prompt), generator=generator)
        times: dict[tuple[str, str, str], list[float]] = {}
        for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
            for name in models:
                runs = {
                    ("pytorch", "prefill"): lambda: torch_prefill(models[name], prefill_ids),
                    ("onnxruntime", "prefill"): lambda: ort_prefill(sessions[name], prefill_ids.numpy()),
                    ("pytorch", "decode"): lambda: torch_decode(models[name], prompt_ids, args.new_tokens),
                    ("onnxruntime", "decode"): lambda: ort_decode(sessions[name], prompt_ids.numpy(), args.new_tokens),
                }
                for (runtime, phase), run in runs.items():
                    seconds = run()
                    if repeat:
                        times.setdefault((runtime, phase, name), []).append(seconds)
    median = {key: statistics.median(values) for key, values in times.items()}
    ideal = {
        "prefill": macs(dense.config, args.prefill, 0) / macs(small.config, args.prefill, 0),
        "decode": decode_macs(dense.config, args.prompt, args.new_tokens) / decode_macs(small.config, args.prompt, args.new_tokens),
    }
    rows, records = [], []
    for runtime in ("pytorch", "onnxruntime"):
        for phase, unit in (("prefill", "ms"), ("decode", "ms/token")):
            d, c = median[(runtime, phase, "dense")], median[(runtime, phase, "compressed")]
            speedup = d / c
            rows.append([runtime, phase, unit, d * 1e3, c * 1e3, speedup, ideal[phase], speedup / ideal[phase]])
            records.append({"runtime": runtime, "phase": phase, "dense_s": d, "compressed_s": c, "speedup": speedup,
                            "ideal": ideal[phase], "of_ideal": speedup / ideal[phase],
                            "dense_runs_s": times[(runtime, phase, "dense")], "compressed_runs_s": times[(runtime, phase, "compressed")]})
    columns = ["runtime", "phase", "unit", "dense", "compressed", "speedup", "ideal (MACs)", "of ideal"]
    table = format_table(columns, rows)
    print(table)
    layers = f"{dense.config.num_hidden_layers} -> {small.config.num_hidden_layers} layers"
    summary = {
        "ratio": args.ratio, "groups": result.groups, "layers": layers, "repeats": args.repeats,
        "prefill_tokens": args.prefill, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
        "torch_threads": torch.get_num_threads(), "machine": platform.platform(), "processor": platform.processor(),
        "onnx_export_seconds": export_seconds, "results": records,
    }
    write_results(
        "speed",
        "# Inference speed, dense vs compressed default model (CPU)\n\n"
        f"SmolLM2-135M-Instruct, --ratio {args.ratio} ({layers}, groups {result.groups}), float32, batch 1. "
        f"Prefill: {args.prefill} tokens. Decode: {args.new_tokens} greedy tokens from the KV cache after a "
        f"{args.prompt}-token prompt. Medians of {args.repeats} interleaved repeats after one warm-up round, "
        f"measured side by side in one process ({torch.get_num_threads()} torch threads; ONNX Runtime CPU "
        "provider, its default threads, both models exported --with-past). Ideal speedup: ratio of "
        "multiply-accumulates, attention scores and the LM head included. "
        "Regenerate: python -m benchmarks.speed\n\n"
        "The machine is small (2 cores) and may be shared, so single timings are noisy; "
        "the dense and compressed runs alternate so that noise hits both alike.\n\n"
        f"```\n{table}\n```\n\n"
        "A speedup above the MAC ideal is expected here: the work MACs leave out (norms, rotary "
        "embeddings, softmax, KV-cache copies, per-operator overhead) grows with depth, while the "
        "LM head, a fixed share of the MACs, is one large, efficient matrix product. The ratio "
        f"of layers, {dense.config.num_hidden_layers / small.config.num_hidden_layers:.3f}, is the "
        "speedup if only the blocks cost time.\n",
        summary,
    )


if __name__ == "__main__":
    main()
