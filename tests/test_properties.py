"""Properties over random tiny configs of every supported family.

- The whole chain capture -> flatten -> fold norms -> fuse -> prune (keeping everything) ->
  ONNX export computes what the parallel form of the original model computes. Each pass alone
  is tested in its own file (test_flatten.py, test_fuse.py, test_prune.py, ...); this checks
  that they compose on any family and shape, through the final exported artifact.
- Garbage values in a Hugging Face ``config.json`` are refused by the loader with one line that
  names the file, never a traceback or, worse, a model silently built from nonsense.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxflatten import FxflattenError, capture, discover_blocks, load_model
from fxflatten.passes.flatten import FlattenPass
from fxflatten.passes.prune import PrunePass
from fxflatten.pipeline import flatten
from fxflatten.plans import BlockPlan, PruneConfig, units_of
from tests.graphs import EXACT, ONNX, FuseCase, fuse_cases, logits, run, tokens
from tests.models import FAMILIES

FEW = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CALIB = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))


def keep_everything(graph, groups: list[list[int]], layers: int) -> list[BlockPlan]:
    """Plans that keep every KV head and channel: pruning then only re-exports the graph."""
    plans = []
    for block, unit in zip(discover_blocks(graph).blocks, units_of(groups, layers)):
        attention, mlp = block.attention[0].attention, block.mlp[0].mlp
        plans.append(BlockPlan(attention.num_kv_heads, mlp.width, unit))
    return plans


def onnx_logits(graph, path: Path, batch: int, length: int) -> torch.Tensor:
    """Export ``graph`` (dynamic batch and length, checked in ONNX Runtime), and run it there."""
    pytest.importorskip("onnxruntime")
    from fxflatten.export import ort, to_onnx

    session = ort.session(to_onnx(graph, path).path)
    ids, mask = tokens(batch, length)
    (out,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return torch.from_numpy(out)


@FEW
@given(case=fuse_cases(sorted(FAMILIES)))
def test_the_whole_chain_down_to_onnx_reproduces_the_parallel_form(case: FuseCase):
    graph = capture(case.model())
    parallel = run(FlattenPass(case.groups), graph)
    fused = flatten(graph, groups=case.groups)
    assert fused.unfused == {}
    plans = keep_everything(fused.graph, case.groups, case.shape.layers)
    pruned = PrunePass(CALIB, plans, PruneConfig(target="widened"))(fused.graph).graph_module
    torch.testing.assert_close(logits(pruned), logits(parallel), **EXACT)
    with tempfile.TemporaryDirectory() as tmp:
        exported = onnx_logits(pruned, Path(tmp) / "model.onnx", batch=3, length=7)
    torch.testing.assert_close(exported, logits(parallel, 3, 7), **ONNX)


# -- garbage config values --------------------------------------------------------------------

#: Sizes a tiny Llama's config.json holds, each of which must be a positive integer.
SIZES = ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
         "intermediate_size", "head_dim", "vocab_size"]

not_a_positive_integer = st.one_of(
    st.integers(max_value=0),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not x.is_integer()),
    st.text(max_size=4),
    st.booleans(),
    st.lists(st.integers(1, 4), max_size=2),
)


@st.composite
def garbage(draw) -> dict[str, object]:
    """One field of the tiny Llama's config (hidden 32, 4 heads, 2 KV heads) made nonsensical."""
    kind = draw(st.sampled_from(["size", "heads", "kv_heads"]))
    if kind == "size":
        return {draw(st.sampled_from(SIZES)): draw(not_a_positive_integer)}
    if kind == "heads":  # query heads that do not divide the hidden size
        return {"num_attention_heads": draw(st.integers(1, 64).filter(lambda h: 32 % h))}
    return {"num_key_value_heads": draw(st.integers(1, 16).filter(lambda k: 4 % k))}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(change=garbage())
def test_garbage_config_values_are_refused_with_a_one_line_error(change, tiny_llama_dir):
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        shutil.copytree(tiny_llama_dir, model)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(FxflattenError) as excinfo:
            load_model(model)
    message = str(excinfo.value)
    assert "\n" not in message and str(model / "config.json") in message
    assert "fix config.json or re-save the model" in message
