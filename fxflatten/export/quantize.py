"""Int8 ONNX: block-quantized weights for ONNX Runtime, held to a perplexity bound on held-out text.

Every weight matrix goes through ONNX Runtime's own ``MatMulNBits`` quantizer with 8 bits: blocks of
32 values along its input axis, one float scale per block and no zero point, the layout of
llama.cpp's Q8_0. That quantizer takes embedding tables at 4 bits only, so fxflatten quantizes
them itself, the same way, into ORT's ``GatherBlockQuantized`` (8 bits, zero point 128). Matrix products then run on int8 weights with the
activations quantized per block of 32 as well (``accuracy_level`` 4), which keeps outliers in one
block from costing the rest of the row. ORT's older dynamic quantization (``quantize_dynamic``,
one uint8 scale per activation tensor) loses far more on small LLMs, whose activations carry a
few huge channels; the figures are in benchmarks/results/NOTES.md.

A tied language-model head reads the embedding through a ``Transpose``, which no quantizer
follows; it is given its own transposed initializer first, so it is quantized too.

Whether the result is still the model is not a logit tolerance (int8 rounding moves every logit)
but held-out perplexity: both files are run in ONNX Runtime on the same windows, and the int8
file is refused when its perplexity exceeds ``max_ratio`` times the float one's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fxflatten.errors import FxflattenError
from fxflatten.eval.perplexity import perplexity_values, ratio_over_domains
from fxflatten.export import ort
from fxflatten.export.onnx import file_bytes

log = logging.getLogger(__name__)

BITS, BLOCK = 8, 32
#: Held-out perplexity the int8 file may reach, as a multiple of the float file's (geometric mean over domains).
MAX_RATIO = 1.02


@dataclass
class Int8Check:
    """The int8 file against the float one it came from, measured in ONNX Runtime."""

    float_perplexity: dict[str, float]
    int8_perplexity: dict[str, float]
    ratio: float  # geometric mean over domains of int8 / float perplexity
    max_ratio: float
    float_bytes: int
    int8_bytes: int
    windows: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"int8 held-out perplexity {self.ratio:.4f}x the float model's (limit {self.max_ratio}) on {self.windows}; "
                f"file {self.int8_bytes / 2**20:.0f} MiB from {self.float_bytes / 2**20:.0f} MiB")


def quantization_tools():
    """ONNX Runtime's weight quantizer, or one line saying how to get it."""
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    except ImportError as error:
        raise FxflattenError("--int8 needs onnxruntime's quantization tools (onnxruntime >= 1.20 with its "
                             "`quantization` package); run `pip install 'fxflatten[onnx]'`") from error
    return matmul_nbits_quantizer


def untie_transposed_weights(model) -> int:
    """Give every ``MatMul`` that reads an initializer through a 2-D ``Transpose`` its own
    transposed copy of it; return how many were untied. The emptied transposes are removed."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    untied = 0
    for node in graph.node:
        transpose = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
        weight = numpy_helper.to_array(initializers[transpose.input[0]])
        if weight.ndim != 2 or perm != [1, 0]:
            continue
        name = f"{transpose.input[0]}.transposed"
        graph.initializer.append(numpy_helper.from_array(weight.T.copy(), name))
        consumers[node.input[1]] -= 1
        if consumers[node.input[1]] == 0:
            graph.node.remove(transpose)
        node.input[1] = name
        untied += 1
    onnx.checker.check_model(model)
    return untied


def quantize_file(float_path: Path, path: Path, external_data: bool) -> None:
    """Write the int8 form of ``float_path`` to ``path`` (weights as external data when asked)."""
    import onnx

    tools = quantization_tools()
    model = onnx.load(str(float_path))
    log.info("untied %d transposed weights for quantization", untie_transposed_weights(model))
    quantizer = tools.MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK, is_symmetric=True, accuracy_level=4,
                                           op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),))
    quantizer.process()
    log.info("quantized %d embedding tables", quantize_embeddings(quantizer.model.model))
    quantizer.model.save_model_to_file(str(path), external_data)


def quantize_embeddings(model) -> int:
    """Replace each ``Gather`` of rows from a float table (whose width is a multiple of the block)
    by a ``GatherBlockQuantized`` of its symmetric 8-bit blocks; return how many were replaced."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    replaced = 0
    for node in list(graph.node):
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or axis != 0 or len(table.dims) != 2 or table.dims[1] % BLOCK:
            continue
        weight = numpy_helper.to_array(table).astype(np.float32)
        blocks = weight.reshape(weight.shape[0], -1, BLOCK)
        scales = np.abs(blocks).max(axis=-1) / 127
        codes = np.round(blocks / np.where(scales == 0, 1, scales)[..., None]) + 128
        name = node.input[0]
        graph.initializer.extend([
            numpy_helper.from_array(codes.reshape(weight.shape).astype(np.uint8), f"{name}.q8"),
            numpy_helper.from_array(scales.astype(np.float32), f"{name}.q8_scales"),
        ])
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(position, helper.make_node(
            "GatherBlockQuantized", [f"{name}.q8", node.input[1], f"{name}.q8_scales"], list(node.output), name=node.name,
            domain="com.microsoft", bits=BITS, block_size=BLOCK, gather_axis=0, quantize_axis=1))
        if not any(name in other.input for other in graph.node):
            graph.initializer.remove(table)
        replaced += 1
    return replaced


def quantize_int8(float_path: Path, path: Path, sets: dict[str, torch.Tensor], external_data: bool = False,
                  max_ratio: float = MAX_RATIO) -> Int8Check:
    """Quantize ``float_path`` into ``path`` and measure both in ONNX Runtime on ``sets``.

    Raises :class:`FxflattenError` (the caller leaves nothing written) when the int8 model's
    held-out perplexity exceeds ``max_ratio`` times the float model's.
    """
    start = time.perf_counter()
    quantize_file(float_path, path, external_data)
    scores = {}
    for label, file in (("float", float_path), ("int8", path)):
        scores[label] = perplexity_values(ort.SessionModel(ort.session(file)), sets)
    ratio = ratio_over_domains(scores["int8"], scores["float"])
    windows = ", ".join(f"{w.shape[0]} x {w.shape[1]} tokens of {d}" for d, w in sets.items())
    check = Int8Check(scores["float"], scores["int8"], ratio, max_ratio, file_bytes(float_path), file_bytes(path),
                      windows, time.perf_counter() - start)
    log.info("%s", check.summary())
    if not ratio <= max_ratio:  # NaN fails too
        raise FxflattenError(f"int8 held-out perplexity is {ratio:.4f}x the float model's, over the limit {max_ratio}; "
                             "nothing was written (raise --max-ppl-ratio to accept it)")
    return check

