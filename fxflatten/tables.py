"""Rows and plain-text tables that describe a block map (and later, a compression run)."""

from __future__ import annotations

from typing import Any

from fxflatten.graph.capture import PARAM_PREFIX
from fxflatten.graph.layout import BlockMap


def model_name(target: str) -> str:
    """A graph parameter target as the model itself names it (without the capture prefix)."""
    return target.removeprefix(PARAM_PREFIX)


def block_rows(block_map: BlockMap) -> list[dict[str, Any]]:
    """One JSON-friendly row per block: shape, norm, parameters and the linears' names."""
    rows = []
    for block in block_map.blocks:
        attentions = [b.attention for b in block.attention if b.attention]
        mlps = [b.mlp for b in block.mlp if b.mlp]
        attention, mlp = (attentions or [None])[0], (mlps or [None])[0]
        linears = {}
        if attention:
            linears.update(q=attention.q.linear.weight, k=attention.k.linear.weight, v=attention.v.linear.weight, o=attention.o.weight)
        if mlp:
            linears.update(up=mlp.up.linear.weight, down=mlp.down.weight)
            if mlp.gate:
                linears["gate"] = mlp.gate.linear.weight
        rows.append(
            {
                "block": block.index,
                "module": block.module,
                "parallel": block.parallel,
                "heads": sum(a.num_heads for a in attentions) if attentions else None,
                "kv_heads": sum(a.num_kv_heads for a in attentions) if attentions else None,
                "head_dim": attention.head_dim if attention else None,
                "mlp_width": sum(m.width for m in mlps) if mlps else None,
                "activation": mlp.activation if mlp else None,
                "gated": bool(mlp and mlp.gate),
                "norm": block.norm_kind,
                "parameters": block.parameters,
                "fusable": block.fusable,
                "post_branch_norm": any(branch.post_norm for branch in block.branches),
                "linears": {role: model_name(name) for role, name in linears.items()},
            }
        )
    return rows


def format_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A fixed-width text table; numbers right-aligned, everything else left-aligned."""

    def text(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    cells = [[text(value) for value in row] for row in rows]
    widths = [max([len(column)] + [len(row[i]) for row in cells]) for i, column in enumerate(columns)]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(column.rjust(w) if num else column.ljust(w) for column, w, num in zip(columns, widths, numeric))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric)))
    return "\n".join(lines)
