"""Shared fixtures: a per-run model cache, the real default model, a tiny model directory, and
two texts for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from fxflatten.load import load_model
from tests.checkpoints import byte_tokenizer, tiny_llama, words


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point ``FXFLATTEN_CACHE`` at a directory of this run for every test and subprocess.

    Tests then never read or fill the user's ``~/.cache/fxflatten``, and the default GGUF is
    dequantized at most once per run. A test that needs an empty cache sets its own.
    """
    path = tmp_path_factory.mktemp("fxflatten-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FXFLATTEN_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def default_model() -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    """The real default model (SmolLM2-135M-Instruct) and its tokenizer: float32, eval mode.

    Shared by the whole run; do not modify it (deep-copy the model first).
    """
    return load_model("default")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face model directory holding ``tiny_llama()`` and ``byte_tokenizer()``.

    Shared by the run and treated as read-only, like a user's model directory.
    """
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A calibration and an evaluation text that do not overlap (byte tokenizer: 1 char = 1 token)."""
    root = tmp_path_factory.mktemp("texts")
    calib, evaluation = root / "calib.txt", root / "eval.txt"
    calib.write_text(words(1))
    evaluation.write_text(words(2))
    return calib, evaluation
