#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU and TensorRT 10 or 11: FP16 and INT8 engines of the demo
# model, both engine reports, mAP50-95 and images/s at batch 1 and 8, written to one results file.
#
#   bash scripts/gpu_check.sh                       # -> runs/gpu_check/results.md and results.json
#   RESIDUAL_QUANT=shortcut bash scripts/gpu_check.sh   # the other residual-Add placement (issue 13)
#
# Steps: post-training quantization of weights/demo-gelan.pt (train_qat.py --epochs 0) -> Q/DQ ONNX
# (export_qat.py --dynamic, with the trtexec/DeepStream/Triton files); export.py's FP32 ONNX
# (--dynamic) -> the FP16 baseline; both engines built by qat.deploy.tensorrt (TensorRT 11: AutoCast
# + strongly typed; 10: builder flags), then val_trt.py --engine at batch 1 and 8 (demo val set, 320 px).
# Never run by the project's CI or on the CPU machines; needs `pip install tensorrt` (or JetPack).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"; [ -x "$PY" ] || PY=python3
OUT="${OUT:-runs/gpu_check}"
IMGSZ="${IMGSZ:-320}"
RESIDUAL_QUANT="${RESIDUAL_QUANT:-both}"
DATA="${DATA:-data/demo.yaml}"
mkdir -p "$OUT"
"$PY" -c "from qat.deploy import tensorrt_available as t; ok, why = t(); assert ok, why" \
  || { echo "error: gpu_check needs TensorRT and an NVIDIA GPU" >&2; exit 2; }

# 1. INT8: PTQ of the demo checkpoint -> Q/DQ ONNX (dynamic batch) + deployment files
"$PY" train_qat.py --weights weights/demo-gelan.pt --data "$DATA" --imgsz "$IMGSZ" --epochs 0 --device 0 \
  --residual-quant "$RESIDUAL_QUANT" --project "$OUT" --name "ptq-$RESIDUAL_QUANT" --exist-ok
QAT="$OUT/ptq-$RESIDUAL_QUANT/weights/qat_best.pt"
"$PY" export_qat.py --weights "$QAT" --imgsz "$IMGSZ" --dynamic --include onnx engine trtexec deepstream triton
# 2. FP16 baseline from export.py's FP32 ONNX
cp weights/demo-gelan.pt "$OUT/fp32.pt"
"$PY" export.py --weights "$OUT/fp32.pt" --imgsz "$IMGSZ" --dynamic
"$PY" - "$OUT/fp32.onnx" "$IMGSZ" <<'PYEOF'
import sys
from qat.deploy.tensorrt import build_engine
build_engine(sys.argv[1], imgsz=int(sys.argv[2]))
PYEOF
# 3. mAP and images/s at batch 1 and 8 (engines reused by their build key)
INT8_ENGINE="${QAT%.pt}.engine"
for kind in fp16 int8; do
  engine="$OUT/fp32.engine"; [ "$kind" = int8 ] && engine="$INT8_ENGINE"
  for b in 1 8; do
    "$PY" val_trt.py --engine "$engine" --data "$DATA" --imgsz "$IMGSZ" --batch-size "$b" --backend tensorrt \
      --device 0 --no-reference --project "$OUT" --name "val-$kind-b$b" --exist-ok
  done
done
# 4. one results file: both engine reports + the four runs
"$PY" - "$OUT" "$OUT/fp32.engine" "$INT8_ENGINE" "$RESIDUAL_QUANT" <<'PYEOF'
import json, sys
from pathlib import Path
import tensorrt, torch
from qat.deploy.engine_report import format_summary, read_report
out, fp16, int8, residual = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
res = {"tensorrt": tensorrt.__version__, "gpu": torch.cuda.get_device_name(0), "residual_quant": residual,
       "reports": {}, "runs": []}
lines = [f"# gpu_check: TensorRT {res['tensorrt']}, {res['gpu']}, residual-quant {residual}", ""]
for kind, engine in (("fp16", fp16), ("int8", int8)):
    r = read_report(engine)
    res["reports"][kind] = {k: v for k, v in r.items() if k != "per_layer"}
    lines.append(format_summary(r, f"{kind} {engine.name}"))
lines += ["", "| engine | batch | mAP50-95 | mAP50 | ms per call | images/s |", "|---|---|---|---|---|---|"]
for kind in ("fp16", "int8"):
    for b in (1, 8):
        row = json.loads((out / f"val-{kind}-b{b}" / "results.json").read_text())["rows"][-1]
        ips = b * 1000 / row["ms_per_call"] if row.get("ms_per_call") else float("nan")
        res["runs"].append({"engine": kind, "batch": b, "mAP50-95": row["mAP50-95"], "mAP50": row["mAP50"],
                            "ms_per_call": row["ms_per_call"], "images_per_s": ips})
        lines.append(f"| {kind} | {b} | {row['mAP50-95']:.4f} | {row['mAP50']:.4f} | {row['ms_per_call']:.2f} | {ips:.0f} |")
(out / "results.json").write_text(json.dumps(res, indent=1))
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"written: {out / 'results.md'}, {out / 'results.json'}; per-layer tables: *.report.md beside the engines")
PYEOF
