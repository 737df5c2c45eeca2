"""Held-out perplexity of several models on several domains: the report entries and the table
``flatten`` and ``compress`` end with.

The quality of a compression is its perplexity as a multiple of the dense model's, on each
held-out domain and as the geometric mean over the domains: a compression that only fits its
calibration text keeps its own domain and loses the others, and the mean shows it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxflatten.errors import check_finite
from fxflatten.eval.perplexity import Perplexity, geometric_mean, perplexities
from fxflatten.graph.layout import BlockMap
from fxflatten.tables import format_table


def held_out(graphs: dict[str, GraphModule], sets: dict[str, torch.Tensor]) -> dict[str, dict[str, Perplexity]]:
    """Each graph's held-out perplexity on each domain's windows, checked to be finite."""
    scores = {label: perplexities(graph, sets, progress=True) for label, graph in graphs.items()}
    for label, by_domain in scores.items():
        for domain, result in by_domain.items():
            check_finite(result.value, f"held-out perplexity of the {label} model on {domain}")
    return scores


def perplexity_report(scores: dict[str, dict[str, Perplexity]]) -> dict[str, object]:
    """report.json's perplexity entries: the first domain's (the default evaluation text, or the
    user's), every domain's, and the geometric mean over the domains of each model's perplexity
    as a multiple of the dense model's (the figure a quality claim rests on)."""
    dense = scores["dense"]
    first = next(iter(dense))
    sample = dense[first]
    return {
        "perplexity": {label: by_domain[first].value for label, by_domain in scores.items()}
        | {"text": first, "windows": sample.windows, "seq_len": sample.seq_len, "tokens": sample.tokens},
        "domains": {domain: {label: by_domain[domain].value for label, by_domain in scores.items()} for domain in dense},
        "x_dense_geometric_mean": {label: ratio_to_dense(by_domain, dense) for label, by_domain in scores.items()
                                   if label != "dense"},
    }


def ratio_to_dense(scores: dict[str, Perplexity], dense: dict[str, Perplexity]) -> float:
    return geometric_mean([scores[domain].value / dense[domain].value for domain in dense])


def perplexity_table(scores: dict[str, dict[str, Perplexity]], maps: dict[str, BlockMap]) -> str:
    """One row per model: layers, parameters, perplexity on each domain and the geometric mean
    of its multiples of the dense model's; then what the perplexity was measured on."""
    dense = scores["dense"]
    rows = [[label, len(maps[label].blocks), maps[label].total_parameters,
             *(by_domain[domain].value for domain in dense), ratio_to_dense(by_domain, dense)]
            for label, by_domain in scores.items()]
    table = format_table(["model", "layers", "parameters", *dense, "x dense (geo. mean)"], rows)
    measured = "; ".join(f"{domain}: {result.measured_on}" for domain, result in dense.items())
    return f"{table}\nheld-out perplexity measured on {measured}"
