"""Run exported models in ONNX Runtime: sessions on the best provider, and greedy generation.

A model exported ``--with-past`` decodes token by token from its KV cache; a logits-only model
(the form every graph can be exported in) is run on the whole sequence for every new token,
which gives the same tokens at a cost quadratic in their number.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from fxflatten.errors import FxflattenError
from fxflatten.export.past import STEP_INPUTS

log = logging.getLogger(__name__)

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _ort():
    try:
        import onnxruntime
    except ImportError as error:
        raise FxflattenError("onnxruntime is not installed; run `pip install 'fxflatten[onnx]'`") from error
    return onnxruntime


def cuda_device_visible() -> bool:
    """Whether the NVIDIA driver shows a GPU and CUDA_VISIBLE_DEVICES does not hide it.

    onnxruntime-gpu lists the CUDA provider whether or not a device exists, so its presence in
    ``get_available_providers`` alone is not enough.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def providers() -> list[str]:
    """CUDA then CPU when onnxruntime-gpu is installed (the ``gpu`` extra) and a GPU is visible."""
    available = _ort().get_available_providers()
    return [CUDA, CPU] if CUDA in available and cuda_device_visible() else [CPU]


def session(path: str | os.PathLike, provider_order: list[str] | None = None):
    """An InferenceSession for ``path`` with full graph optimisation on ``providers()``."""
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    created = ort.InferenceSession(str(path), options, providers=provider_order or providers())
    log.info("ONNX Runtime session for %s on %s", path, created.get_providers())
    return created


def past_inputs(sess) -> list:
    """The session's KV-cache inputs (empty for a logits-only model)."""
    return [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]


def empty_past(sess, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors for a first step, shaped from the model's declared inputs."""
    feeds = {}
    for spec in past_inputs(sess):
        _, kv_heads, _, head_dim = spec.shape
        feeds[spec.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=_NUMPY_TYPES[spec.type])
    return feeds


def step(sess, input_ids: np.ndarray, past: dict[str, np.ndarray], past_length: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One decoding step: logits for ``input_ids`` after ``past_length`` cached tokens, new cache."""
    batch, seq = input_ids.shape
    feeds = {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": np.ones((batch, past_length + seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past_length, past_length + seq, dtype=np.int64), (batch, seq)).copy(),
        **past,
    }
    logits, *presents = sess.run(None, feeds)
    names = [spec.name for spec in past_inputs(sess)]
    return logits, dict(zip(names, presents))


def sequence_logits(sess, input_ids: np.ndarray) -> np.ndarray:
    """Logits at every position of ``input_ids`` (batch x tokens), from either exported form."""
    if past_inputs(sess):
        return step(sess, input_ids, empty_past(sess, input_ids.shape[0]), 0)[0]
    return sess.run(["logits"], {"input_ids": input_ids.astype(np.int64), "attention_mask": np.ones_like(input_ids, dtype=np.int64)})[0]


class SessionModel:
    """An ONNX Runtime session called as a captured graph is: ``(input_ids, attention_mask) -> logits``,
    so held-out perplexity is measured on the runtime's own output. Windows are whole (all ones)."""

    def __init__(self, sess) -> None:
        self.sess = sess

    def __call__(self, input_ids, attention_mask=None):
        import torch

        return torch.from_numpy(sequence_logits(self.sess, input_ids.cpu().numpy()))


def greedy(sess, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """The tokens greedy decoding appends to ``prompt_ids`` (one sequence), stopping at EOS."""
    if not prompt_ids:
        raise FxflattenError("the prompt is empty: give at least one token")
    names = {i.name for i in sess.get_inputs()}
    with_past = bool(past_inputs(sess))
    expected = set(STEP_INPUTS) if with_past else {"input_ids", "attention_mask"}
    if not expected <= names:
        raise FxflattenError(f"the ONNX model's inputs {sorted(names)} are not an fxflatten export's")
    tokens = list(prompt_ids)
    new: list[int] = []
    past = empty_past(sess, 1)
    feed_ids = np.array([tokens], dtype=np.int64)
    for _ in range(max_new_tokens):
        if with_past:
            logits, past = step(sess, feed_ids, past, len(tokens) - feed_ids.shape[1])
        else:
            logits = sequence_logits(sess, np.array([tokens], dtype=np.int64))
        token = int(logits[0, -1].argmax())
        new.append(token)
        tokens.append(token)
        if token == eos_token_id:
            break
        feed_ids = np.array([[token]], dtype=np.int64)
    return new
