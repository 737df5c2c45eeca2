"""Write an output directory all at once, or not at all.

Everything goes into a temporary directory beside the target, which is renamed into place only
when complete (``report.json`` written last). An existing output is replaced only with
``force``; an interrupted run leaves the old output or nothing, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fxflatten.errors import FxflattenError


def check_output(path: Path, force: bool) -> None:
    """Fail early (before any work) if ``path`` exists and may not be replaced."""
    if path.exists() and not force:
        raise FxflattenError(f"{path} already exists; pass --force to replace it or choose another --out")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block finishes without error."""
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its mode 0700 would follow the directory into place and hide the output from
    # everyone else; mkdir honours the umask. The name says the directory is unfinished.
    # Created inside the try, so a Ctrl-C landing right after mkdir still removes it.
    tmp = path.parent / f".{path.name}.partial-{secrets.token_hex(6)}"
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_report(directory: Path, report: dict[str, Any]) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
