"""fxflatten: depth compression of pre-norm transformers (FlattenGPT) as torch.fx graph passes.

The pipeline is capture -> discover blocks -> calibrate -> passes -> export; each step is a
public function here, and the ``fxflatten`` command calls the same functions.
"""

from fxflatten.capture import capture
from fxflatten.errors import FxflattenError
from fxflatten.graph import discover_blocks
from fxflatten.layout import AttentionLayout, Block, BlockMap, Branch, Linear, MlpLayout, Norm, Projection
from fxflatten.load import load_model
from fxflatten.passes.prune import PruneConfig
from fxflatten.pipeline import compress, flatten

__all__ = [
    "AttentionLayout",
    "Block",
    "BlockMap",
    "Branch",
    "FxflattenError",
    "Linear",
    "MlpLayout",
    "Norm",
    "Projection",
    "PruneConfig",
    "capture",
    "compress",
    "discover_blocks",
    "flatten",
    "load_model",
]
