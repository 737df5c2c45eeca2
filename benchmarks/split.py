"""Splitting one parameter budget between flattening and width pruning, on the default model.

At ``--ratio`` 0.3 flattening alone merges 21 of 30 blocks and loses to width-only pruning
(benchmarks/results/quality.md). Here flattening takes only ``--flatten`` of all parameters
(groups chosen as compress chooses them), and the rest of the budget is taken by width-pruning
every block outside the groups evenly, in the same prune pass (same refit, same targets):
``compress(..., flatten_share=split)``, one compressed graph per split, each with the same
parameters removed (the ratio). A split of 0 is width-only; a split equal to the ratio is
FlattenGPT, with the few parameters that block quantisation leaves width-pruned too. Same
calibration and evaluation windows as the quality table.

    python -m benchmarks.split [--ratios 0.2 0.3] [--splits 0 0.05 0.1 0.2] [--samples 16]

Writes benchmarks/results/split.{md,json}.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import default_setup, write_results
from fxflatten import discover_blocks
from fxflatten.eval.perplexity import perplexity
from fxflatten.pipeline import compress
from fxflatten.selection import greedy_groups, hidden_similarity
from fxflatten.tables import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.3])
    parser.add_argument("--splits", type=float, nargs="*", default=[0.0, 0.05, 0.1, 0.2])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    args = parser.parse_args()
    start = time.perf_counter()
    setup = default_setup(args.samples, args.seq_len, args.eval_windows)
    dense_map = discover_blocks(setup.dense)
    dense_ppl = perplexity(setup.dense, setup.evaluation).value
    similarity = hidden_similarity(setup.dense, setup.calib)
    block_parameters = [block.parameters for block in dense_map.blocks]
    rows = []
    for ratio in args.ratios:
        for split in sorted({s for s in args.splits if s < ratio} | {ratio}):
            groups = greedy_groups(similarity, block_parameters, dense_map.total_parameters, split)[0] if split > 0 else []
            graph = compress(setup.dense, ratio, setup.calib, groups=groups, flatten_share=split).graph
            parameters = sum(p.numel() for p in graph.parameters())
            value = perplexity(graph, setup.evaluation).value
            rows.append({"ratio": ratio, "flatten": split, "layers": len(discover_blocks(graph).blocks), "groups": groups,
                         "removed": 1 - parameters / dense_map.total_parameters, "perplexity": value, "x_dense": value / dense_ppl})
            print(rows[-1], flush=True)
    table = format_table(["ratio", "flattened share", "layers", "removed", "perplexity", "x dense"],
                         [[r["ratio"], r["flatten"], r["layers"], r["removed"], r["perplexity"], r["x_dense"]] for r in rows])
    minutes = (time.perf_counter() - start) / 60
    write_results(
        "split",
        f"# Splitting the budget between flattening and width pruning\n\n"
        f"Default model; calibration {args.samples} x {args.seq_len} tokens, held-out perplexity on {args.eval_windows} x "
        f"{args.seq_len} tokens (dense {dense_ppl:.2f}), as in quality.md. Flattened share: the part of the ratio taken "
        f"by flattening (0: width-only; equal to the ratio: FlattenGPT, topped up to the exact ratio); the rest is "
        f"width-pruned evenly from the unmerged blocks, so every row removes the same parameters. "
        f"{minutes:.1f} minutes. Regenerate: `python -m benchmarks.split`\n\n```\n{table}\n```\n",
        {"args": vars(args), "dense_perplexity": dense_ppl, "rows": rows},
    )
    print(table)


if __name__ == "__main__":
    main()
