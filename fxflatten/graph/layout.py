"""Plain data classes that describe what discovery found in a captured graph.

Every pass reads these instead of looking at class names. Family quirks are data here, not
branches in the passes: a fused qkv projection is three :class:`Projection` s over one
:class:`Linear`, GPT-2's Conv1D is a Linear with ``transposed=True``, a post-branch norm is a
:class:`Norm` in ``Branch.post_norm``. Nodes and parameters are referred to by name (fx node
names and ``get_attr`` targets), so a layout stays valid for a deep copy of its graph and can be
written out as JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

NormKind = Literal["rms", "layer"]
BranchKind = Literal["attention", "mlp", "other"]


@dataclass(frozen=True)
class Linear:
    """A matrix multiply by a parameter: ``aten.linear`` or GPT-2's Conv1D ``addmm``."""

    node: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    transposed: bool  # weight stored (in, out), as GPT-2's Conv1D does


@dataclass(frozen=True)
class Projection:
    """Rows ``[start, stop)`` of a linear's output: all of it, or one part of a fused qkv."""

    linear: Linear
    start: int
    stop: int

    @property
    def features(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Norm:
    """A normalisation in front of (or behind) a branch, with its affine parameters."""

    kind: NormKind
    weight: str | None
    bias: str | None
    eps: float | None
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class AttentionLayout:
    q: Projection
    k: Projection
    v: Projection
    o: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class MlpLayout:
    up: Projection
    gate: Projection | None  # None for a plain act(fc) MLP such as GPT-2's
    down: Linear
    width: int
    activation: str


@dataclass(frozen=True)
class Branch:
    """One residual branch: ``stream' = stream + f(stream)``.

    ``stream_in`` is the node the branch reads the stream from (also the add's stream
    operand), ``output`` the branch result that is added, ``add`` the residual add.
    """

    kind: BranchKind
    stream_in: str
    output: str
    add: str
    nodes: tuple[str, ...]
    norm: Norm | None
    post_norm: Norm | None
    linears: tuple[Linear, ...]
    attention: AttentionLayout | None
    mlp: MlpLayout | None
    parameters: int
    module: str | None  # the innermost module path shared by the branch's nodes, for display

    @property
    def fusable(self) -> bool:
        """Its output reaches the add straight from a linear, so it can be widened."""
        return self.post_norm is None and self.kind != "other"


@dataclass(frozen=True)
class Block:
    """One layer: an attention stage, then an MLP stage.

    A stage is one branch in a model as captured; after flattening a group of layers it holds
    one branch per original layer, all reading the same stream value (the parallel form), and
    after fusing it is one wide branch again.
    """

    index: int
    attention: tuple[Branch, ...]
    mlp: tuple[Branch, ...]
    module: str | None

    @property
    def branches(self) -> tuple[Branch, ...]:
        return self.attention + self.mlp

    @property
    def parallel(self) -> int:
        """How many layers run side by side in this block (1 unless flattened and not fused)."""
        return len(self.attention)

    @property
    def parameters(self) -> int:
        return sum(branch.parameters for branch in self.branches)

    @property
    def fusable(self) -> bool:
        return all(branch.fusable for branch in self.branches)

    @property
    def norm_kind(self) -> NormKind | None:
        norm = next((branch.norm for branch in self.branches if branch.norm), None)
        return norm.kind if norm else None


@dataclass(frozen=True)
class BlockMap:
    """The residual stream of a captured model and the blocks that hang off it."""

    stream: tuple[str, ...]  # residual add nodes, in order
    blocks: tuple[Block, ...]
    hidden_size: int
    total_parameters: int

    @property
    def block_parameters(self) -> int:
        return sum(block.parameters for block in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
