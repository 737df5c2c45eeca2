"""Ablation of the prune-back step on the default model, against block removal (ShortGPT).

One run: the groups are chosen once (cosine greedy, as the paper), flattened and widened once,
then pruned back to one block's width under each configuration; ShortGPT removes the same
number of blocks, chosen by Block Influence (1 - cos of a block's input and output) on the
same calibration windows. Held-out perplexity on the default evaluation text.

    python -m benchmarks.prune_ablation [--samples 64] [--ratio 0.2] [--configs NAME ...]

Wider groups at the same ratio (an equal-budget curve) are ``benchmarks.width_curve``.

Writes benchmarks/results/prune_ablation.{md,json}.
"""

from __future__ import annotations

import argparse
import shlex
import time

import torch

from benchmarks.common import default_setup, write_results
from fxflatten import PruneConfig, discover_blocks
from fxflatten.eval.perplexity import perplexity
from fxflatten.passes.prune import PrunePass
from fxflatten.passes.remove import RemoveBlocksPass
from fxflatten.pipeline import flatten
from fxflatten.plans import plan_blocks
from fxflatten.selection import select_groups
from fxflatten.tables import format_table

CONFIGS = {
    "trajectory target, input refits, error-greedy heads, refit o_proj + down (default)": PruneConfig(),
    "trajectory target, input refits, error-greedy heads, error-pruned channels": PruneConfig(channel_score="error"),
    "trajectory target, error-greedy heads, refit o_proj + down (no input refits)": PruneConfig(refit_inputs=False),
    "trajectory target, error-greedy heads, error-pruned channels (no input refits)": PruneConfig(refit_inputs=False, channel_score="error"),
    "paper: widened target, energy heads, refit down only": PruneConfig(target="widened", head_score="energy", refit_attention=False),
    "widened target, energy heads, refit o_proj + down": PruneConfig(target="widened", head_score="energy"),
    "serial target, energy heads, refit down only": PruneConfig(target="serial", head_score="energy", refit_attention=False, refit_inputs=False),
    "serial target, energy heads, refit o_proj + down": PruneConfig(target="serial", head_score="energy", refit_inputs=False),
    "serial target, error-greedy heads, refit down only": PruneConfig(target="serial", head_score="error", refit_attention=False, refit_inputs=False),
    "serial target, error-greedy heads, refit o_proj + down": PruneConfig(target="serial", head_score="error", refit_inputs=False),
    # The default with one knob moved (python -m benchmarks.prune_ablation --configs ridge).
    "default, refit ridge 1e-2 x mean diagonal (default 1e-3)": PruneConfig(fit_ridge=1e-2),
    "default, refit ridge 1e-4 x mean diagonal": PruneConfig(fit_ridge=1e-4),
    "default, leverage ridge 1 x mean eigenvalue (default 10)": PruneConfig(leverage_ridge=1.0),
}


def shortgpt_blocks(similarity: torch.Tensor, count: int) -> list[int]:
    """The ``count`` blocks with the lowest Block Influence, 1 - cos(input, output)."""
    influence = [1 - float(similarity[i, i + 1]) for i in range(similarity.shape[0] - 1)]
    return sorted(sorted(range(len(influence)), key=influence.__getitem__)[:count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--select", choices=["cosine", "error"], default="cosine", help="how the groups are chosen")
    parser.add_argument("--configs", nargs="*", help="run only the prune configurations whose names contain one of these")
    args = parser.parse_args()
    setup = default_setup(args.samples, args.seq_len)
    dense, calib, evaluation = setup.dense, setup.calib, setup.evaluation
    dense_map = discover_blocks(dense)
    total = dense_map.total_parameters
    rows = []

    def record(method: str, graph, seconds: float | None = None) -> None:
        params = discover_blocks(graph).total_parameters
        value = perplexity(graph, evaluation).value
        rows.append({"method": method, "layers": len(discover_blocks(graph).blocks), "parameters": params,
                     "ratio": 1 - params / total, "perplexity": value, "seconds": seconds})
        print(rows[-1], flush=True)

    record("dense", dense)
    selection = select_groups(dense, calib, args.ratio, dense_map, by=args.select)
    removed = sum(len(group) - 1 for group in selection.groups)
    record(f"ShortGPT: remove {removed} blocks by Block Influence", RemoveBlocksPass(shortgpt_blocks(selection.similarity, removed))(dense).graph_module)
    flat = flatten(dense, groups=selection.groups)
    record("flatten + widen only (no pruning)", flat.graph)
    plans = plan_blocks(dense_map, selection.groups)
    configs = {name: c for name, c in CONFIGS.items() if not args.configs or any(part in name for part in args.configs)}
    for name, config in configs.items():
        # Written after every configuration, so that a long run leaves what it measured.
        write_ablation(args, selection.groups, evaluation.shape[0], rows)
        start = time.perf_counter()
        pruned = PrunePass(calib, plans, config, reference=dense)(flat.graph).graph_module
        record(name, pruned, time.perf_counter() - start)
    print(write_ablation(args, selection.groups, evaluation.shape[0], rows))


def write_ablation(args: argparse.Namespace, groups: list[list[int]], eval_windows: int, rows: list[dict]) -> str:
    """Write the table of ``rows`` (the measurements so far) and its JSON."""
    base = rows[0]["perplexity"]
    table = format_table(
        ["method", "layers", "parameters", "removed", "perplexity", "x dense"],
        [[r["method"], r["layers"], r["parameters"], f"{r['ratio']:.3f}", r["perplexity"], f"{r['perplexity'] / base:.3f}"] for r in rows],
    )
    command = f"python -m benchmarks.prune_ablation --select {args.select}"
    if args.configs:
        command += " --configs " + shlex.join(args.configs)
    header = (f"Default model (SmolLM2-135M-Instruct), --ratio {args.ratio}, groups chosen by {args.select}: {groups}. "
              f"Calibration {args.samples} x {args.seq_len} tokens; held-out perplexity on {eval_windows} x {args.seq_len} "
              f"tokens of the default evaluation text. Regenerate: {command}\n")
    # A run of some configurations keeps its own file, so that it never replaces the full table.
    stem = "prune_ablation" + ("" if args.select == "cosine" else f"_select_{args.select}") + ("_subset" if args.configs else "")
    write_results(stem, f"# Prune-back ablation\n\n{header}\n```\n{table}\n```\n",
                  {"args": vars(args), "groups": groups, "rows": rows})
    return table


if __name__ == "__main__":
    main()
