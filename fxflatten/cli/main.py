"""The ``fxflatten`` entry point: parse, run one command, turn user errors into one line.

User mistakes (:class:`FxflattenError`) print one line and exit with status 2; ``--debug`` shows
the traceback instead. Ctrl-C prints one line and exits with status 130; outputs are written
atomically, so an interrupted run leaves the old output or none.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence

from fxflatten.cli.parser import build_parser
from fxflatten.errors import FxflattenError


def quiet_libraries() -> None:
    """Keep transformers' warnings and weight-loading bars out of the user's terminal."""
    # The ONNX exporter logs every optional op set it skips and every rewrite it applies;
    # lm-eval warns about every task option it fills in by default; torchao (imported by
    # transformers when installed) warns about its CUDA kernels on a CPU machine and about
    # deprecated pytree registrations. Set before transformers is imported.
    for name in ("torch.onnx", "onnxscript", "onnx_ir", "lm_eval", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for a user error, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        quiet_libraries()
    try:
        from fxflatten.cli import commands

        getattr(commands, args.run)(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("fxflatten: interrupted; no partial output was left (an existing one is unchanged)", file=sys.stderr)
        return 130
    except Exception as error:
        cause = user_error(error)
        if cause is None or args.debug:
            raise
        print(f"fxflatten: error: {cause}", file=sys.stderr)
        return 2
    return 0


def user_error(error: BaseException) -> FxflattenError | None:
    """The :class:`FxflattenError` behind ``error``, if any.

    Libraries that run our code re-raise its errors wrapped in their own (torch's PassManager
    raises ``Exception(...) from error``); following the explicit ``from`` chain still finds the
    user's mistake, so it gets its one line instead of a traceback.
    """
    while error is not None:
        if isinstance(error, FxflattenError):
            return error
        error = error.__cause__
    return None
