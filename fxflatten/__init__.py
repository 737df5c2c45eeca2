"""fxflatten: depth compression of pre-norm transformers (FlattenGPT) as torch.fx graph passes.

The pipeline is capture -> discover blocks -> calibrate -> passes -> export; each step is a
public function here, and the ``fxflatten`` command calls the same functions.
"""

from fxflatten.errors import FxflattenError
from fxflatten.graph.capture import capture
from fxflatten.graph.discovery import discover_blocks
from fxflatten.graph.layout import AttentionLayout, Block, BlockMap, Branch, Linear, MlpLayout, Norm, Projection
from fxflatten.load import load_model
from fxflatten.pipeline import compress, flatten
from fxflatten.plans import PruneConfig

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
