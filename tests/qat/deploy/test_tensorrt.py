"""qat.deploy.tensorrt (the engine match with ONNX Runtime is tests/qat/test_deploy.py): what runs without TensorRT (reuse key, options, one-line skip) on the CPU, and
the engine builds, which skip cleanly without `tensorrt` and a GPU (never run here: untested)."""
import os

import pytest

from qat.compat import UserError
from qat.deploy.tensorrt import (build_engine, build_options, build_record_path, engine_key, reusable,
                                 strongly_typed, tensorrt_available)
from tests.qat import qat_testkit as tk


def test_strong_typing_by_version():
    assert not strongly_typed("10.13.3.9") and strongly_typed("11.4.0")


def test_options_follow_the_file(tmp_path):
    qdq, fp32 = build_options(tk.onnx_path("qat"), "10.13"), build_options(tk.onnx_path("fp32"), "11.4")
    assert qdq["int8"] and qdq["batch"] is None and not qdq["strongly_typed"] and qdq["qdq_scales"] is None
    assert not fp32["int8"] and fp32["strongly_typed"] and fp32["qdq_scales"] == "fp32"
    assert qdq["imgsz"] == [tk.IMGSZ, tk.IMGSZ]


def test_reuse_key_is_the_onnx_bytes_and_options_not_file_time(tmp_path):
    onnx_path = tk.onnx_path("qat", tmp_path)
    opts = build_options(onnx_path, "10.13", "NVIDIA H200")
    key = engine_key(onnx_path, opts)
    os.utime(onnx_path, (1, 1))  # a new file time alone changes nothing
    assert engine_key(onnx_path, opts) == key
    assert engine_key(onnx_path, {**opts, "trt": "11.4"}) != key  # another TensorRT
    assert engine_key(onnx_path, {**opts, "gpu": "Orin"}) != key  # another GPU
    engine = tmp_path / "qat.engine"
    engine.write_bytes(b"plan")
    build_record_path(engine).write_text(f'{{"key": "{key}"}}')
    assert reusable(engine, key)
    data = bytearray(onnx_path.read_bytes())
    data[-1] ^= 1  # one byte of the ONNX changed: rebuild
    onnx_path.write_bytes(bytes(data))
    assert not reusable(engine, engine_key(onnx_path, opts))
    build_record_path(engine).write_text("not json")
    assert not reusable(engine, key)


@pytest.mark.skipif(tensorrt_available()[0], reason="TensorRT and a GPU are here")
def test_without_tensorrt_one_line_error(tmp_path):
    with pytest.raises(UserError, match="backend 'tensorrt' is not available here") as e:
        build_engine(tk.onnx_path("qat"))
    assert "\n" not in str(e.value)


# ---- GPU + TensorRT only (skipped here; written against the TensorRT 10/11 Python API) -------------
needs_trt = pytest.mark.skipif(not tensorrt_available()[0], reason=tensorrt_available()[1] or "")


@needs_trt
def test_int8_engine_report_and_reuse(tmp_path):
    from qat.deploy.engine_report import read_report

    onnx_path = tk.onnx_path("qat", tmp_path)
    engine = build_engine(onnx_path)
    report = read_report(engine)
    assert report["int8_layers"] > 0 and report["engine_mb"] > 0
    mtime = engine.stat().st_mtime_ns
    assert build_engine(onnx_path) == engine and engine.stat().st_mtime_ns == mtime  # reused
    build_engine(onnx_path, max_batch=4)  # other options (static file: same) -> same key
    assert engine.stat().st_mtime_ns == mtime


@needs_trt
def test_fp16_baseline_has_no_int8_layers(tmp_path):
    from qat.deploy.engine_report import read_report

    onnx_path = tk.onnx_path("fp32", tmp_path)
    report = read_report(build_engine(onnx_path))
    assert report["int8_layers"] == 0 and report["fp16_layers"] > report["fp32_layers"]


def test_engine_writer_copies_nothing_without_an_engine(tmp_path):
    from qat.deploy.files import write_engine

    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are here")
    assert write_engine(tk.onnx_path("qat", tmp_path)).startswith("skipped: ")
    assert not list(tmp_path.glob("*.engine"))
