"""atomic_path: all-or-nothing writes with the permissions a plain open() would give."""

import os
import stat

import pytest

from seglstm.utils.io import atomic_path, atomic_write_text


def test_failed_write_leaves_old_file_and_no_temporaries(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_written_file_follows_the_umask(tmp_path):
    # mkstemp creates 0600 files; the result must have what open() gives under this process's umask.
    umask = os.umask(0)
    os.umask(umask)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask
