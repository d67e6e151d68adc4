"""Fixtures shared by every test folder."""
import os
import tempfile

import pytest


@pytest.fixture
def fill_disk(monkeypatch):
    """Call it to make the disk full for every file made from then on through tempfile.mkstemp (the
    temporary file of utils.torch_utils.atomic_output), or with `name` only for the temporary file of
    that file name: its name leads to /dev/full, so every write fails with ENOSPC. A writer that
    bypasses atomic_output still succeeds: a test using this catches it."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux) to stand for a full disk")
    real_mkstemp = tempfile.mkstemp

    def full_disk_mkstemp(*a, only=None, **k):
        fd, name = real_mkstemp(*a, **k)
        if only is not None and not os.path.basename(name).startswith(f".{only}."):
            return fd, name
        os.close(fd)
        os.unlink(name)
        os.symlink("/dev/full", name)
        return os.open(name, os.O_WRONLY), name

    def fill(name=None):
        monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: full_disk_mkstemp(*a, only=name, **k))

    return fill
