"""Export a captured graph (or a model) to ONNX, and prove in ONNX Runtime that it still computes it.

Two forms:

- **logits** (default): ``logits = f(input_ids, attention_mask)``, exported with the dynamo
  exporter straight from the GraphModule, so every rewritten graph (any width) can be deployed;
- **with past**: one decoding step with a flat KV cache (see ``export/past.py``), exported from a
  Hugging Face model, so ONNX Runtime can generate token by token.

Batch and sequence axes are dynamic; weights go to external data (``<file>.data``) when they
would strain the 2 GiB protobuf limit. Every export is run in ONNX Runtime on random tokens at
two shapes and compared with PyTorch; if the logits differ by more than the tolerance the file
is never moved into place. The file is written beside the target and renamed at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from fxflatten.errors import FxflattenError
from fxflatten.export import ort
from fxflatten.export.past import LOGITS, STEP_INPUTS, CacheShape, WithPast, cache_shape
from fxflatten.graph.capture import MAX_LEN, capture, graph_example_inputs, vocab_size_of

log = logging.getLogger(__name__)

#: ONNX opset of the decoding form. From 23 the exporter writes attention, rotary embeddings and
#: RMS norms as single ``Attention`` / ``RotaryEmbedding`` / ``RMSNormalization`` nodes, which
#: halves the node count of a Llama-style decoding step (ONNX Runtime >= 1.23 runs them). The
#: logits form keeps the exporter's default: there the rotary tables have a batch of one, which
#: ONNX Runtime's ``RotaryEmbedding`` does not broadcast over a larger batch.
DECODING_OPSET = 23
#: Above this many bytes of weights, they are written as external data (protobuf stops at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30
#: Shapes (batch, tokens) of the random inputs the check runs; the second has a batch of two.
CHECK_SHAPES = ((1, 8), (2, 16))
LOGITS_INPUTS = ("input_ids", "attention_mask")
#: The file name fxflatten gives an ONNX model inside an output directory.
ONNX_FILE = "model.onnx"


@dataclass
class OnnxExport:
    """Where the model went, its form, and what the check in ONNX Runtime measured."""

    path: Path
    form: str  # "logits" or "with-past"
    external_data: bool
    tolerance: float
    differences: dict[str, float] = field(default_factory=dict)  # check -> largest |logit difference|
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """For report.json, which sits beside the model: the file by name."""
        return {**asdict(self), "path": self.path.name}

    def summary(self) -> str:
        checks = ", ".join(f"{difference:.1e} on {name}" for name, difference in self.differences.items())
        return f"ONNX Runtime vs PyTorch, largest logit difference: {checks} (tolerance {self.tolerance:.1e})"


def to_onnx(graph_or_model: GraphModule | nn.Module, path: str | os.PathLike, *, with_past: bool = False,
            atol: float = 1e-4, rtol: float = 1e-4) -> OnnxExport:
    """Export to ``path`` (replacing it) and check it in ONNX Runtime against PyTorch.

    The check fails with :class:`FxflattenError` when a logit differs by more than
    ``atol + rtol * max|logits|``: float32 rounding grows with the logits' scale and with the
    conditioning of the weights (PyTorch's own float32 logits are up to 5.7e-4 away from float64
    ones on the default model and 9.5e-4 on it compressed at ratio 0.2, and ONNX Runtime's error
    adds to that), so a purely absolute 1e-4 rejects exact exports of real models; an export bug
    differs by far more.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise FxflattenError(f"{path}: an ONNX file name ends in .onnx")
    start = time.perf_counter()
    with staged(path) as tmp:
        if with_past:
            wrapper = WithPast(graph_or_model)
            shape = cache_shape(graph_or_model)
            external = export_with_past(wrapper, shape, tmp)
        else:
            graph = graph_or_model if isinstance(graph_or_model, GraphModule) else capture(graph_or_model)
            external = export_logits(graph, tmp)
        check_model(tmp)
        sess = ort.session(tmp)
        if with_past:
            differences, tolerance = check_with_past(graph_or_model, shape, sess, atol, rtol)
        else:
            differences, tolerance = check_logits(graph, sess, atol, rtol)
    result = OnnxExport(path, "with-past" if with_past else "logits", external, tolerance, differences, time.perf_counter() - start)
    log.info("exported %s (%s) in %.0f s; largest logit difference %.2e", path, result.form, result.seconds, max(differences.values()))
    return result


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """Yield a file path in a temporary directory beside ``path``; move it (and its data) into place after.

    The external data file moves first and the model file last, so a new ``path`` never points at
    data that is not there yet; an error before the moves (a failed check) leaves ``path`` as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = directory / path.name
        yield tmp
        data, target_data = tmp.with_name(tmp.name + ".data"), path.with_name(path.name + ".data")
        if data.exists():
            os.replace(data, target_data)
        else:
            target_data.unlink(missing_ok=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def file_bytes(path: Path) -> int:
    """Size of an ONNX file with its external data (``<file>.data``), if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def check_model(path: Path) -> None:
    """The ONNX checker, given the path so that external data and files over 2 GiB work."""
    try:
        import onnx
    except ImportError as error:
        raise FxflattenError("onnx is not installed; run `pip install 'fxflatten[onnx]'`") from error
    onnx.checker.check_model(str(path))


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def dynamo_export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  dynamic_shapes: tuple, opset: int | None = None) -> bool:
    """``torch.onnx.export(dynamo=True)`` with fxflatten's error handling; True if data went external.
    ``opset``: the exporter's default when None."""
    external = weight_bytes(module) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings():
        # A captured GraphModule has no train/eval switch (eval behaviour is baked in), and the
        # exporter warns about every axis name shared between inputs; neither is actionable.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        try:
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=input_names, output_names=output_names,
                              dynamic_shapes=dynamic_shapes, external_data=external, opset_version=opset,
                              verbose=False)
        except Exception as error:  # the exporter raises many types; its first line is the useful one
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise FxflattenError(f"torch.onnx.export failed: {first} (run with --debug for the traceback)") from error
    return external


