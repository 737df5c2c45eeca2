"""Write a Hugging Face causal LM as one GGUF file, for llama.cpp and for ``transformers`` (``gguf_file=``).

Covered: Llama-family (``llama``: Llama, SmolLM, TinyLlama...) and Qwen2 models without rope scaling,
the architectures whose GGUF layout transformers and llama.cpp agree on and whose compressed form
is a standard checkpoint. Tensor names come from the ``gguf`` package's own name map; Llama's query
and key rows are reordered the way llama.cpp's converter does (its rotary embedding pairs
neighbouring values where Hugging Face pairs the two halves), which transformers' reader undoes.

Types: ``f16``, ``bf16`` or ``q8_0`` (blocks of 32 int8 values with one f16 scale) for matrices;
norms and biases stay f32, as llama.cpp's converter keeps them, and a matrix whose rows are not
a whole number of Q8_0 blocks is written in f16. The file is laid out from the tensors' shapes
first, then each tensor is converted and written in turn, so a streamed model is read one
tensor at a time.

The tokenizer goes into the file when it is a byte-level BPE (``tokenizer.ggml.model = gpt2``,
as in GPT-2, SmolLM, Qwen2 and Llama 3). Its pre-tokenizer name, which llama.cpp keys its split
rules on, is copied from the source GGUF file when there is one, else written as ``default``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fxflatten.errors import FxflattenError
from fxflatten.weights import resident

log = logging.getLogger(__name__)

#: Hugging Face ``model_type`` -> GGUF architecture name.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
#: ``--gguf`` choices -> (GGML tensor type name, llama.cpp file type name).
KINDS = {"f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
GGUF_FILE = "model.gguf"


@dataclass
class GgufExport:
    path: Path
    kind: str
    architecture: str
    tensors: int
    tokenizer: bool
    bytes: int

    def as_dict(self) -> dict:
        return {**asdict(self), "path": self.path.name}

    def summary(self) -> str:
        tokens = "with its tokenizer" if self.tokenizer else "without a tokenizer (llama.cpp needs one)"
        return f"GGUF {self.kind} ({self.architecture}), {self.tensors} tensors, {self.bytes / 2**20:.0f} MiB, {tokens}"


def check_gguf_support(config, kind: str) -> str:
    """The GGUF architecture for ``config``, or one line saying why it cannot be written."""
    if kind not in KINDS:
        raise FxflattenError(f"--gguf {kind}: choose one of {', '.join(KINDS)}")
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise FxflattenError(f"--gguf writes {' and '.join(ARCHITECTURES)} models; this one is {model_type!r} "
                             "(write a Hugging Face checkpoint or ONNX instead)")
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise FxflattenError(f"--gguf does not write rope scaling ({scaling.get('rope_type', scaling.get('type'))}); "
                             "write a Hugging Face checkpoint or ONNX instead")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise FxflattenError("--gguf does not write a Llama with attention or MLP biases; write a Hugging Face checkpoint instead")
    return ARCHITECTURES[model_type]


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: Path, kind: str,
               source_gguf: Path | None = None, progress: bool = False) -> GgufExport:
    """Write ``model`` (and ``tokenizer``) to ``path`` with matrices in ``kind``."""
    import gguf

    config = model.config
    architecture = check_gguf_support(config, kind)
    tensor_type = gguf.GGMLQuantizationType[KINDS[kind][0]]
    tensors = _gguf_tensors(model, architecture)
    writer = gguf.GGUFWriter(str(path), architecture)
    _write_config(writer, config, architecture, gguf.LlamaFileType[KINDS[kind][1]])
    has_tokenizer = tokenizer is not None and _write_tokenizer(writer, tokenizer, config.vocab_size, source_gguf)
    plan = []
    for name, tensor in tensors.items():
        qtype = _type_of(tensor.shape, tensor_type, gguf)
        shape = tuple(tensor.shape)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        plan.append((name, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, qtype in tqdm(plan, desc="writing GGUF", unit="tensor", disable=not progress):
        values = _oriented(name, resident(tensors[name]).detach().to("cpu", torch.float32).numpy(), config, architecture)
        writer.write_tensor_data(gguf.quants.quantize(values, qtype))
    writer.close()
    return GgufExport(path, kind, architecture, len(plan), has_tokenizer, path.stat().st_size)


def check_gguf(path: Path, reference: dict[str, float], sets: dict[str, torch.Tensor], max_ratio: float) -> float:
    """Load ``path`` back with transformers (``gguf_file=``) and hold its held-out perplexity on
    ``sets`` to at most ``max_ratio`` times ``reference`` (the written model's, by domain); return the ratio.

    A layout error (a name, a permutation, a shape) gives perplexities in the thousands; rounding
    to f16, bf16 or q8_0 moves them by a fraction of a percent.
    """
    from transformers import AutoModelForCausalLM

    from fxflatten.eval.perplexity import perplexity_values, ratio_over_domains
    from fxflatten.graph.capture import capture

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ratio = ratio_over_domains(perplexity_values(capture(model), sets), reference)
    log.info("GGUF read back by transformers: held-out perplexity %.4fx the model's", ratio)
    if not ratio <= max_ratio:  # NaN fails too
        raise FxflattenError(f"the GGUF file read back has {ratio:.4f}x the model's held-out perplexity, over the limit "
                             f"{max_ratio}; nothing was written (raise --max-ppl-ratio to accept it)")
    return ratio


def _gguf_tensors(model: PreTrainedModel, architecture: str) -> dict[str, torch.Tensor]:
    """Each weight under its GGUF name; a tied head is left out (llama.cpp reuses the embedding)."""
    import gguf

    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture)
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        base, _, suffix = name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise FxflattenError(f"--gguf has no GGUF name for {name}; write a Hugging Face checkpoint instead")
        tensors[f"{mapped}.{suffix}"] = tensor
    return tensors


def _type_of(shape: torch.Size, wanted, gguf):
    """f32 for vectors, f16 for matrices whose rows are not whole blocks of ``wanted``, else ``wanted``."""
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _oriented(name: str, values: np.ndarray, config, architecture: str) -> np.ndarray:
    """Llama's query and key rows reordered from halves to neighbouring pairs, as llama.cpp expects."""
    if architecture != "llama" or not (".attn_q." in name or ".attn_k." in name):
        return values
    heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
    return values.reshape(heads, 2, values.shape[0] // heads // 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


def _write_config(writer, config, architecture: str, file_type) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(getattr(config, "_name_or_path", "") or architecture)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(2)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))


def _write_tokenizer(writer, tokenizer: PreTrainedTokenizerBase, vocab_size: int, source_gguf: Path | None) -> bool:
    """The tokenizer as llama.cpp's ``gpt2`` model (byte-level BPE); False (and a warning) for any other kind."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        log.warning("the tokenizer is not a byte-level BPE; the GGUF file holds none, so llama.cpp cannot run it as is")
        return False
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # unused, for ids the model has and the tokenizer does not
    for token, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = token, 1  # normal
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]], types[added["id"]] = added["content"], 3 if added.get("special") else 4  # control / user defined
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(source_gguf))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for token_id, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                          ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, token_id, None)
        if value is not None and value < vocab_size:
            add(int(value))
    ids = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return True


def _pre_tokenizer_name(source_gguf: Path | None) -> str:
    if source_gguf is not None and os.path.isfile(source_gguf):
        import gguf

        field = gguf.GGUFReader(str(source_gguf)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    return "default"
