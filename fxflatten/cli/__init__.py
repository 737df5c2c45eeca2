"""The ``fxflatten`` command: a thin front end over the public Python API."""

from fxflatten.cli.main import main

__all__ = ["main"]
