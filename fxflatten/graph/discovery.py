"""Discover the residual stream, its branches and its blocks from a captured graph alone.

A pre-norm transformer is a chain of residual adds ``x_{k+1} = x_k + f_k(x_k)``. In the graph
each such add has one operand (the stream) that is an ancestor of the other (the branch
output). The residual stream is the longest chain of such adds in which each add's stream
operand is, up to no-op casts and dropouts, the previous add. A branch is everything that lies
between a stream value and its add; what it contains (scaled-dot-product attention, linears with
an activation, a normalisation) says what it is. No class or module name is consulted; module
paths only label the result for people.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from fxflatten.errors import FxflattenError
from fxflatten.graph.capture import PARAM_PREFIX
from fxflatten.graph.fx import (
    attr_target,
    flat_nodes,
    is_identity,
    linear_input,
    packet,
    resolve_identity,
    shape_of,
    to_digraph,
    unviewed,
)
from fxflatten.graph.layout import AttentionLayout, Block, BlockMap, Branch, Linear, MlpLayout, Norm, Projection
from fxflatten.graph.params import get_tensor

log = logging.getLogger(__name__)
aten = torch.ops.aten

ATTENTION_OPS = {
    aten.scaled_dot_product_attention,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._softmax,
    aten.softmax,
}
ACTIVATION_OPS = {
    aten.silu: "silu",
    aten.gelu: "gelu",
    aten.relu: "relu",
    aten.sigmoid: "sigmoid",
    aten.tanh: "gelu_tanh",
}
NORM_OPS = {aten.layer_norm: "layer", aten.rms_norm: "rms", aten.native_layer_norm: "layer"}
SPLIT_OPS = {aten.split, aten.split_with_sizes, aten.chunk}


class Discovery:
    """One discovery run over one graph: holds the graph, its networkx view and lookups."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.dag = to_digraph(gm)
        self.nodes = {node.name: node for node in gm.graph.nodes}
        self.order = {node.name: index for index, node in enumerate(gm.graph.nodes)}
        self._ancestors: dict[str, set[str]] = {}

    def ancestors(self, node: Node) -> set[str]:
        if node.name not in self._ancestors:
            self._ancestors[node.name] = nx.ancestors(self.dag, node.name)
        return self._ancestors[node.name]

    # -- the residual stream ------------------------------------------------------------------

    def residual_adds(self) -> dict[str, tuple[Node, Node]]:
        """Every add ``stream + branch`` on a residual stream, as add name -> (stream, branch).

        A serial residual add has one operand computed from the other. After flattening, the
        add of a parallel branch does not: its stream operand is the previous residual add and
        its branch reads an earlier stream value, so such adds are found in a second round.
        """
        found = {}
        candidates = []
        for node in self.gm.graph.nodes:
            if packet(node) is not aten.add or len(node.args) < 2:
                continue
            a, b = node.args[:2]
            if not (isinstance(a, Node) and isinstance(b, Node)):
                continue
            if shape_of(a) is None or shape_of(a) != shape_of(b) or len(shape_of(a)) < 2:
                continue
            if a.name in self.ancestors(b):
                found[node.name] = (a, b)
            elif b.name in self.ancestors(a):
                found[node.name] = (b, a)
            else:
                candidates.append((node, a, b))
        changed = True
        while changed:
            changed = False
            stream_values = set(found) | {resolve_identity(s).name for s, _ in found.values()}
            for node, a, b in candidates:
                if node.name in found:
                    continue
                for stream_in, output in ((a, b), (b, a)):
                    if resolve_identity(stream_in).name in found and self.ancestors(output) & stream_values:
                        found[node.name] = (stream_in, output)
                        changed = True
                        break
        return found

    def stream(self) -> list[str]:
        """The longest chain of residual adds, each reading the previous one's result."""
        adds = self.residual_adds_cache
        previous = {}
        for name, (stream_in, _) in adds.items():
            source = resolve_identity(stream_in).name
            previous[name] = source if source in adds else None
        chains = []
        for name in adds:
            chain = [name]
            while previous[chain[-1]] is not None:
                chain.append(previous[chain[-1]])
            chains.append(chain[::-1])
        longest = max(chains, key=len, default=[])
        if len(longest) < 2:
            self._refuse_without_stream(adds)
        return longest

    def stream_values(self, stream: list[str]) -> set[str]:
        """The stream's adds, the value entering it, and no-op copies of any of them."""
        values = set(stream) | {resolve_identity(self.residual_adds_cache[stream[0]][0]).name}
        return values | {node.name for node in self.gm.graph.nodes if is_identity(node) and resolve_identity(node).name in values}

    def _refuse_without_stream(self, adds: dict[str, tuple[Node, Node]]) -> None:
        for stream_in, _ in adds.values():
            source = resolve_identity(stream_in)
            if packet(source) in NORM_OPS or packet(source) is aten.mul:
                upstream = [n for n in source.all_input_nodes if resolve_identity(n).name in adds]
                if upstream:
                    raise FxflattenError(
                        "this is a post-norm transformer (each residual sum is normalised before the "
                        "next branch reads it, as in BERT): FlattenGPT needs a pre-norm model whose "
                        "branches add into an un-normalised residual stream"
                    )
        raise FxflattenError(
            "no residual stream found: the graph has no chain of adds of the form x + f(x); "
            "FlattenGPT needs a pre-norm transformer (x + Attn(Norm(x)), then + MLP(Norm(.)))"
        )

    # -- branches -----------------------------------------------------------------------------

    def branch(self, add_name: str, stream_values: set[str]) -> Branch:
        """The branch added at ``add_name``: what lies between the stream value it reads and the add.

        A serial branch reads the add's own stream operand; a parallel one (after flattening)
        reads an earlier stream value: the latest one its output depends on.
        """
        add = self.nodes[add_name]
        stream_operand, output = self.residual_adds_cache[add_name]
        read = [name for name in self.ancestors(output) if name in stream_values]
        stream_in = self.nodes[max(read, key=self.order.__getitem__)] if read else stream_operand
        ancestors = self.ancestors(output) | {output.name}
        descendants = nx.descendants(self.dag, stream_in.name)
        names = sorted(ancestors & descendants, key=self.order.__getitem__)
        members = [self.nodes[name] for name in names]
        linears = [linear for node in members if (linear := self.as_linear(node)) is not None]
        ops = {packet(node) for node in members}
        if ops & ATTENTION_OPS:
            kind = "attention"
        elif len(linears) >= 2 and any(op in ACTIVATION_OPS for op in ops):
            kind = "mlp"
        else:
            kind = "other"
        norm = post_norm = None
        if linears:
            first, last = self.nodes[linears[0].node], self.nodes[linears[-1].node]
            norm = self.norm_in([n for n in members if n.name in self.ancestors(first)])
            post_norm = self.norm_in([n for n in members if self.order[n.name] > self.order[last.name]])
        attention = self.attention_layout(members, linears) if kind == "attention" else None
        mlp = self.mlp_layout(members, linears) if kind == "mlp" else None
        return Branch(
            kind=kind,
            stream_in=stream_in.name,
            output=output.name,
            add=add.name,
            nodes=tuple(names),
            norm=norm,
            post_norm=post_norm,
            linears=tuple(linears),
            attention=attention,
            mlp=mlp,
            parameters=self.count_parameters(members),
            module=common_module(members),
        )

    def as_linear(self, node: Node) -> Linear | None:
        """A Linear if the node multiplies by a parameter matrix (linear or Conv1D addmm)."""
        op = packet(node)
        if op is aten.linear and node.args[1].op == "get_attr":
            weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
            out_features, in_features = get_tensor(self.gm, weight.target).shape
            transposed = False
        elif op is aten.addmm and node.args[2].op == "get_attr" and node.args[0].op == "get_attr":
            bias, weight = node.args[0], node.args[2]
            in_features, out_features = get_tensor(self.gm, weight.target).shape
            transposed = True
        else:
            return None
        return Linear(
            node=node.name,
            weight=weight.target,
            bias=bias.target if isinstance(bias, Node) else None,
            in_features=int(in_features),
            out_features=int(out_features),
            transposed=transposed,
        )

    def norm_in(self, region: list[Node]) -> Norm | None:
        """The normalisation among ``region``'s nodes: a fused norm op or an rsqrt pattern."""
        names = tuple(node.name for node in region)
        for node in region:
            kind = NORM_OPS.get(packet(node))
            if kind == "rms":
                return Norm("rms", attr_target(node.args[2]), None, node.args[3] if len(node.args) > 3 else None, names)
            if kind == "layer":
                weight, bias = (node.args + (None, None, None, None))[2:4]
                eps = node.args[4] if len(node.args) > 4 else 1e-5
                return Norm("layer", attr_target(weight), attr_target(bias), eps, names)
        rsqrt = [node for node in region if packet(node) is aten.rsqrt]
        if not rsqrt:
            return None
        ops = {packet(node) for node in region}
        kind = "layer" if aten.sub in ops else "rms"
        weight = bias = eps = None
        for node in region:
            params = [arg for arg in node.args if isinstance(arg, Node) and arg.op == "get_attr"]
            if params and packet(node) is aten.mul:
                weight = params[0].target
            elif params and packet(node) is aten.add:
                bias = params[0].target
        eps_add = rsqrt[0].args[0]
        if packet(eps_add) is aten.add and isinstance(eps_add.args[1], float):
            eps = eps_add.args[1]
        return Norm(kind, weight, bias, eps, names)

    def projection(self, node: Node, members: set[str], linears: dict[str, Linear]) -> Projection:
        """Which linear, and which of its output rows, a tensor in the branch was computed from.

        Walks back through head reshapes, RoPE and activations; a split or slice of a
        (batch, seq, features) tensor selects rows of a fused projection (GPT-2's c_attn,
        Phi-3's qkv_proj and gate_up_proj).
        """
        if node.name in linears:
            linear = linears[node.name]
            return Projection(linear, 0, linear.out_features)
        op = packet(node)
        if node.op == "call_function" and node.target is operator.getitem and packet(node.args[0]) in SPLIT_OPS:
            split, index = node.args
            base = self.projection(split.args[0], members, linears)
            sizes = split_sizes(split, base.features)
            start = base.start + sum(sizes[:index])
            return Projection(base.linear, start, start + sizes[index])
        if op is aten.slice and len(shape_of(node.args[0]) or ()) == 3 and node.args[1] in (2, -1):
            base = self.projection(node.args[0], members, linears)
            start = node.args[2] if len(node.args) > 2 else 0
            stop = min(node.args[3] if len(node.args) > 3 else base.features, base.features)
            return Projection(base.linear, base.start + start, base.start + stop)
        for arg in flat_nodes(node.args):
            if arg.name in members:
                return self.projection(arg, members, linears)
        raise FxflattenError(f"cannot trace {node.name} back to a projection in its branch")

    def attention_layout(self, members: list[Node], linears: list[Linear]) -> AttentionLayout | None:
        sdpa = [node for node in members if packet(node) in ATTENTION_OPS - {aten._softmax, aten.softmax}]
        if len(sdpa) != 1 or len(linears) < 2:
            return None  # manual softmax attention: a branch we can name but not take apart
        node = sdpa[0]
        names = {member.name for member in members}
        by_node = {linear.node: linear for linear in linears}
        q, k, v = (self.projection(arg, names, by_node) for arg in node.args[:3])
        _, num_heads, _, head_dim = shape_of(node.args[0])
        return AttentionLayout(
            q=q,
            k=k,
            v=v,
            o=linears[-1],
            num_heads=int(num_heads),
            num_kv_heads=k.features // int(head_dim),
            head_dim=int(head_dim),
        )

    def mlp_layout(self, members: list[Node], linears: list[Linear]) -> MlpLayout:
        names = {member.name for member in members}
        by_node = {linear.node: linear for linear in linears}
        down = linears[-1]
        hidden = unviewed(linear_input(self.nodes[down.node], down))
        activation = next(
            (name for node in members if (name := ACTIVATION_OPS.get(packet(node))) is not None), "custom"
        )
        if packet(hidden) is aten.mul:
            sides = [arg for arg in hidden.args[:2] if isinstance(arg, Node) and arg.name in names]
            if len(sides) == 2:
                first, second = (self.projection(side, names, by_node) for side in sides)
                if first != second:
                    gate_first = self.has_activation(sides[0], first.linear.node)
                    gate, up = (first, second) if gate_first else (second, first)
                    return MlpLayout(up=up, gate=gate, down=down, width=down.in_features, activation=activation)
        up = self.projection(hidden, names, by_node)
        return MlpLayout(up=up, gate=None, down=down, width=down.in_features, activation=activation)

    def has_activation(self, node: Node, stop: str) -> bool:
        """Whether an activation op lies on the path from ``stop`` to ``node``."""
        path = (self.ancestors(node) | {node.name}) - self.ancestors(self.nodes[stop])
        return any(packet(self.nodes[name]) in ACTIVATION_OPS for name in path)

    def count_parameters(self, members: Iterable[Node]) -> int:
        seen = {}
        for node in members:
            for arg in node.all_input_nodes:
                if arg.op == "get_attr":
                    tensor = get_tensor(self.gm, arg.target)
                    if isinstance(tensor, torch.nn.Parameter):
                        seen[arg.target] = tensor.numel()
        return sum(seen.values())

    def run(self) -> BlockMap:
        self.residual_adds_cache = self.residual_adds()
        stream = self.stream()
        values = self.stream_values(stream)
        branches = [self.branch(name, values) for name in stream]
        blocks = []
        stages = parallel_stages(branches)
        index = 0
        while index < len(stages):
            attention, mlp = stages[index], stages[index + 1] if index + 1 < len(stages) else ()
            if all(b.kind == "attention" for b in attention) and mlp and all(b.kind == "mlp" for b in mlp):
                module = common_prefix([branch.module for branch in attention + mlp])
                blocks.append(Block(len(blocks), attention, mlp, module))
                index += 2
            else:
                kinds = "+".join(branch.kind for branch in attention)
                log.warning("branch at %s (%s) is not part of an attention+MLP block", attention[0].add, kinds)
                index += 1
        if not blocks:
            kinds = ", ".join(branch.kind for branch in branches)
            raise FxflattenError(f"no attention + MLP blocks found on the residual stream (branches: {kinds})")
        hidden_size = shape_of(self.nodes[stream[0]])[-1]
        total = sum(p.numel() for p in self.gm.parameters())
        return BlockMap(stream=tuple(stream), blocks=tuple(blocks), hidden_size=int(hidden_size), total_parameters=total)


