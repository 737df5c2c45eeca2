"""One deployment table: the dense and the compressed default model, each in float32, int8 through
ONNX Runtime's quantizer (``fxflatten export --int8``) and int8 through torchao's PT2E flow, with
file size, held-out perplexity and CPU prefill / decode speed, measured side by side in one run.

Every variant is an ONNX file in the decoding form (``--with-past``) run by ONNX Runtime on the
CPU, so the columns compare like with like:

- float32: ``fxflatten export --with-past``;
- int8 (ORT): that file through :func:`fxflatten.export.quantize.quantize_file`, as ``--int8``
  writes it (8-bit weight blocks of 32, int8 compute);
- int8 (PT2E): the decoding step exported with ``torch.export``, ``prepare_pt2e`` with torchao's
  stock X86 quantizer (static: int8 per-channel weights, uint8 per-tensor activations),
  calibrated on calibration windows, ``convert_pt2e``, then exported to ONNX, where the
  quantize / dequantize pairs become QDQ nodes that ONNX Runtime fuses into int8 kernels.

Perplexity is ONNX Runtime's own on held-out windows of every evaluation domain (geometric mean
over domains). Prefill: one prompt, batch 1. Decode: greedy steps from the KV cache, per token.
Each timing runs in a fresh process that loads one variant alone and warms it up first: thread
pools left spinning by other runtimes in one process (ONNX Runtime's, llama.cpp's, torch's)
slowed the shortest steps, int8 decoding most, by up to 1.4x. Repeats are interleaved across the
variants; medians.

    python -m benchmarks.deploy [--compressed DIR] [--repeats 3]

With llama-cpp-python installed (a source build: `pip install llama-cpp-python`, about 5 minutes here),
the q8_0 GGUF files `fxflatten export --gguf q8_0` writes are run by llama.cpp as well.

Writes benchmarks/results/deploy.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim
from tqdm import tqdm

from benchmarks.common import write_results
from benchmarks.speed import ort_decode, ort_prefill
from fxflatten import capture, compress, discover_blocks, load_model
from fxflatten.eval.perplexity import geometric_mean, perplexity_values
from fxflatten.export import ort, to_onnx
from fxflatten.export.gguf_file import write_gguf
from fxflatten.export.hf import to_pretrained
from fxflatten.export.onnx import DECODING_OPSET, check_model, dynamo_export, file_bytes, with_past_example
from fxflatten.export.past import WithPast, cache_shape
from fxflatten.export.quantize import quantize_file
from fxflatten.load import default_gguf
from fxflatten.tables import format_table
from fxflatten.text import calibration_windows, evaluation_sets

GGUF = "q8_0 (llama.cpp)"


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def pt2e_onnx(model, calib: torch.Tensor, path: Path) -> None:
    """The decoding step quantized with torchao's PT2E flow and exported to ONNX as QDQ."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    wrapper, shape = WithPast(model), cache_shape(model)
    args, _, inputs, outputs = with_past_example(wrapper, shape)
    # Let export find each axis's range (a fixed Dim's lower bound fails a guard on the mask);
    # the quantized graph takes its pasts flat.
    flat = ({0: Dim.AUTO, 1: Dim.AUTO},) * 3 + tuple({0: Dim.AUTO, 2: Dim.AUTO} for _ in shape.past_names())
    graph = torch.export.export(wrapper, args, dynamic_shapes=(*flat[:3], flat[3:])).module()
    prepared = prepare_pt2e(graph, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    with torch.no_grad():
        for window in calib:
            ids = window[None]
            prepared(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], *shape.empty(1, 0))
    dynamo_export(convert_pt2e(prepared), args, path, inputs, outputs, flat, DECODING_OPSET)
    check_model(path)


class LlamaCpp:
    """A GGUF file in llama.cpp (llama-cpp-python), called as a graph is for perplexity, and timed
    for prefill and decode the way the ONNX Runtime variants are."""

    def __init__(self, path: Path, context: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=context, n_batch=context, n_threads=torch.get_num_threads(),
                         logits_all=True, verbose=False)

    def __call__(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        rows = []
        for ids in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(ids)
            rows.append(torch.from_numpy(np.array(self.llm._scores[: len(ids)])))
        return torch.stack(rows)

    def prefill(self, ids: np.ndarray) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids[0].tolist())
        return time.perf_counter() - start

    def decode(self, ids: np.ndarray, new_tokens: int) -> float:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        start = time.perf_counter()
        for _ in range(new_tokens):
            self.llm.eval([int(np.argmax(self.llm._scores[self.llm.n_tokens - 1]))])
        return (time.perf_counter() - start) / new_tokens


