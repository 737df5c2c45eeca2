"""cli/output.py: an output directory appears whole, with ordinary permissions, or not at all."""

import os

import pytest

from fxflatten.cli.output import atomic_dir, write_report
from tests.checkpoints import old_output, partial_dirs, snapshot


def test_an_interrupted_save_keeps_the_old_output_and_leaves_no_temporary_directory(tmp_path):
    out = tmp_path / "out"
    before = old_output(out)
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, force=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"half of the new")
        raise KeyboardInterrupt
    assert snapshot(out) == before
    assert partial_dirs(tmp_path, "out") == []


def test_output_directory_gets_the_permissions_of_an_ordinary_directory(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    with atomic_dir(tmp_path / "out") as tmp:
        write_report(tmp, {})
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
