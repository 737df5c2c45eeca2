"""The ``fxflatten`` command: a thin front end over the public Python API.

User mistakes (:class:`FxflattenError`) print one line and exit with status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from fxflatten.errors import FxflattenError
from fxflatten.report import block_rows, format_table

log = logging.getLogger("fxflatten")


def cmd_inspect(args: argparse.Namespace) -> None:
    from fxflatten.capture import capture
    from fxflatten.graph import discover_blocks
    from fxflatten.load import load_model

    model, _ = load_model(args.model)
    block_map = discover_blocks(capture(model))
    rows = block_rows(block_map)
    summary = {
        "model": str(args.model),
        "num_blocks": len(block_map.blocks),
        "hidden_size": block_map.hidden_size,
        "block_parameters": block_map.block_parameters,
        "total_parameters": block_map.total_parameters,
        "blocks": rows,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    columns = ["block", "module", "parallel", "heads", "kv_heads", "head_dim", "mlp_width", "activation", "norm", "parameters", "fusable"]
    print(format_table(columns, [[row[c] for c in columns] for row in rows]))
    print(
        f"{len(block_map.blocks)} blocks, hidden size {block_map.hidden_size}, "
        f"{block_map.block_parameters:,} parameters in blocks of {block_map.total_parameters:,} in all"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxflatten", description="Depth compression of pre-norm transformers (FlattenGPT) as torch.fx graph passes.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="capture a model and show the blocks found in its graph")
    inspect.add_argument("model", nargs="?", default="default", help="HF model directory, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    inspect.add_argument("--json", action="store_true", help="print the block table as JSON")
    inspect.set_defaults(run=cmd_inspect)
    return parser


def quiet_libraries() -> None:
    """Keep transformers' warnings and weight-loading bars out of the user's terminal."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        quiet_libraries()
    try:
        args.run(args)
    except FxflattenError as error:
        if args.debug:
            raise
        print(f"fxflatten: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
