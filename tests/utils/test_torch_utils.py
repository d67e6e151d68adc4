"""utils.torch_utils.save_atomic on a full disk: one-line UserError, the old file untouched, no
temporary file left, and a completed save gets the usual file mode (not mkstemp's 0600)."""
import os
import stat

import pytest
import torch

from utils.general import UserError
from utils.torch_utils import save_atomic


def test_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, fill_disk, monkeypatch):
    f = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, f)
    fill_disk()
    with pytest.raises(UserError, match=r"cannot write .*last.pt: .*disk full.*the old last.pt is unchanged") as e:
        save_atomic({"epoch": 2, "w": torch.zeros(100_000)}, f)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert torch.load(f, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_saved_file_has_the_usual_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        f = save_atomic({"a": 1}, tmp_path / "x.pt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644


def test_save_tables_writes_both_and_a_failed_write_keeps_the_old_file(tmp_path, fill_disk):
    import json

    from utils.torch_utils import save_tables

    stem = tmp_path / "accuracy-demo"
    save_tables(stem, "| a |\n", {"map": 0.5})
    assert (tmp_path / "accuracy-demo.md").read_text() == "| a |\n"
    assert json.loads((tmp_path / "accuracy-demo.json").read_text()) == {"map": 0.5}
    fill_disk("accuracy-demo.json")
    with pytest.raises(UserError, match="disk full"):
        save_tables(stem, "| b |\n", {"map": 0.6})
    assert json.loads((tmp_path / "accuracy-demo.json").read_text()) == {"map": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy-demo.json", "accuracy-demo.md"]