def export_logits(graph: GraphModule, path: Path) -> bool:
    max_len = int(graph.meta.get(MAX_LEN, 8192))
    dims = {0: Dim("batch", min=1, max=4096), 1: Dim("sequence", min=2, max=max_len)}
    return dynamo_export(graph, graph_example_inputs(graph), path, list(LOGITS_INPUTS), [LOGITS], (dims, dims))


def with_past_example(wrapper: WithPast, shape: CacheShape) -> tuple[tuple, tuple, list[str], list[str]]:
    """Arguments, dynamic shapes, input and output names to trace one decoding step with: 3 new
    tokens after 5 cached ones; every axis but the heads is dynamic."""
    config = wrapper.model.config
    batch, seq, past = Dim("batch", min=1, max=4096), Dim("sequence", min=1, max=8192), Dim("past_sequence", min=0, max=8192)
    total = Dim("total_sequence", min=1, max=16384)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (2, 3), generator=generator)
    args = (input_ids, torch.ones(2, 8, dtype=torch.long), torch.arange(5, 8).expand(2, 3),
            *shape.empty(2, 5, dtype=next(wrapper.parameters()).dtype, generator=generator))
    dims = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in shape.past_names()))
    return args, dims, [*STEP_INPUTS, *shape.past_names()], [LOGITS, *shape.present_names()]


def export_with_past(wrapper: WithPast, shape: CacheShape, path: Path) -> bool:
    args, dims, inputs, outputs = with_past_example(wrapper, shape)
    return dynamo_export(wrapper, args, path, inputs, outputs, dims, DECODING_OPSET)


def compare(name: str, got, expected: torch.Tensor, atol: float, rtol: float, differences: dict[str, float]) -> float:
    """Record the largest difference under ``name``; return the tolerance it was held to."""
    differences[name] = float((torch.from_numpy(got).to(expected.dtype) - expected).abs().max())
    return atol + rtol * float(expected.abs().max())


def verdict(differences: dict[str, float], tolerances: dict[str, float]) -> tuple[dict[str, float], float]:
    for name, difference in differences.items():
        log.info("ONNX Runtime vs PyTorch, %s: largest logit difference %.2e (tolerance %.2e)", name, difference, tolerances[name])
    failed = {n: d for n, d in differences.items() if not d <= tolerances[n]}  # NaN fails too
    if failed:
        name, difference = max(failed.items(), key=lambda item: item[1])
        raise FxflattenError(f"the ONNX model's logits differ from PyTorch's by {difference:.2e} on {name} "
                             f"(tolerance {tolerances[name]:.2e}); nothing was written")
    return differences, max(tolerances.values())


@torch.no_grad()
def check_logits(graph: GraphModule, sess, atol: float, rtol: float) -> tuple[dict[str, float], float]:
    differences, tolerances = {}, {}
    for batch, seq in CHECK_SHAPES:
        input_ids, mask = graph_example_inputs(graph, batch, seq)
        name = f"{batch}x{seq}"
        got = sess.run([LOGITS], {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})[0]
        tolerances[name] = compare(name, got, graph(input_ids, mask), atol, rtol, differences)
    return verdict(differences, tolerances)


@torch.no_grad()
def check_with_past(model: nn.Module, shape: CacheShape, sess, atol: float, rtol: float) -> tuple[dict[str, float], float]:
    """A prompt from an empty cache, then one token from the cache, in both runtimes."""
    differences, tolerances = {}, {}
    generator = torch.Generator().manual_seed(0)
    for batch, seq in CHECK_SHAPES:
        input_ids = torch.randint(0, vocab_size_of(model), (batch, seq + 1), generator=generator)
        prompt, last = input_ids[:, :-1], input_ids[:, -1:]
        first = model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
        second = model(input_ids=last, attention_mask=torch.ones_like(input_ids), cache=first.cache, use_cache=True)
        logits, past = ort.step(sess, prompt.numpy(), ort.empty_past(sess, batch), 0)
        name = f"{batch}x{seq} prompt"
        tolerances[name] = compare(name, logits, first.logits, atol, rtol, differences)
        logits, _ = ort.step(sess, last.numpy(), past, seq)
        name = f"{batch}x{seq} next token"
        tolerances[name] = compare(name, logits, second.logits, atol, rtol, differences)
    return verdict(differences, tolerances)
