"""qat/speed.py: a QAT iteration timed against an FP32 training iteration, the steps taking turns."""
import json

from qat.speed import main


def test_speed_command_writes_every_step_and_its_ratio(tmp_path, capsys):
    out = tmp_path / "speed.json"
    main(["--cfg", "models/detect/gelan-t.yaml", "--nc", "1", "--imgsz", "64", "--batch-size", "2",
          "--iters", "2", "--warmup", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    for kind in ("distill", "distill_fixed", "det"):
        assert r[f"qat_{kind}"] > 0 and abs(r[f"qat_{kind}_vs_fp32"] - r[f"qat_{kind}"] / r["fp32"]) < 1e-12
    assert r["fp32"] > 0 and r["machine"]["torch_threads"] >= 1 and len(r["date"]) == 10
    assert "| QAT, distillation (default) |" in capsys.readouterr().out
