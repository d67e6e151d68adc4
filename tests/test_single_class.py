"""A single-class model (nc: 1, the most common custom dataset) through every tool: train_qat ->
export_qat (plain and end2end NMS) -> qat.lint -> val_trt on OpenVINO (both activation forms) and
ONNX Runtime, with a real mAP. The model is the demo checkpoint with its head cut to the 'circle'
class, on demo images labelled with circles only: a genuine nc=1 detector without training one."""
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper

import export_qat
import train_qat
import val_trt
from models.experimental import load_checkpoint
from qat.deploy import load_backend
from qat.lint import lint, main as lint_main
from tests.peer import one_thread  # noqa: F401  (fixture)
from utils.general import non_max_suppression
from utils.torch_utils import save_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent / "qat"))
from qat_testkit import run_ort  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
IMGSZ = 160


def single_class_inputs(root, keep=("circle",)):
    """(checkpoint, data yaml) of the demo checkpoint reduced to the classes `keep` (their head rows)
    and demo images whose labels keep only those classes."""
    from utils.demo_data import generate

    root = Path(root)
    ckpt = load_checkpoint("weights/demo-gelan.pt")
    model = (ckpt.get("ema") or ckpt["model"]).float()
    rows = [list(model.names.values() if isinstance(model.names, dict) else model.names).index(k) for k in keep]
    head = model.model[-1]
    for seq in head.cv3:
        old = seq[-1]
        new = torch.nn.Conv2d(old.in_channels, len(rows), 1)
        new.weight.data.copy_(old.weight.data[rows])
        new.bias.data.copy_(old.bias.data[rows])
        seq[-1] = new
    head.nc, head.no = len(rows), len(rows) + head.reg_max * 4
    model.nc, model.yaml["nc"], model.names = len(rows), len(rows), list(keep)
    weights = save_atomic({"model": model.half(), "ema": None, "epoch": -1}, root / f"nc{len(rows)}.pt")

    data = Path(generate(root / "data", n_train=8, n_val=16, imgsz=320, seed=3))
    for f in (root / "data" / "labels").rglob("*.txt"):
        lines = [ln.split() for ln in f.read_text().splitlines() if ln.strip()]
        f.write_text("".join(" ".join([str(rows.index(int(p[0]))), *p[1:]]) + "\n"
                             for p in lines if int(p[0]) in rows))
    cfg = yaml.safe_load(data.read_text())
    cfg.update(nc=len(rows), names=list(keep), path=str(data.parent))
    data.write_text(yaml.safe_dump(cfg))
    return weights, data


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return single_class_inputs(tmp_path_factory.mktemp("single"))


def test_single_class_end_to_end(single, tmp_path, capsys):
    weights, data = single
    out = train_qat.run_api(weights=str(weights), data=str(data), imgsz=IMGSZ, batch_size=4, calib_batches=1,
                            epochs=1, iters_per_epoch=1, device="cpu", workers=0, project=str(tmp_path),
                            name="qat", no_eval_origin=True, no_eval_ptq=True)
    best = Path(out["save_dir"]) / "weights" / "qat_best.pt"
    exported = export_qat.run(weights=str(best), imgsz=(IMGSZ,))
    assert exported["lint"] == [], exported["lint"]
    onnx_path = Path(exported["path"])
    with pytest.raises(SystemExit) as e:
        lint_main([str(onnx_path)])
    assert e.value.code == 0

    # the one-output-channel class convs: per-channel weight scale (one value, axis 0)
    m = onnx.load(str(onnx_path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    shapes = {n.input[0]: inits[n.input[1]].shape for n in m.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] in inits and inits[n.input[0]].shape[0] == 1}
    assert len(shapes) == 3 and all(s == (1,) for s in shapes.values()), shapes

    maps = {}
    for backend in ("openvino", "onnxruntime"):
        r = val_trt.run(str(data), onnx=str(onnx_path), backend=backend, imgsz=IMGSZ, workers=0, reference=False,
                        project=str(tmp_path), name=backend)
        maps[backend] = r["rows"][-1]["mAP50-95"]
    print(f"single-class mAP50-95: OpenVINO {maps['openvino']:.4f}, ONNX Runtime {maps['onnxruntime']:.4f}")
    assert all(v > 0.3 for v in maps.values()), maps  # a working detector, not just no error

    # OpenVINO, both activation forms, agree with the reference on the same images
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    ref = load_backend("onnxruntime", onnx_path)(x)
    for form in ("uint8", "int8"):
        y = load_backend("openvino", onnx_path, act_form=form)(x)
        assert y.shape == ref.shape == (2, 5, ref.shape[2])
        assert (y[:, 4] - ref[:, 4]).abs().max() < 0.05  # class scores

    # end2end NMS inside the graph, one class: the detections of NMS on the raw output, all class 0
    e2e = export_qat.run(weights=str(best), imgsz=(IMGSZ,), end2end=True, nms="onnx")
    assert e2e["lint"] == [], e2e["lint"]
    from utils.dataloaders import create_dataloader

    n = 0
    for im, *_ in create_dataloader(str(data.parent / "images" / "val"), IMGSZ, 1, 32, workers=0)[0]:
        im = im.float() / 255  # one image at a time: the end2end file has a static batch of 1
        det = run_ort(e2e["path"], im)
        raw = non_max_suppression(load_backend("onnxruntime", onnx_path)(im), 0.25, 0.45, max_det=100)
        assert det.shape[1] == 7 and len(det) == len(raw[0]) and np.all(det[:, 6] == 0)
        n += len(det)
        if n >= 3:
            break
    assert n >= 3  # circles found


def test_two_classes_export_and_lint(tmp_path):
    weights, data = single_class_inputs(tmp_path, keep=("circle", "ring"))
    out = train_qat.run_api(weights=str(weights), data=str(data), imgsz=IMGSZ, batch_size=4, calib_batches=1,
                            epochs=0, device="cpu", workers=0, project=str(tmp_path), name="ptq",
                            no_eval_origin=True, no_eval_ptq=True)
    exported = export_qat.run(weights=str(Path(out["save_dir"]) / "weights" / "qat_best.pt"), imgsz=(IMGSZ,))
    assert exported["lint"] == [] and lint(exported["path"]) == []
