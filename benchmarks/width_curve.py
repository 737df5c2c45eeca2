"""Equal-budget width curve on the default model: keep each group wider, merge more groups.

At one parameter ratio, ``--width W`` prunes every merged pair back to W blocks instead of one,
so each pair removes 2 - W blocks and selection merges correspondingly more pairs. This asks
whether spreading the same budget over more, wider groups beats fewer, narrower ones. Same
calibration and evaluation text as ``benchmarks.prune_ablation`` (whose default row is W = 1).

    python -m benchmarks.width_curve [--widths 1.25 1.5] [--samples 64] [--ratio 0.2]

Writes benchmarks/results/width_curve.{md,json}.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import default_setup, write_results
from fxflatten import compress, discover_blocks
from fxflatten.eval.perplexity import perplexity
from fxflatten.tables import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--widths", type=float, nargs="+", default=[1.25, 1.5])
    args = parser.parse_args()
    setup = default_setup(args.samples, args.seq_len)
    dense, calib, evaluation = setup.dense, setup.calib, setup.evaluation
    total = discover_blocks(dense).total_parameters
    base = perplexity(dense, evaluation).value
    rows = []
    for width in args.widths:
        start = time.perf_counter()
        result = compress(dense, args.ratio, calib, width=width)
        seconds = time.perf_counter() - start
        params = discover_blocks(result.graph).total_parameters
        value = perplexity(result.graph, evaluation).value
        rows.append({"width": width, "groups": result.groups, "parameters": params, "ratio": 1 - params / total,
                     "perplexity": value, "x_dense": value / base, "seconds": seconds})
        print(rows[-1], flush=True)
        table = format_table(
            ["width", "groups", "parameters", "removed", "perplexity", "x dense"],
            [[r["width"], len(r["groups"]), r["parameters"], f"{r['ratio']:.3f}", r["perplexity"], f"{r['x_dense']:.3f}"] for r in rows],
        )
        write_results(
            "width_curve",
            f"# Equal-budget width curve\n\nDefault model, --ratio {args.ratio}, dense perplexity {base:.2f}; calibration "
            f"{args.samples} x {args.seq_len} tokens, held-out perplexity on {evaluation.shape[0]} x {args.seq_len} tokens. "
            f"Width 1.0 is the default row of prune_ablation.md. Regenerate: python -m benchmarks.width_curve\n\n"
            f"```\n{table}\n```\n\nGroups: " + "; ".join(f"width {r['width']}: {r['groups']}" for r in rows) + "\n",
            {"args": vars(args), "dense_perplexity": base, "rows": rows},
        )
    print(table)


if __name__ == "__main__":
    main()
