"""benchmarks/bench_latency.py on the tiny test network: float rows under the runtime's default precision
and f32, both activation forms with the deployed one marked, the head-float (--no-last-layer) row, ratios
against the fastest float, the per-op profile, an IR folder as a row (the real numbers come from running
it on gelan-c / the demo model)."""
import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "qat"))
import qat_testkit as kit  # noqa: E402
from benchmarks import bench_latency as bench  # noqa: E402
from qat.deploy.openvino import choose_form, export_ir  # noqa: E402
from utils.general import UserError  # noqa: E402


def test_rows_ratios_profile_and_files(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(kit.tiny_cfg()))
    ir = export_ir(kit.onnx_path("qat", tmp_path), threads=1)["path"]
    r = bench.run(cfg=str(cfg), imgsz=64, batch_sizes=(1, 2), threads=1, iters=1, rounds=2, warmup=1, calib_images=2,
                  nncf=False, ir=str(ir), name="tiny", out=tmp_path / "results", float_layers=[[1]])
    chosen = choose_form()  # this machine (and ONEDNN_MAX_CPU_ISA, if set)
    floats = [k for k in r["batches"]["1"] if k.startswith("FP32 ONNX")]
    assert len(floats) == 2 and floats[1] == "FP32 ONNX, f32" and floats[0].startswith("FP32 ONNX, default (")
    assert r["deployed"] == f"QAT Q/DQ, {chosen.act_form} form (deployed)" and r["choice"]["act_form"] == chosen.act_form
    head_float = f"QAT Q/DQ, head float (--no-last-layer), {chosen.act_form} form"
    assert [k for k in r["batches"]["1"] if "form" in k] == [
        "QAT Q/DQ, int8 form" + (" (deployed)" if chosen.act_form == "int8" else ""),
        "QAT Q/DQ, uint8 form" + (" (deployed)" if chosen.act_form == "uint8" else ""), head_float,
        f"QAT Q/DQ, layers 1 float, {chosen.act_form} form"]
    # the head's (layer 1's) convolutions run in float there, every other one as deployed
    dep, hf = r["batches"]["1"][r["deployed"]], r["batches"]["1"][head_float]
    assert 0 < hf["int8_convs"] < dep["int8_convs"] and hf["convs"] == dep["convs"]
    partly = r["batches"]["1"][f"QAT Q/DQ, layers 1 float, {chosen.act_form} form"]
    assert partly["int8_convs"] == dep["int8_convs"] - 1 and partly["convs"] == dep["convs"]  # layer 1: one Conv
    ir_row = "IR qat_openvino_model"  # exported with a static batch of 2: no row at batch 1, timed at 2
    assert "error" in r["batches"]["1"].pop(ir_row) and r["batches"]["2"][ir_row]["int8_convs"] > 0
    for b, rows in r["batches"].items():
        best = r["fastest_float"][b]
        assert best in floats and rows[best]["vs_float"] == 1.0
        for k, row in rows.items():
            assert abs(row["vs_float"] - rows[best]["latency_ms"] / row["latency_ms"]) < 1e-9
            assert row["latency_ms"] >= rows[best]["latency_ms"] or k not in floats
            assert row["slower"] == (row["vs_float"] < 1) if k not in floats else "slower" not in row
        assert rows[r["deployed"]]["int8_convs"] == rows[r["deployed"]]["convs"] - 1 > 0
    assert r["machine"]["flags"] is not None and r["machine"]["isa"] == chosen.isa["isa"]
    assert set(r["profile"]) == {r["deployed"], floats[0]}
    assert all(p["ops"] and p["ops"][0]["ms"] >= p["ops"][-1]["ms"] for p in r["profile"].values())
    out = tmp_path / "results"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-profile.md", "tiny.json", "tiny.md", "tiny.png"]
    assert json.loads((out / "tiny.json").read_text())["headline"] == r["headline"]
    md = (out / "tiny.md").read_text()
    assert r["headline"] in md and "(fastest float)" in md
    dep = r["batches"]["1"][r["deployed"]]
    assert ("slower" in r["headline"]) == dep["slower"] and ("**slower**" in md) == any(
        row.get("slower") for rows in r["batches"].values() for row in rows.values())
    assert "| op | kernel | count | ms | share |" in (out / "tiny-profile.md").read_text()


def test_float_layers_outside_the_network_is_one_line(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(kit.tiny_cfg()))
    n = len(kit.tiny_cfg()["backbone"]) + len(kit.tiny_cfg()["head"])
    with pytest.raises(UserError, match=f"--float-layers {n}: the network has layers 0-{n - 1}"):
        bench.run(cfg=str(cfg), imgsz=64, batch_sizes=(1,), calib_images=1, nncf=False, float_layers=[[1], [0, n]],
                  out=tmp_path / "results")


def test_float_layer_sets_parse_from_the_command_line():
    assert bench.parse_opt(["--float-layers", "1,15,8", "22"]).float_layers == [[1, 15, 8], [22]]
    with pytest.raises(SystemExit):
        bench.parse_opt(["--float-layers", "1,x"])
