"""export/hf.py: a compressed graph written as a standard Hugging Face checkpoint, or refused."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fxflatten import FxflattenError, capture, discover_blocks
from fxflatten.export.hf import check_same_logits, to_pretrained
from fxflatten.pipeline import compress
from tests.graphs import CALIB, IDS
from tests.graphs import ids_logits as logits
from tests.models import Shape, build


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3", "mistral"])
def test_compressed_model_is_written_as_a_standard_checkpoint(family, tmp_path):
    model = build(family, Shape(layers=4))
    graph = capture(model)
    result = compress(graph, calib=CALIB, groups=[[1, 2]])
    pretrained = to_pretrained(result.graph, model, discover_blocks(graph))
    assert check_same_logits(result.graph, pretrained) < 1e-5
    pretrained.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS, use_cache=False).logits, logits(result.graph), rtol=1e-5, atol=1e-5)


def test_a_wider_result_is_refused_as_a_checkpoint():
    model = build("llama", Shape(layers=4))
    graph = capture(model)
    result = compress(graph, calib=CALIB, groups=[[1, 2]], width=1.5)
    with pytest.raises(FxflattenError, match="wider or narrower"):
        to_pretrained(result.graph, model, discover_blocks(graph))
