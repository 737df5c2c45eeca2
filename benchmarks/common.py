"""What the benchmarks share: the default model with its calibration and evaluation windows.

Every quality benchmark starts from the same seed, model and text, so their tables can be read
side by side; results go under ``benchmarks/results``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule
from transformers import PreTrainedTokenizerBase

from fxflatten import capture, load_model
from fxflatten.text import calibration_windows, evaluation_windows

RESULTS = Path(__file__).parent / "results"


def write_results(stem: str, markdown: str, data: dict) -> None:
    """``results/{stem}.md`` for people and ``results/{stem}.json`` for tools: one benchmark's findings."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(markdown)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")


@dataclass
class Setup:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    dense: GraphModule  # the captured dense model
    calib: torch.Tensor  # (windows, seq_len) of the default calibration text
    evaluation: torch.Tensor  # (windows, seq_len) of the default evaluation text


def default_setup(samples: int, seq_len: int, eval_windows: int | None = None) -> Setup:
    """The default model captured, ``samples`` calibration windows, and the evaluation windows."""
    torch.manual_seed(0)
    model, tokenizer = load_model("default")
    calib = calibration_windows(tokenizer, None, samples, seq_len)
    evaluation = evaluation_windows(tokenizer, None, eval_windows, seq_len)
    return Setup(model, tokenizer, capture(model), calib, evaluation)
