"""How the cost of compress grows: time and peak memory by stage, against calibration size and depth.

Each configuration runs in a fresh process (peak RSS is a per-process high-water mark, so
sharing one would hide later, smaller peaks) and runs ``compress``, which times its own steps:
select (hidden-state similarity and the greedy groups), flatten (flatten, fold norms, fuse:
graph rewrites), prune (calibration statistics block by block, and the refits).

- calibration: the default model at ``--samples`` windows of ``--seq-len`` tokens;
- depth: tiny random Llamas (tests/models.py) of ``--layers`` blocks on the same windows.

The growth of each stage is the least-squares slope of log time against log N (or log depth):
1 means linear. Writes benchmarks/results/cost.{md,json}.

    python -m benchmarks.cost [--samples 32 64 128] [--layers 8 16 32] [--ratio 0.2]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import torch

from benchmarks.common import write_results
from fxflatten import capture, compress, load_model
from fxflatten.run.profiler import Profiler
from fxflatten.tables import format_table
from fxflatten.text import calibration_windows

STAGES = ("select", "flatten", "prune")
#: The depth sweep's model: small enough that 32 layers compress in seconds, wide enough that
#: the work is arithmetic rather than Python overhead.
TINY = dict(heads=4, kv_heads=2, head_dim=16, hidden=64, width=192)
TINY_WINDOWS, TINY_SEQ_LEN = 16, 128


def measure(graph, calib: torch.Tensor, ratio: float) -> dict[str, dict[str, float]]:
    """compress with its defaults, each step timed by compress itself: select, flatten, prune."""
    profiler = Profiler()
    compress(graph, ratio, calib, profiler=profiler)
    return profiler.as_dict()


def one(kind: str, size: int, ratio: float, seq_len: int) -> dict:
    """One configuration, in this process: the default model at ``size`` windows, or a tiny one of ``size`` layers."""
    torch.manual_seed(0)
    if kind == "windows":
        model, tokenizer = load_model("default")
        calib = calibration_windows(tokenizer, None, size, seq_len)
    else:
        from tests.models import VOCAB, Shape, build

        model = build("llama", Shape(layers=size, **TINY))
        calib = torch.randint(0, VOCAB, (TINY_WINDOWS, TINY_SEQ_LEN), generator=torch.Generator().manual_seed(0))
    graph = capture(model)
    return {"kind": kind, "size": size, "tokens": calib.numel(), "stages": measure(graph, calib, ratio)}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def sweep(kind: str, sizes: list[int], args: argparse.Namespace) -> list[dict]:
    runs = []
    for size in sizes:
        command = [sys.executable, "-m", "benchmarks.cost", "--one", kind, str(size), "--ratio", str(args.ratio), "--seq-len", str(args.seq_len)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    return runs


def table(runs: list[dict], label: str) -> str:
    rows = [[run["size"], run["tokens"]] + [run["stages"][s]["seconds"] for s in STAGES]
            + [sum(run["stages"][s]["seconds"] for s in STAGES), max(run["stages"][s]["peak_rss_mib"] for s in STAGES)]
            for run in runs]
    if len(runs) > 1:
        sizes = [run["size"] for run in runs]
        rows.append([f"growth (slope of log time vs log {label})", None]
                    + [slope(sizes, [run["stages"][s]["seconds"] for run in runs]) for s in STAGES]
                    + [slope(sizes, [row[-2] for row in rows]), slope(sizes, [row[-1] for row in rows])])
    return format_table([label, "tokens", *(f"{s} s" for s in STAGES), "total s", "peak RSS MiB"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="*", default=[32, 64, 128], help="calibration windows of the default model")
    parser.add_argument("--layers", type=int, nargs="*", default=[8, 16, 32], help="depths of the tiny model")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--one", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.ratio, args.seq_len)))
        return
    windows, depth = sweep("windows", args.samples, args), sweep("layers", args.layers, args)
    text = (
        f"# How the cost of compress grows\n\n--ratio {args.ratio}; each row a fresh process; peak RSS is the "
        f"whole process's. Regenerate: `python -m benchmarks.cost --samples {' '.join(map(str, args.samples))}`\n\n"
        f"## Default model (SmolLM2-135M-Instruct), calibration windows of {args.seq_len} tokens\n\n"
        f"```\n{table(windows, 'windows')}\n```\n\n"
        f"## Tiny random Llama ({TINY}), {TINY_WINDOWS} random windows of {TINY_SEQ_LEN} tokens\n\n"
        f"```\n{table(depth, 'layers')}\n```\n"
    )
    write_results("cost", text, {"args": vars(args), "windows": windows, "layers": depth})
    print(text)


if __name__ == "__main__":
    main()