def parallel_stages(branches: list[Branch]) -> list[tuple[Branch, ...]]:
    """Consecutive branches that read the same stream value run in parallel: one stage."""
    stages: list[list[Branch]] = []
    for branch in branches:
        if stages and stages[-1][0].stream_in == branch.stream_in:
            stages[-1].append(branch)
        else:
            stages.append([branch])
    return [tuple(stage) for stage in stages]


def discover_blocks(gm: GraphModule) -> BlockMap:
    """Find the residual stream, its branches and its blocks in a captured graph."""
    block_map = Discovery(gm).run()
    log.info("found %d blocks on a stream of %d adds", len(block_map.blocks), len(block_map.stream))
    return block_map


def block_boundaries(gm: GraphModule, block_map: BlockMap) -> list[str]:
    """Names of the stream values between blocks: entering block 0, then leaving each block."""
    nodes = {node.name: node for node in gm.graph.nodes}
    entry = resolve_identity(nodes[block_map.blocks[0].attention[0].stream_in]).name
    return [entry] + [block.mlp[-1].add for block in block_map.blocks]


def split_sizes(split: Node, total: int) -> list[int]:
    op = packet(split)
    if op is aten.split_with_sizes:
        return list(split.args[1])
    if op is aten.chunk:
        chunks = split.args[1]
        size = -(-total // chunks)
        return [min(size, total - i * size) for i in range(chunks)]
    size = split.args[1]
    return [min(size, total - start) for start in range(0, total, size)]


def common_module(members: Iterable[Node]) -> str | None:
    paths = []
    for node in members:
        stack = node.meta.get("nn_module_stack")
        if stack:
            paths.append(list(stack.values())[-1][0])
    path = common_prefix(paths)
    return path.removeprefix(PARAM_PREFIX) if path else None


def common_prefix(paths: list[str | None]) -> str | None:
    """The longest dotted module path that every path starts with."""
    parts = [path.split(".") for path in paths if path]
    if not parts:
        return None
    prefix = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        prefix.append(pieces[0])
    return ".".join(prefix) or None
