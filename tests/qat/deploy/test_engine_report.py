"""qat.deploy.engine_report on IEngineInspector JSON in the documented layouts of TensorRT 10 and 11.

The fixtures are small hand-written engines (a quantize layer, INT8 convolutions and a MaxPool, an
INT8 -> FP16 reformat into an FP16 head convolution, an FP16 -> FP32 reformat into the DFL softmax,
an FP32 output concat). Their layout follows:
- TensorRT 10: the Engine Inspector section of the developer guide (10.16 "Engine Tools"), kDETAILED
  layer JSON: Name, LayerType, Inputs/Outputs with Name, Location, Dimensions, "Format/Datatype",
  ParameterType, Weights {Type, Count}, TacticName; top-level "Bindings" (a list of names).
- TensorRT 11: the migration page "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x":
  "Bindings" replaced by "I/O Tensors" (Name, IOMode, DataType, Dimensions, Location,
  IsShapeInferenceIO, ProfileInfo) and "Format/Datatype" split into "DataType" and "Format" (the
  Format strings in the fixture are modelled on the page's "Row major linear FP32 format (kLINEAR)").
Not checked against a real engine here (no GPU): scripts/gpu_check.sh prints reports of real ones.
"""
import json
from pathlib import Path

import pytest

from qat.compat import UserError
from qat.deploy.engine_report import (format_markdown, format_summary, main, parse_engine_info, read_report,
                                      tensor_precision, write_report)

FIXTURES = Path(__file__).parent / "fixtures"


def _info(version):
    return (FIXTURES / f"engine_info_trt{version}.json").read_text()


@pytest.mark.parametrize("version", ["10", "11"])
def test_counts_per_precision_and_reformats(version):
    r = parse_engine_info(_info(version), engine_bytes=3 * 2 ** 20)
    assert r["layout"] == version
    assert r["layers"] == 9
    assert (r["int8_layers"], r["fp16_layers"], r["fp32_layers"]) == (3, 1, 3)
    assert r["reformats"] == 2 and r["int8_float_reformats"] == 1
    assert r["engine_mb"] == 3.0
    by_name = {row["name"].split(" + ")[0]: row["precision"] for row in r["per_layer"]}
    assert by_name["/model.0/conv/Conv"] == "INT8"
    assert by_name["/model.12/cv2.0/cv2.0.0/conv/Conv"] == "FP16"
    assert by_name["/model.12/dfl/Softmax"] == "FP32"
    assert [io["name"] for io in r["io"]] == ["images", "output0"]


def test_trt11_io_tensors_and_datatype_field():
    r = parse_engine_info(_info("11"))
    assert r["io"][0] == {"name": "images", "mode": "Input", "dtype": "FP32", "shape": [1, 3, 64, 64]}
    # the split fields: DataType decides, whatever the Format sentence says
    assert tensor_precision({"DataType": "Int8", "Format": "Row major linear FP32 format (kLINEAR)"}) == "INT8"
    assert tensor_precision({"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}) == "FP16"
    assert tensor_precision({"Format/Datatype": "N/A due to dynamic shapes"}) == "unknown"


def test_same_report_from_both_layouts():
    a, b = parse_engine_info(_info("10")), parse_engine_info(_info("11"))
    assert [x["precision"] for x in a["per_layer"]] == [x["precision"] for x in b["per_layer"]]


def test_names_only_information_is_refused():
    data = json.loads(_info("10"))
    data["Layers"] = [layer["Name"] for layer in data["Layers"]]
    with pytest.raises(UserError, match="DETAILED"):
        parse_engine_info(data)
    with pytest.raises(UserError, match="Layers"):
        parse_engine_info({"Bindings": []})


def test_report_files_beside_the_engine(tmp_path):
    engine = tmp_path / "qat_best.engine"
    r = parse_engine_info(_info("10"), 1234)
    js, md = write_report(r, engine)
    assert js == tmp_path / "qat_best.report.json" and md.is_file()
    assert read_report(engine) == json.loads(json.dumps(r))
    text = md.read_text()
    assert format_summary(r, "qat_best.engine") in text
    assert text.count("| reformat |") == 2 and "| INT8 |" in format_markdown(r)


def test_cli_on_trtexec_layer_info(tmp_path, capsys):
    layers = tmp_path / "m.layers.json"
    layers.write_text(_info("11"))
    (tmp_path / "m.engine").write_bytes(b"x" * 2048)
    assert main([str(layers), "--engine", str(tmp_path / "m.engine")]) == 0
    out = capsys.readouterr().out
    assert "INT8 3, FP16 1, FP32 3; 2 reformat layers (1 between INT8 and float)" in out
    assert (tmp_path / "m.report.md").is_file()
