"""What the calibration text's kinds do to FlattenGPT and to ReplaceMe, on the default model.

FlattenGPT's refits fit tens of millions of numbers to the calibration windows, ReplaceMe's one
map a third of a million; so the first keeps the kind of text it is calibrated on better, and may
keep other kinds worse. Each mix here takes ``--samples`` windows taking turns among some of the
default calibration's sources (``fxflatten.text.default_text().sources``: ``article``, ``plays``,
``code``; ``fxflatten.text.interleaved_windows``), selects groups from them as ``compress`` does,
and scores ``compress`` and ReplaceMe (least squares, as many contiguous blocks) on the three
held-out domains of the quality table. The mix of all three sources is the default calibration.

    python -m benchmarks.calibration_mix [--ratio 0.2] [--mixes article+plays article+plays+code]

Writes benchmarks/results/calibration_mix.{md,json}.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.baselines import replaceme
from benchmarks.common import write_results
from fxflatten import capture, discover_blocks, load_model
from fxflatten.eval.perplexity import geometric_mean, perplexities, perplexity_values
from fxflatten.pipeline import compress
from fxflatten.selection import greedy_groups, hidden_similarity
from fxflatten.tables import format_table
from fxflatten.text import DOMAINS, default_text, evaluation_sets, interleaved_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--mixes", nargs="+", default=["article+plays", "article+plays+code"],
                        help="calibration sources joined by +, windows taking turns in that order")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = load_model("default")
    dense = capture(model)
    dense_map = discover_blocks(dense)
    block_parameters = [block.parameters for block in dense_map.blocks]
    sources = default_text().sources
    sets = evaluation_sets(tokenizer, None, args.eval_windows, args.seq_len)
    dense_ppl = perplexity_values(dense, sets)

    def score(graph) -> dict[str, float]:
        x = {domain: p.value / dense_ppl[domain] for domain, p in perplexities(graph, sets).items()}
        return x | {"geo. mean": geometric_mean(list(x.values()))}

    rows = []
    for mix in args.mixes:
        calib = interleaved_windows(tokenizer, [sources[name] for name in mix.split("+")], args.samples, args.seq_len)
        similarity = hidden_similarity(dense, calib)
        groups, _ = greedy_groups(similarity, block_parameters, dense_map.total_parameters, args.ratio)
        flattened = compress(dense, args.ratio, calib, groups=groups).graph
        replaced, _ = replaceme.replace_span(dense, calib, similarity, sum(len(g) - 1 for g in groups), "lstsq")
        for method, graph in (("FlattenGPT", flattened), ("ReplaceMe (lstsq)", replaced)):
            rows.append({"calibration": mix, "method": method, "groups": groups} | score(graph))
            print(rows[-1], flush=True)
    columns = [*DOMAINS, "geo. mean"]
    table = format_table(["calibration", "method", *columns], [[r["calibration"], r["method"], *(r[c] for c in columns)]
                                                             for r in rows])
    minutes = (time.perf_counter() - start) / 60
    write_results(
        "calibration_mix",
        f"# Calibration mixed from several kinds of text\n\n"
        f"Default model, --ratio {args.ratio}; calibration {args.samples} x {args.seq_len} tokens whose windows take "
        f"turns among the named sources of the default calibration text; groups chosen from each calibration as "
        f"compress chooses them; held-out perplexity on {args.eval_windows} x {args.seq_len} tokens of each domain, as a "
        f"multiple of the dense model's ({', '.join(f'{d} {v:.2f}' for d, v in dense_ppl.items())}). "
        f"{minutes:.1f} minutes. Regenerate: `python -m benchmarks.calibration_mix`\n\n```\n{table}\n```\n",
        {"args": vars(args), "dense_perplexity": dense_ppl, "rows": rows},
    )
    print(table)


if __name__ == "__main__":
    main()
