"""The ``fxflatten`` command line: subcommands, their options and help.

Each subcommand names the function of :mod:`fxflatten.cli.commands` that runs it; that module
(and torch with it) is imported only after the arguments parse, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calib", metavar="FILE",
        help="calibration text (default: the embedded mix of encyclopedia prose, plays and Python source)",
    )
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--eval-text", metavar="FILE", help="held-out text for perplexity (default: the embedded evaluation text)")
    parser.add_argument("--eval-windows", type=int, default=None, help="evaluation windows (default: all the text holds)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                        help="where the model runs and its statistics are computed (default auto: CUDA when a GPU is visible)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="precision the model runs in (default auto: the checkpoint's own on a GPU, float32 on a CPU); "
                             "statistics accumulate in float32 or float64 either way, and the checkpoint written keeps the source's dtype"),


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxflatten", description="Depth compression of pre-norm transformers (FlattenGPT) as torch.fx graph passes.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="capture a model and show the blocks found in its graph")
    inspect.add_argument("model", nargs="?", default="default", help="HF model directory, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    inspect.add_argument("--json", action="store_true", help="print the block table as JSON")
    inspect.set_defaults(run="run_inspect")

    flatten = commands.add_parser("flatten", help="flatten and widen the most similar adjacent blocks (no pruning)")
    flatten.add_argument("model", nargs="?", default="default", help="HF model directory, .gguf file, or 'default'")
    flatten.add_argument("--ratio", type=float, required=True, help="share of all parameters the groups would remove once pruned back, in (0, 0.9]")
    flatten.add_argument("--max-group", type=int, default=None, help="most blocks in one group (default: no limit)")
    flatten.add_argument("--out", help="output directory for the widened model (required unless --dry-run)")
    flatten.add_argument("--force", action="store_true", help="replace --out if it exists")
    flatten.add_argument("--dry-run", action="store_true", help="print the similarity table and the chosen groups only")
    add_data_arguments(flatten)
    flatten.set_defaults(run="run_flatten")

    compress = commands.add_parser("compress", help="flatten the most similar blocks and prune them back: a shallower model")
    compress.add_argument("model", nargs="?", default="default", help="HF model directory, .gguf file, or 'default'")
    compress.add_argument("--ratio", type=float, required=True, help="share of all parameters to remove, in (0, 0.9]; the achieved share is quantised by block size")
    compress.add_argument("--out", required=True, help="output directory")
    compress.add_argument("--force", action="store_true", help="replace --out if it exists")
    compress.add_argument("--max-group", type=int, default=None, help="most blocks in one group (default: no limit)")
    compress.add_argument("--select", choices=["cosine", "error"], default="cosine", help="choose groups by hidden-state similarity (the paper) or by the measured error of each pair's parallel form")
    compress.add_argument("--width", type=float, default=1.0, help="width each group is pruned back to, in original blocks, in (0, 2) (default 1.0: a standard model); wider groups keep more, and more groups are merged for the same --ratio")
    compress.add_argument("--flatten-share", type=float, default=None, metavar="S", help="share of all parameters to remove by flattening, in [0, --ratio]; the rest of --ratio is width-pruned evenly from the other blocks (default: all of it, the paper). Blocks then differ in width, so the output is a torch.export program, not a checkpoint")
    compress.add_argument("--target", choices=["trajectory", "serial", "widened"], default="trajectory", help="refit target: the original model's own stream at that depth (default), the original blocks' serial output on the same input, or the widened block's output (the paper)")
    compress.add_argument("--no-input-refit", dest="input_refit", action="store_false", help="do not refit a merged block's q/k/v and gate/up toward the inputs the original blocks see (faster, worse: the default refits them with a serial or trajectory target)")
    compress.add_argument("--head-score", choices=["error", "energy"], default="error", help="choose KV groups by refit error (default) or output energy (the paper)")
    compress.add_argument("--stream", action="store_true", help="keep the weights in the checkpoint's safetensors files and read each block's when it is used, for models larger than memory; writes the checkpoint tensor by tensor, in shards")
    compress.add_argument("--onnx", action="store_true", help="also write model.onnx (logits form, checked in ONNX Runtime) into --out")
    compress.add_argument("--gguf", choices=["f16", "bf16", "q8_0"], help="also write model.gguf (for llama.cpp) with matrices in this type, checked by reading it back with transformers (not with --stream); Llama-family and Qwen2 models")
    add_data_arguments(compress)
    compress.set_defaults(run="run_compress")

    evaluate = commands.add_parser("eval", help="held-out perplexity and zero-shot accuracy (lm-evaluation-harness) of a model or an fxflatten output")
    evaluate.add_argument("model", nargs="?", default="default", help="HF model directory, .gguf file, 'default', or a directory fxflatten wrote (model.pt2 or a checkpoint)")
    evaluate.add_argument("--text", metavar="FILE", help="held-out text for perplexity (default: the embedded evaluation text)")
    evaluate.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window (default 512)")
    evaluate.add_argument("--windows", type=int, default=None, help="perplexity windows (default: all the text holds)")
    evaluate.add_argument("--tasks", nargs="*", metavar="TASK", help="lm-eval tasks for zero-shot accuracy; given alone, the shipped offline task fxflatten_next_sentence (needs pip install 'fxflatten[eval]')")
    evaluate.add_argument("--limit", type=int, default=None, help="at most N examples per task (default: all)")
    evaluate.set_defaults(run="run_eval")

    export = commands.add_parser("export", help="export a model or an fxflatten output to ONNX, checked in ONNX Runtime")
    export.add_argument("model", nargs="?", default="default", help="HF model directory, .gguf file, 'default', or a directory fxflatten wrote (model.pt2 or a checkpoint)")
    export.add_argument("--out", required=True, help="output directory: model.onnx (+ model.onnx.data when large), the tokenizer, report.json")
    export.add_argument("--with-past", action="store_true", help="export the decoding step with KV-cache inputs and outputs (past_key_values.N.key/value, present.N.key/value); needs a Hugging Face model")
    export.add_argument("--atol", type=float, default=1e-4, help="absolute logit tolerance of the ONNX Runtime check, plus 1e-4 x the largest logit (default 1e-4)")
    export.add_argument("--int8", action="store_true", help="write int8 weights (8-bit blocks of 32, ONNX Runtime's MatMulNBits and GatherBlockQuantized), checked by held-out perplexity against the float export")
    export.add_argument("--gguf", choices=["f16", "bf16", "q8_0"], help="write model.gguf (for llama.cpp) with matrices in this type instead of ONNX, checked by reading it back with transformers; Llama-family and Qwen2 models")
    export.add_argument("--max-ppl-ratio", type=float, default=None, metavar="R", help="with --int8 or --gguf: refuse the result when its held-out perplexity exceeds R x the model's (default 1.02)")
    export.add_argument("--eval-text", metavar="FILE", help="held-out text for the --int8 / --gguf check (default: the embedded evaluation domains)")
    export.add_argument("--eval-windows", type=int, default=8, help="windows per domain for the --int8 / --gguf check (default 8)")
    export.add_argument("--seq-len", type=int, default=512, help="tokens per window of the --int8 / --gguf check (default 512)")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    export.set_defaults(run="run_export")

    run_onnx = commands.add_parser("run-onnx", help="greedy generation in ONNX Runtime from a directory fxflatten exported")
    run_onnx.add_argument("dir", help="directory holding model.onnx and its tokenizer (or the .onnx file itself)")
    run_onnx.add_argument("--prompt", required=True, help="text to continue")
    run_onnx.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate (default 32)")
    run_onnx.set_defaults(run="run_onnx")
    return parser
