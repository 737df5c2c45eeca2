"""passes/base.py: the passes run in a torch PassManager and never touch their input.

Every pass test also runs ``check_runs``: each pass's ``ensures`` runs the rewritten graph on a
small batch and raises if its logits have the wrong shape or are not finite.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_manager import PassManager

from fxflatten import discover_blocks
from fxflatten.passes.flatten import FlattenPass
from fxflatten.passes.fold_norms import FoldNormsPass
from fxflatten.passes.fuse import FusePass
from tests.graphs import GROUPS, logits, pipeline


def test_passes_compose_in_a_pass_manager_and_leave_their_input_untouched():
    profiler = pipeline("llama")
    result = PassManager(passes=[FlattenPass(GROUPS), FoldNormsPass(), FusePass()])(profiler.graph)
    assert result.modified
    assert [block.parallel for block in discover_blocks(result.graph_module).blocks] == [1, 1]
    torch.testing.assert_close(logits(result.graph_module), logits(profiler.fused), rtol=0, atol=0)
    # Neither the pass manager nor the passes run one by one touched the graph or the model.
    assert dict(profiler.graph.named_parameters()).keys() == profiler.graph_parameters.keys()
    for name, parameter in profiler.graph.named_parameters():
        assert torch.equal(parameter, profiler.graph_parameters[name]), name
    torch.testing.assert_close(logits(profiler.graph), profiler.graph_logits, rtol=0, atol=0)
    state = profiler.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in profiler.model_state.items())
