"""qat.deploy.files: trtexec / DeepStream / Triton files for real exports of the tiny test model
(static batch 2, dynamic batch, end2end), checked against the names and shapes ONNX Runtime sees."""
import configparser
import subprocess
import warnings

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from qat.compat import UserError
from qat.deploy.files import (deepstream_config, trtexec_script, write_deploy_files, write_triton)
from tests.qat import qat_testkit as tk

ANCHORS = sum((tk.IMGSZ // s) ** 2 for s in (8, 16, 32))


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory):
    from qat.export import export_qat_onnx

    path = tmp_path_factory.mktemp("dyn") / "qat_dyn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_qat_onnx(tk.qat_model(), path, tk.IMGSZ, batch_size=1, dynamic=True)


def _ort_shapes(path, batch):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = tk.images(batch).numpy()
    return {o.name: list(y.shape) for o, y in zip(s.get_outputs(), s.run(None, {"images": x}))}


# --- Triton: config.pbtxt parsed by protobuf's text format into a ModelConfig built here ----------
def _triton_model_config():
    """The part of Triton's model_config.proto (inference.ModelConfig) these files use, built as a
    descriptor (the real proto is not installed): field names, types and enum values as in
    triton-inference-server/common protobuf/model_config.proto. text_format.Parse rejects any field
    or enum value not declared here, so a misspelt key or a wrong type fails the test."""
    f = descriptor_pb2.FileDescriptorProto(name="model_config_subset.proto", package="inference", syntax="proto3")
    dt = f.enum_type.add(name="DataType")
    for i, n in enumerate(["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
                           "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32",
                           "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]):
        dt.value.add(name=n, number=i)
    T = descriptor_pb2.FieldDescriptorProto
    rep, opt = T.LABEL_REPEATED, T.LABEL_OPTIONAL

    def msg(name, fields):
        m = f.message_type.add(name=name)
        for num, (fname, ftype, label, tname) in enumerate(fields, 1):
            fd = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                fd.type_name = tname
        return m

    msg("ModelInput", [("name", T.TYPE_STRING, opt, None), ("data_type", T.TYPE_ENUM, opt, ".inference.DataType"),
                       ("dims", T.TYPE_INT64, rep, None)])
    msg("ModelOutput", [("name", T.TYPE_STRING, opt, None), ("data_type", T.TYPE_ENUM, opt, ".inference.DataType"),
                        ("dims", T.TYPE_INT64, rep, None)])
    msg("ModelDynamicBatching", [("preferred_batch_size", T.TYPE_INT32, rep, None),
                                 ("max_queue_delay_microseconds", T.TYPE_UINT64, opt, None)])
    g = msg("ModelInstanceGroup", [("name", T.TYPE_STRING, opt, None), ("count", T.TYPE_INT32, opt, None),
                                   ("kind", T.TYPE_ENUM, opt, ".inference.ModelInstanceGroup.Kind")])
    kind = g.enum_type.add(name="Kind")
    for i, n in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=n, number=i)
    msg("ModelConfig", [("name", T.TYPE_STRING, opt, None), ("platform", T.TYPE_STRING, opt, None),
                        ("backend", T.TYPE_STRING, opt, None), ("max_batch_size", T.TYPE_INT32, opt, None),
                        ("input", T.TYPE_MESSAGE, rep, ".inference.ModelInput"),
                        ("output", T.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
                        ("dynamic_batching", T.TYPE_MESSAGE, opt, ".inference.ModelDynamicBatching"),
                        ("instance_group", T.TYPE_MESSAGE, rep, ".inference.ModelInstanceGroup")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def _parse_pbtxt(path):
    cfg = _triton_model_config()()
    text_format.Parse(path.read_text(), cfg)
    return cfg


def _copy(kind, tmp_path):
    return tk.onnx_path(kind, tmp_path)


def test_triton_static_export(tmp_path):
    onnx_path = _copy("qat", tmp_path)  # static batch 2
    cfg = _parse_pbtxt(write_triton(onnx_path))
    assert cfg.name == "qat" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 0
    assert not cfg.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("images", [2, 3, tk.IMGSZ, tk.IMGSZ])]
    ort = _ort_shapes(onnx_path, 2)
    assert {o.name: list(o.dims) for o in cfg.output} == ort == {"output0": [2, 4 + tk.NC, ANCHORS]}
    assert cfg.output[0].data_type == 11  # TYPE_FP32
    model = tmp_path / "qat.triton" / "qat" / "1" / "model.onnx"
    assert model.read_bytes() == onnx_path.read_bytes()


def test_triton_dynamic_export(dynamic_onnx):
    cfg = _parse_pbtxt(write_triton(dynamic_onnx, max_batch=16))
    assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("images", [3, tk.IMGSZ, tk.IMGSZ])]
    for b in (1, 3):
        assert {o.name: [b] + list(o.dims) for o in cfg.output} == _ort_shapes(dynamic_onnx, b)


def test_triton_end2end_tensorrt_outputs(tmp_path):
    cfg = _parse_pbtxt(write_triton(_copy("e2e_trt", tmp_path)))
    assert [(o.name, list(o.dims), o.data_type) for o in cfg.output] == [
        ("num_dets", [1, 1], 8), ("det_boxes", [1, 50, 4], 11), ("det_scores", [1, 50], 11),
        ("det_classes", [1, 50], 8)]


def _deepstream(text):
    p = configparser.ConfigParser()
    p.read_string(text)
    return p


def test_deepstream_static_and_dynamic(tmp_path, dynamic_onnx):
    static = _copy("qat", tmp_path)
    for path, batch in ((static, 2), (dynamic_onnx, 8)):
        cfg = _deepstream(deepstream_config(path))
        prop = cfg["property"]
        assert prop["network-mode"] == "1" and "int8-calib-file" not in prop
        assert prop["onnx-file"] == f"../{path.name}" and prop["batch-size"] == str(batch)
        assert prop["infer-dims"] == f"3;{tk.IMGSZ};{tk.IMGSZ}" and prop["output-blob-names"] == "output0"
        assert prop["num-detected-classes"] == str(tk.NC) and prop["cluster-mode"] == "2"
        assert f"output0 (B, 4+nc={4 + tk.NC}, anchors={ANCHORS})" in deepstream_config(path)
    with pytest.raises(UserError, match="static batch of 2"):
        deepstream_config(static, batch=4)
    out = write_deploy_files(static, ["deepstream"])["deepstream"]
    assert (out.parent / "labels.txt").read_text().split() == tk.NAMES


def test_deepstream_end2end(tmp_path):
    prop = _deepstream(deepstream_config(_copy("e2e_trt", tmp_path)))["property"]
    assert prop["output-blob-names"] == "num_dets;det_boxes;det_scores;det_classes"
    assert prop["cluster-mode"] == "4" and prop["parse-bbox-func-name"] == "NvDsInferParseCustomEfficientNMS"
    assert prop["network-mode"] == "2"  # that export is the float model
    with pytest.raises(UserError, match="NonMaxSuppression"):
        deepstream_config(_copy("e2e_onnx", tmp_path))


def test_trtexec_commands(tmp_path, dynamic_onnx):
    static = trtexec_script(_copy("qat", tmp_path))
    assert "Shapes" not in static and "--int8 --fp16" in static
    dyn = trtexec_script(dynamic_onnx)
    s = tk.IMGSZ
    assert f"--minShapes=images:1x3x{s}x{s} --optShapes=images:8x3x{s}x{s} --maxShapes=images:32x3x{s}x{s}" in dyn
    trt11, trt10 = dyn.split('-ge 11 ]; then')[1].split("\nelse\n")
    cmd11, cmd10 = trt11[trt11.index("trtexec --onnx"):], trt10[trt10.index("trtexec --onnx"):]
    assert cmd11.startswith("trtexec --onnx=qat_dyn.fp16.onnx") and "--int8" not in cmd11 and "--fp16" not in cmd11
    assert "modelopt.onnx.autocast" in trt11 and "--op_types_to_exclude QuantizeLinear DequantizeLinear" in trt11
    assert cmd10.startswith("trtexec --onnx=qat_dyn.onnx") and "--int8 --fp16" in cmd10
    fp32 = trtexec_script(_copy("fp32", tmp_path))
    assert "--int8" not in fp32 and "--fp16 \\" in fp32 and "--op_types_to_exclude" not in fp32
    path = write_deploy_files(dynamic_onnx, ["trtexec"])["trtexec"]
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_engine_is_skipped_in_one_line_without_tensorrt(tmp_path):
    out = write_deploy_files(_copy("qat", tmp_path), ["engine", "triton"])
    assert isinstance(out["engine"], str) and out["engine"].startswith("skipped: ") and "\n" not in out["engine"]
    assert (tmp_path / "qat.triton" / "qat" / "1" / "model.onnx").is_file()
    with pytest.raises(UserError, match="unknown"):
        write_deploy_files(tmp_path / "qat.onnx", ["tflite"])


def test_export_qat_include_writes_the_deployment_files(tmp_path):
    import export_qat
    from qat.checkpoint import save_qat

    save_qat(tmp_path / "qat_best.pt", tk.qat_model())
    r = export_qat.run(weights=tmp_path / "qat_best.pt", imgsz=[tk.IMGSZ], dynamic=True, max_batch=8,
                       include=["onnx", "engine", "trtexec", "deepstream", "triton"])
    assert set(r["deploy"]) == {"engine", "trtexec", "deepstream", "triton"}
    assert r["deploy"]["engine"].startswith("skipped: ")  # no TensorRT / GPU here
    assert "--maxShapes=images:8x3x" in (tmp_path / "qat_best.trtexec.sh").read_text()
    assert _parse_pbtxt(tmp_path / "qat_best.triton" / "qat_best" / "config.pbtxt").max_batch_size == 8
    assert (tmp_path / "qat_best.deepstream" / "config_infer_primary.txt").is_file()
