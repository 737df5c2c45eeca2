"""fxflatten: depth compression of pre-norm transformers (FlattenGPT) as torch.fx graph passes.

The pipeline is capture -> discover blocks -> calibrate -> passes -> export; each step is a
public function here, and the ``fxflatten`` command calls the same functions.

The names are imported on first use, so that ``import fxflatten.cli`` does not load torch and
transformers (which import torchao, when it is installed, and log as they do) before the command
line has set up logging.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: Public name -> the module that defines it.
_EXPORTS = {
    "FxflattenError": "fxflatten.errors",
    "capture": "fxflatten.graph.capture",
    "discover_blocks": "fxflatten.graph.discovery",
    **dict.fromkeys(("AttentionLayout", "Block", "BlockMap", "Branch", "Linear", "MlpLayout", "Norm", "Projection"),
                    "fxflatten.graph.layout"),
    "load_model": "fxflatten.load",
    "compress": "fxflatten.pipeline",
    "flatten": "fxflatten.pipeline",
    "PruneConfig": "fxflatten.plans",
}

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxflatten' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from fxflatten.errors import FxflattenError
    from fxflatten.graph.capture import capture
    from fxflatten.graph.discovery import discover_blocks
    from fxflatten.graph.layout import AttentionLayout, Block, BlockMap, Branch, Linear, MlpLayout, Norm, Projection
    from fxflatten.load import load_model
    from fxflatten.pipeline import compress, flatten
    from fxflatten.plans import PruneConfig
