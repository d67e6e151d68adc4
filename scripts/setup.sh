#!/usr/bin/env bash
# Create .venv (if missing) and install the project's requirements into it.
#   bash scripts/setup.sh          runtime requirements (train, QAT, export, OpenVINO/ONNX Runtime deploy)
#   bash scripts/setup.sh --test   also the test-only packages (pytest, the upstream peer `yolo9`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
  # upstream YOLOv9 repackaged (test-only peer); its declared dependencies are heavy and unneeded
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps yolo9==1.0.18
fi
