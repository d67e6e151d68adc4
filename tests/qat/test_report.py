"""qat.report: the FP32 / PTQ / QAT table and the --calib-method auto table, written atomically (a
failed write leaves the previous report whole); qat.sensitivity's and qat.calibrate's reports likewise."""
import json

import pytest

from qat.calibrate import write_summary
from qat.compat import UserError
from qat.report import write_calibration_selection, write_report
from qat.sensitivity import write_sensitivity

FP32 = {"map": 0.5, "map50": 0.7, "mp": 0.6, "mr": 0.55}
PTQ = {"map": 0.45, "map50": 0.66, "mp": 0.58, "mr": 0.5}
CALIBRATION = [{"kind": "input", "name": "model.0.conv.input_quantizer", "members": ["model.0.conv"], "bits": 8,
                "enabled": True, "amax": 1.0},
               {"kind": "weight", "name": "model.0.conv.weight_quantizer", "members": ["model.0.conv"], "bits": 8,
                "enabled": True, "amax": 2.0, "amax_min": 0.1}]


def test_report_table_has_deltas_against_fp32(tmp_path):
    md = write_report({"FP32": FP32, "PTQ": PTQ}, tmp_path, note="qat_best.pt: the PTQ model")
    table = json.loads((tmp_path / "report.json").read_text())
    assert [r["model"] for r in table] == ["FP32", "PTQ"]
    assert table[1]["d_map"] == pytest.approx(-0.05) and table[0]["d_map"] == 0
    text = md.read_text()
    assert "| PTQ | 0.4500 | 0.6600 | 0.5800 | 0.5000 | -0.0500 |" in text and text.endswith("the PTQ model\n")


def _writers(tmp_path):
    best = {"candidate": "max", "map": 0.4, "map50": 0.6, "mp": 0.5, "mr": 0.5}
    ranked = [{"layer": 2, "type": "ELAN1", "points": 3, "map": 0.49, "map50": 0.6, "gain": 0.004}]
    return {"report": lambda: write_report({"FP32": FP32, "PTQ": PTQ}, tmp_path),
            "calibration_selection": lambda: write_calibration_selection([best], best, tmp_path),
            "sensitivity": lambda: write_sensitivity(tmp_path, 0.5, 0.48, ranked),
            "calibration": lambda: write_summary(CALIBRATION, tmp_path)}


@pytest.mark.parametrize("name, file", [(n, f"{n}.{ext}") for n in ("report", "calibration_selection", "sensitivity",
                                                                                "calibration")
                                        for ext in ("md", "json")])
def test_failed_write_keeps_the_previous_report(name, file, tmp_path, fill_disk, monkeypatch):
    write = _writers(tmp_path)[name]
    write()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {f"{name}.md", f"{name}.json"} <= set(before)
    fill_disk(file)
    with pytest.raises(UserError, match=f"{file}: .*disk full"):
        write()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
