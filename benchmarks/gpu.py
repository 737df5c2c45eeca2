"""Compression on a GPU: the same answer as on the CPU, and a Llama-2-7B-shaped model in bf16.

Run ``python -m benchmarks.gpu --cpu-reference`` anywhere (it writes the CPU side of the
agreement check), then ``python -m benchmarks.gpu`` where a CUDA GPU is visible (never in CI).

1. Agreement: a small random Llama-shaped model (weights from numpy's generator, so every
   machine builds the same one) compressed at ``--ratio`` on CUDA, against the same
   compression on a CPU: the groups chosen, held-out perplexity on random tokens, and the
   relative difference of the compressed logits. The CPU side is a file, not a run beside the
   CUDA one, because torch 2.11 (on the GPU machine this ran on) cannot export a Llama on its
   CPU with a dynamic sequence length; so this part gives no CPU/GPU speed-up. For the same reason
   (float32 SDPA attention on CUDA) both sides run in bf16, so they differ by bf16 rounding in
   different kernels, not by float32 rounding.
2. A randomly initialised Llama-2-7B-shaped model in bf16, compressed on CUDA in bf16 (the
   checkpoint's own dtype, what ``--dtype auto`` picks on a GPU): time of each step and the
   most GPU memory allocated.
3. The same shape written to disk as a bf16 checkpoint (13 GB) and compressed on CUDA with its
   weights streamed from the files (``--stream``): time, GPU memory and host RSS at the most.

Each part writes ``results/gpu.{md,json}`` as it finishes (parts not rerun keep their earlier
results), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from benchmarks.common import RESULTS, write_results
from benchmarks.scale import write_checkpoint
from fxflatten import capture
from fxflatten.eval.perplexity import perplexity
from fxflatten.graph.capture import graph_example_inputs
from fxflatten.graph.discovery import discover_blocks
from fxflatten.pipeline import compress
from fxflatten.run.profiler import Profiler
from fxflatten.shards import stored_tensors
from fxflatten.stream import skeleton
from fxflatten.tables import format_table

log = logging.getLogger(__name__)

#: The model of the agreement check: Llama-shaped, small, its weights drawn with numpy's generator so
#: that every machine and torch version builds the same one. (The default model's GGUF file is
#: larger than what reaches a GPU machine here.)
#: In bf16 and without grouped KV heads: torch 2.11 (on the GPU machine this ran on) cannot export
#: SDPA attention in float32 with a dynamic sequence length (it pads the mask to a multiple of 8 and
#: cannot prove a guard on that), nor SDPA's grouped-query path; torch 2.13 can.
AGREEMENT = dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=12,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
AGREEMENT_DTYPE = torch.bfloat16

#: Llama-2-7B's shape.
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def random_llama(shape: dict, dtype: torch.dtype, device: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**shape)
    with torch.device(device):
        return transformers.LlamaForCausalLM(config).to(dtype).eval()


def random_windows(vocab: int, count: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (count, seq_len), generator=torch.Generator().manual_seed(seed))


def agreement_model() -> transformers.PreTrainedModel:
    """:data:`AGREEMENT`'s model, float32 on the CPU, the same wherever it is built: norms 1, every
    other weight N(0, 0.02^2) from numpy's PCG64 seeded 0, drawn in the order of the state dict."""
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**AGREEMENT))
    rng = np.random.default_rng(0)
    state = {name: torch.ones(tensor.shape) if "norm" in name else
             torch.from_numpy(rng.standard_normal(tensor.shape, dtype=np.float32) * np.float32(0.02))
             for name, tensor in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # its buffers were built on meta
    return model.eval()


def agreement_windows(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    return (random_windows(AGREEMENT["vocab_size"], args.samples, args.seq_len, 0),
            random_windows(AGREEMENT["vocab_size"], args.eval_windows, args.seq_len, 1))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compress_on(device: str, args: argparse.Namespace) -> dict:
    """Compress :func:`agreement_model` on ``device`` in bf16: time, groups, held-out perplexity,
    and the first 64 logits of each position on fixed tokens (enough to compare, small to store)."""
    calib, evaluation = agreement_windows(args)
    model = agreement_model().to(device, AGREEMENT_DTYPE)
    synchronize(device)
    start = time.perf_counter()
    profiler = Profiler()
    with profiler("capture"):
        dense = capture(model)
    result = compress(dense, args.ratio, calib.to(device), profiler=profiler)
    synchronize(device)
    seconds = time.perf_counter() - start
    input_ids, mask = graph_example_inputs(result.graph, batch=2, seq_len=64)
    with torch.no_grad():
        logits = result.graph(input_ids, mask)[..., :64].float().cpu()
    return {"seconds": seconds, "steps": profiler.as_dict(), "groups": result.groups, "torch": torch.__version__,
            "perplexity": perplexity(result.graph, evaluation).value, "logits": logits.tolist(),
            "layers": len(discover_blocks(result.graph).blocks)}


def agreement(args: argparse.Namespace) -> dict:
    """The CUDA run against the CPU reference (``--cpu-reference``, run on any machine beforehand)."""
    if not REFERENCE.is_file():
        raise FileNotFoundError(f"{REFERENCE} is missing: run `python -m benchmarks.gpu --cpu-reference` first")
    cpu = json.loads(REFERENCE.read_text())
    cuda = compress_on("cuda", args)
    expected, got = torch.tensor(cpu.pop("logits")), torch.tensor(cuda.pop("logits"))
    return {"model": f"random Llama-shaped model {AGREEMENT}", "ratio": args.ratio,
            "calibration": [args.samples, args.seq_len], "evaluation": [args.eval_windows, args.seq_len],
            "runs": {"cpu (reference)": cpu, "cuda": cuda}, "same_groups": cpu["groups"] == cuda["groups"],
            "perplexity_cuda_over_cpu": cuda["perplexity"] / cpu["perplexity"],
            "logits_relative_difference": float((got - expected).norm() / expected.norm())}


def timed_compress(model: torch.nn.Module, calib: torch.Tensor, args: argparse.Namespace, device: str) -> dict:
    """Capture and compress ``model`` timing each step: what the large-model parts report."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    profiler = Profiler()
    start = time.perf_counter()
    with profiler("capture"):
        dense = capture(model)
    result = compress(dense, args.ratio, calib, profiler=profiler)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"dtype": "bfloat16", "calibration": list(calib.shape), "ratio": args.ratio, "groups": result.groups,
            "layers_after": len(discover_blocks(result.graph).blocks), "seconds": seconds, "steps": profiler.as_dict(),
            "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def large(args: argparse.Namespace) -> dict:
    """A random Llama-2-7B-shaped model, bf16 on CUDA: time per step and the GPU memory peak."""
    shape = dict(LLAMA2_7B, num_hidden_layers=args.layers)
    model = random_llama(shape, torch.bfloat16, "cuda")
    parameters = sum(p.numel() for p in model.parameters())
    calib = random_windows(shape["vocab_size"], args.large_samples, args.large_seq_len, 0).cuda()
    return {"shape": shape, "parameters": parameters, **timed_compress(model, calib, args, "cuda"),
            "weights_gib": parameters * 2 / 2**30}


def streamed(args: argparse.Namespace) -> dict:
    """The 7B-shaped model written to disk as bf16 safetensors and compressed on CUDA with its
    weights streamed from there (``--stream``): time per step, GPU memory and host RSS at the most."""
    shape = dict(LLAMA2_7B, num_hidden_layers=args.layers)
    with tempfile.TemporaryDirectory(prefix="fxflatten-gpu-") as work:
        path = Path(work) / "llama"
        written = write_checkpoint(path, args.layers, None, shape)
        model = skeleton(path, stored_tensors(path), transformers.AutoConfig.from_pretrained(path), torch.bfloat16,
                         torch.device(args.device))
        calib = random_windows(shape["vocab_size"], args.large_samples, args.large_seq_len, 0).to(args.device)
        run = timed_compress(model, calib, args, args.device)
    return {"shape": shape, "parameters": written["parameters"], "checkpoint_gib": written["checkpoint_bytes"] / 2**30,
            **run, "peak_rss_gib": max(step["peak_rss_mib"] for step in run["steps"].values()) / 1024}


def steps_section(title: str, run: dict, memory_note: str) -> list[str]:
    """A large-model part: its setting, the time and RSS of each step, total time and GPU memory."""
    return [f"## {title}", "",
            f"ratio {run['ratio']}, calibration {run['calibration'][0]} x {run['calibration'][1]} tokens; "
            f"{run['shape']['num_hidden_layers']} -> {run['layers_after']} layers, groups {run['groups']}.", "",
            "```", format_table(["step", "seconds", "peak RSS MiB"], [[k, v["seconds"], v["peak_rss_mib"]] for k, v in run["steps"].items()]),
            "```", "", f"Total {run['seconds']:.1f} s; most GPU memory allocated {run['max_memory_allocated_gib']:.1f} GiB "
            f"{memory_note}", ""]


def render(data: dict) -> str:
    lines = ["# Compression on a GPU", "", f"`python -m benchmarks.gpu` on {data['device']} (torch {data['torch']}); "
             "one run of each.", ""]
    if "agreement" in data:
        a = data["agreement"]
        lines += [f"## CPU against CUDA, bf16: {a['model']}", "",
                  f"ratio {a['ratio']}, calibration {a['calibration'][0]} x {a['calibration'][1]} tokens, "
                  f"evaluation {a['evaluation'][0]} x {a['evaluation'][1]}.", ""]
        rows = [[device, run["torch"], run["seconds"], run["layers"], run["perplexity"], str(run["groups"])]
                for device, run in a["runs"].items()]
        lines += ["```", format_table(["device", "torch", "seconds", "layers", "held-out perplexity", "groups"], rows), "```", "",
                  "The two ran on different machines (the CPU one where `--cpu-reference` ran), so their times "
                  f"are not a speed-up. Same groups: {a['same_groups']}; "
                  f"perplexity CUDA / CPU: {a['perplexity_cuda_over_cpu']:.5f}; relative difference of the "
                  f"compressed logits: {a['logits_relative_difference']:.2e}.", ""]
    if "large" in data:
        b = data["large"]
        lines += steps_section(f"A random Llama-2-7B-shaped model ({b['parameters'] / 1e9:.2f} B parameters), bf16 on CUDA", b,
                               f"(the weights alone: {b['weights_gib']:.1f} GiB).")
    if "streamed" in data:
        c = data["streamed"]
        lines += steps_section(f"The same shape streamed from a bf16 checkpoint ({c['checkpoint_gib']:.1f} GiB), on CUDA", c,
                               f"(host RSS at most {c['peak_rss_gib']:.1f} GiB).")
    if "errors" in data:
        lines += ["## Parts that failed", ""] + [f"- {part}: {error}" for part, error in data["errors"].items()] + [""]
    return "\n".join(lines)


REFERENCE = RESULTS / "gpu_cpu_reference.json"
PARTS = {"agreement": agreement, "large": large, "streamed": streamed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of the default-model part")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32, help="layers of the 7B-shaped model")
    parser.add_argument("--large-samples", type=int, default=4)
    parser.add_argument("--large-seq-len", type=int, default=128)
    parser.add_argument("--cpu-reference", action="store_true", help=f"write the CPU side of the agreement check to {REFERENCE.name} (no GPU needed)")
    parser.add_argument("--parts", nargs="*", default=["large", "streamed", "agreement"], choices=PARTS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # the streamed part's, for a CPU trial
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.cpu_reference:
        REFERENCE.write_text(json.dumps(compress_on("cpu", args)) + "\n")
        print(f"wrote {REFERENCE}")
        return
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible: run this where one is")
    data = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(), "args": vars(args)}
    earlier = RESULTS / "gpu.json"
    if earlier.is_file():  # parts not rerun keep what an earlier run measured
        data |= {part: value for part, value in json.loads(earlier.read_text()).items() if part in PARTS and part not in args.parts}
    for part in args.parts:
        log.info("part %s", part)
        data.get("errors", {}).pop(part, None)
        try:
            data[part] = PARTS[part](args)
        except Exception as error:  # a part that fails is reported, the others still run
            log.exception("part %s failed", part)
            data.setdefault("errors", {})[part] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        write_results("gpu", render(data), data)
        print(render(data), flush=True)


if __name__ == "__main__":
    main()
