"""Track a branch's channel axis through the graph and rescale the shape constants on it.

Widening (fusing G branches) and pruning change how many heads or MLP channels a branch has.
The weights are easy; the hard part is every constant the graph carries for those sizes: head
counts in GQA ``expand``/``reshape``, the split sizes of a fused qkv projection, the slice bounds
of Phi-3's ``qkv_proj``, the flattened width in GPT-2's Conv1D ``view``. Which constant is which
cannot be read off its value (with 2 KV heads repeated twice, ``expand(b, 2, 2, s, d)`` has two
2s), so we follow the *axis*: the output feature axis of the branch's input projections is the
channel axis, and it is tracked node by node (views split and merge it, transposes move it,
broadcasting aligns it) until the output projection consumes it. Every constant that sizes or
indexes a channel axis is then multiplied by the same ratio, which is exact because fusing and
pruning keep the head layout (query heads per KV head, head dim) and only change the count.
"""

from __future__ import annotations

import operator
from fractions import Fraction

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp

from fxflatten.errors import FxflattenError
from fxflatten.graph.capture import graph_example_inputs
from fxflatten.graph.fx import VIEW_OPS

aten = torch.ops.aten
PASS_THROUGH = {aten.slice, aten.split, aten.split_with_sizes, aten.chunk, aten.narrow, aten.contiguous, aten.clone,
                aten.alias, aten.to, aten._to_copy, aten.dropout, aten.expand}


def concrete_shapes(gm: GraphModule) -> dict[str, tuple[int, ...]]:
    """Every tensor node's shape on a small odd-sized example (3 x 7 tokens)."""
    ShapeProp(gm).propagate(*graph_example_inputs(gm, batch=3, seq_len=7))
    shapes = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shapes[node.name] = tuple(int(size) for size in meta.shape)
    return shapes


def reshape_groups(source: tuple[int, ...], target: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of source axes with the runs of target axes they become (equal products)."""
    groups, i, j = [], 0, 0
    while i < len(source) and j < len(target):
        group_i, group_j = [i], [j]
        p, q = source[i], target[j]
        while p != q:
            if p < q and i + 1 < len(source):
                i += 1
                p *= source[i]
                group_i.append(i)
            elif j + 1 < len(target):
                j += 1
                q *= target[j]
                group_j.append(j)
            else:
                break
        groups.append((group_i, group_j))
        i, j = i + 1, j + 1
    return groups


def channel_axes(nodes: list[Node], sources: set[str], stops: set[str],
                 shapes: dict[str, tuple[int, ...]]) -> dict[str, set[int]]:
    """Channel axes of each node of a branch, from the source projections to the stops."""
    axes: dict[str, set[int]] = {name: {len(shapes[name]) - 1} for name in sources}
    for node in nodes:
        if node.name in axes or node.name in stops:
            continue
        found = node_axes(node, axes, shapes)
        if found:
            axes[node.name] = found
    return axes


def node_axes(node: Node, axes: dict[str, set[int]], shapes: dict[str, tuple[int, ...]]) -> set[int]:
    op = getattr(node.target, "overloadpacket", None)
    inputs = [arg for arg in node.all_input_nodes if arg.name in axes]
    if not inputs:
        return set()
    if node.target is operator.getitem:
        return set(axes[node.args[0].name])
    out = shapes.get(node.name, ())
    first = node.args[0] if isinstance(node.args[0], Node) else None
    if op in VIEW_OPS:
        found = set()
        for group_in, group_out in reshape_groups(shapes[first.name], out):
            if axes.get(first.name, set()) & set(group_in):
                found.add(group_out[0])  # features are laid out head-major: the head axis leads
        return found
    if op is aten.transpose:
        a, b = (d % len(out) for d in node.args[1:3])
        swap = {a: b, b: a}
        return {swap.get(axis, axis) for axis in axes[first.name]}
    if op is aten.permute:
        order = [d % len(out) for d in node.args[1]]
        return {order.index(axis) for axis in axes[first.name]}
    if op is aten.unsqueeze:
        dim = node.args[1] % len(out)
        return {axis + (axis >= dim) for axis in axes[first.name]}
    if op in PASS_THROUGH and first is not None and first.name in axes:
        shift = len(out) - len(shapes[first.name]) if node.name in shapes else 0  # split: a tuple
        return {axis + shift for axis in axes[first.name]}
    if op is aten.scaled_dot_product_attention:
        return set(axes.get(node.args[0].name, set()))
    # Elementwise ops and concatenation: broadcast (right-align) every input's channel axes.
    return {axis + len(out) - len(shapes[arg.name]) for arg in inputs for axis in axes[arg.name]}


def scale(value: int, ratio: Fraction, what: str) -> int:
    scaled = value * ratio
    if scaled.denominator != 1:
        raise FxflattenError(f"cannot rescale {what} = {value} by {ratio}: the new size is not a whole number")
    return int(scaled)


def rescale_constants(gm: GraphModule, nodes: list[Node], sources: set[str], stops: set[str], ratio: Fraction) -> int:
    """Multiply every shape constant on a channel axis of ``nodes`` by ``ratio``; returns how many.

    Call it while the weights still match the graph (shapes are measured by running it). ``-1`` and
    symbolic sizes are left alone, as are slice ends past the axis (``INT64_MAX``).
    """
    shapes = concrete_shapes(gm)
    axes = channel_axes(nodes, sources, stops, shapes)
    changed = 0
    for node in nodes:
        op = getattr(node.target, "overloadpacket", None)
        first = node.args[0] if node.args and isinstance(node.args[0], Node) else None
        if first is None or first.name not in axes:
            continue
        in_axes, in_shape = axes[first.name], shapes.get(first.name, ())
        args = list(node.args)
        if op in VIEW_OPS or op is aten.expand:
            sizes = list(args[1])
            for axis in axes.get(node.name, set()):
                if isinstance(sizes[axis], int) and sizes[axis] != -1:
                    sizes[axis] = scale(sizes[axis], ratio, f"{node.name} size")
            args[1] = sizes
        elif op is aten.split:
            dim = (args[2] if len(args) > 2 else 0) % len(in_shape)
            if dim in in_axes:
                args[1] = scale(args[1], ratio, f"{node.name} split size")
        elif op is aten.split_with_sizes:
            dim = (args[2] if len(args) > 2 else 0) % len(in_shape)
            if dim in in_axes:
                args[1] = [scale(size, ratio, f"{node.name} split size") for size in args[1]]
        elif op in (aten.slice, aten.narrow):
            dim = (args[1] if len(args) > 1 else 0) % len(in_shape)
            if dim in in_axes:
                for index in (2, 3):
                    if len(args) > index and isinstance(args[index], int) and abs(args[index]) <= in_shape[dim]:
                        args[index] = scale(args[index], ratio, f"{node.name} bound")
        else:
            continue
        if tuple(args) != node.args:
            node.args = tuple(args)
            changed += 1
    return changed