def time_alone(weights: str, path: str, context: int, prefill_ids: np.ndarray, prompt_ids: np.ndarray,
               new_tokens: int) -> tuple[float, float]:
    """Prefill seconds and decode seconds per token of one file, after a warm-up run; called in a
    process of its own, so no other runtime's threads compete for the cores."""
    if weights == GGUF:
        llm = LlamaCpp(Path(path), context)
        prefill, decode = llm.prefill, llm.decode
    else:
        sess = ort.session(path, [ort.CPU])
        prefill, decode = partial(ort_prefill, sess), partial(ort_decode, sess)
    prefill(prefill_ids)
    decode(prompt_ids, new_tokens)
    return prefill(prefill_ids), decode(prompt_ids, new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--compressed", metavar="DIR", help="a checkpoint fxflatten compress wrote (default: compress here, "
                        "with compress's own defaults: 64 x 512 calibration tokens)")
    parser.add_argument("--pt2e-windows", type=int, default=16, help="calibration windows (of 256 tokens) for PT2E")
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out windows per domain")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per held-out window")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense, tokenizer = load_model("default")
    if args.compressed:
        small, _ = load_model(args.compressed)
        report = Path(args.compressed) / "report.json"
        groups = json.loads(report.read_text())["groups"] if report.is_file() else f"read from {args.compressed}"
    else:
        graph = capture(dense)
        result = compress(graph, args.ratio, calibration_windows(tokenizer, None, 64, 512), progress=True)
        small, groups = to_pretrained(result.graph, dense, discover_blocks(graph)), result.groups
    models = {"dense": dense, "compressed": small}
    sets = evaluation_sets(tokenizer, None, args.eval_windows, args.seq_len)
    pt2e_calib = calibration_windows(tokenizer, None, args.pt2e_windows, 256)
    tokenizer_agrees: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, model in models.items():
            files[name, "float32"] = to_onnx(model, Path(tmp) / f"{name}-float32.onnx", with_past=True).path
            files[name, "int8 (ORT)"] = Path(tmp) / f"{name}-int8-ort.onnx"
            quantize_file(files[name, "float32"], files[name, "int8 (ORT)"], external_data=False)
            files[name, "int8 (PT2E)"] = Path(tmp) / f"{name}-int8-pt2e.onnx"
            pt2e_onnx(model, pt2e_calib, files[name, "int8 (PT2E)"])
        scores = {key: perplexity_values(ort.SessionModel(ort.session(path, [ort.CPU])), sets, progress=True)
                  for key, path in files.items()}
        context = max(args.seq_len, args.prefill, args.prompt + args.new_tokens)
        if llama_cpp_available():
            for name, model in models.items():
                files[name, GGUF] = Path(tmp) / f"{name}-q8_0.gguf"
                write_gguf(model, tokenizer, files[name, GGUF], "q8_0", default_gguf())
                llm = LlamaCpp(files[name, GGUF], context)
                scores[name, GGUF] = perplexity_values(llm, sets, progress=True)
                sample = "The capital of France is Paris. 12345 def f(x): return x**2"
                tokenizer_agrees[name] = llm.llm.tokenize(sample.encode(), add_bos=False) == tokenizer(sample).input_ids
                del llm
        else:
            print("llama-cpp-python is not installed: no llama.cpp rows (pip install llama-cpp-python, a source build)")
        generator = torch.Generator().manual_seed(0)
        prefill_ids = torch.randint(0, dense.config.vocab_size, (1, args.prefill), generator=generator).numpy()
        prompt_ids = torch.randint(0, dense.config.vocab_size, (1, args.prompt), generator=generator).numpy()
        times: dict[tuple[str, str, str], list[float]] = {}
        # A new worker process for every timing (maxtasksperchild=1); the repeats go round the variants.
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            for _ in tqdm(range(args.repeats), desc="timing"):
                for (name, weights), path in files.items():
                    seconds = pool.apply(time_alone, (weights, str(path), context, prefill_ids, prompt_ids, args.new_tokens))
                    for phase, value in zip(("prefill", "decode"), seconds):
                        times.setdefault((name, weights, phase), []).append(value)
        sizes = {key: file_bytes(path) for key, path in files.items()}
    median = {key: statistics.median(values) for key, values in times.items()}
    base = ("dense", "float32")
    base_ppl = geometric_mean(list(scores[base].values()))
    rows, records = [], []
    for name, weights in files:
        key = (name, weights)
        ppl = geometric_mean(list(scores[key].values()))
        prefill, decode = median[(name, weights, "prefill")], median[(name, weights, "decode")]
        record = {
            "model": name, "weights": weights, "layers": models[name].config.num_hidden_layers,
            "file_mib": sizes[key] / 2**20, "size_x_dense": sizes[key] / sizes[base],
            "perplexity": ppl, "perplexity_by_domain": scores[key], "perplexity_x_dense": ppl / base_ppl,
            "prefill_ms": prefill * 1e3, "decode_ms_per_token": decode * 1e3,
            "prefill_speedup": median[(*base, "prefill")] / prefill, "decode_speedup": median[(*base, "decode")] / decode,
            "prefill_runs_s": times[(name, weights, "prefill")], "decode_runs_s": times[(name, weights, "decode")],
        }
        records.append(record)
        rows.append([name, weights, record["layers"], record["file_mib"], record["size_x_dense"], ppl,
                     record["perplexity_x_dense"], record["prefill_ms"], record["prefill_speedup"],
                     record["decode_ms_per_token"], record["decode_speedup"]])
    columns = ["model", "weights", "layers", "file MiB", "x dense size", "perplexity", "x dense ppl",
               "prefill ms", "prefill x", "decode ms/token", "decode x"]
    table = format_table(columns, rows)
    print(table)
    by = {(r["model"], r["weights"]): r for r in records}
    target = by["compressed", "int8 (ORT)"]
    goals = (
        f"- compressed + int8 (ORT): {target['decode_speedup']:.2f}x the dense float32 model's decode speed (goal: at least 2.5x), "
        f"{target['perplexity'] / by['compressed', 'float32']['perplexity']:.3f}x the compressed float32 model's perplexity "
        f"(goal: at most 1.1x), {target['size_x_dense']:.3f}x the dense file (goal: at most 0.3x).\n"
    )
    print(goals)
    gguf_line = (f"- {GGUF}: `fxflatten export --gguf q8_0` files run by llama.cpp (llama-cpp-python), fed the same token "
                 f"ids; its own tokenizer agrees with the model's on a sample: {tokenizer_agrees}.\n" if tokenizer_agrees
                 else "- llama.cpp rows: not run (llama-cpp-python not installed).\n")
    domains = ", ".join(f"{w.shape[0]} x {w.shape[1]} tokens of {d}" for d, w in sets.items())
    write_results(
        "deploy",
        "# Deployment: dense and compressed, float32 and int8, in ONNX Runtime (CPU)\n\n"
        f"`python -m benchmarks.deploy`: SmolLM2-135M-Instruct dense and compressed with `--ratio {args.ratio}` "
        f"(groups {groups}), each exported `--with-past` and run by ONNX Runtime's CPU provider: float32; int8 "
        "(ORT): `fxflatten export --int8` (8-bit weight blocks of 32, ORT MatMulNBits / GatherBlockQuantized); "
        "int8 (PT2E): torchao `prepare_pt2e` / `convert_pt2e` with the stock X86 quantizer (static, "
        f"calibrated on {args.pt2e_windows} x 256 tokens), exported to ONNX as QDQ. Held-out perplexity from "
        f"ONNX Runtime's logits on {domains}, geometric mean over the domains. Prefill: {args.prefill} tokens; "
        f"decode: {args.new_tokens} greedy tokens from the KV cache after a {args.prompt}-token prompt; batch 1. "
        f"Medians of {args.repeats} repeats interleaved across the variants, each timed in a fresh process that "
        f"loads that variant alone and warms it up. {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} cores.\n\n"
        f"```\n{table}\n```\n\n{goals}{gguf_line}",
        {"ratio": args.ratio, "llama_cpp_tokenizer_agrees": tokenizer_agrees, "groups": groups, "repeats": args.repeats, "prefill_tokens": args.prefill,
         "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "evaluation": domains,
         "machine": platform.platform(), "results": records},
    )


if __name__ == "__main__":
    main()
