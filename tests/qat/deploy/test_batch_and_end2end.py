"""Dynamic batch and end2end NMS on the demo checkpoint (weights/demo-gelan.pt, real trained weights)
after post-training quantization on demo val images: the exports TensorRT users build engines from."""
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.qat import qat_testkit as tk
from utils.general import non_max_suppression

ROOT = Path(__file__).resolve().parents[3]
WEIGHTS = ROOT / "weights" / "demo-gelan.pt"
IMGSZ = 320
pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason="needs weights/demo-gelan.pt")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """8 demo val images (letterboxed, 0-1), the PTQ model, its dynamic-batch plain export and its
    end2end (ONNX NonMaxSuppression) export, at confidence 0.05 so that second-best classes above the
    threshold exist (the NMS must keep only the best class per box, as non_max_suppression does)."""
    from qat.calibrate import calibrate
    from qat.compat import attempt_load
    from qat.export import export_qat_onnx
    from qat.quantize import quantize_model
    from qat.settings import QuantSettings
    from utils.dataloaders import create_dataloader
    from utils.demo_data import generate

    d = tmp_path_factory.mktemp("demo")
    generate(d / "data", n_train=0, n_val=8, imgsz=IMGSZ, seed=0)  # made here: CI has no datasets/demo
    loader = create_dataloader(str(d / "data" / "images" / "val"), IMGSZ, 8, 32, pad=0.0, rect=False, workers=0)[0]
    images = next(iter(loader))[0].float() / 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize_model(attempt_load(WEIGHTS, fuse=True), QuantSettings())
        calibrate(model, [images[:4], images[4:]], QuantSettings(), show=False)
        model.eval()
        plain = export_qat_onnx(model, d / "qat_dyn.onnx", IMGSZ, dynamic=True)
        e2e = export_qat_onnx(model, d / "qat_e2e.onnx", IMGSZ, dynamic=True, end2end=True, nms="onnx",
                              max_det=300, iou_thres=0.45, conf_thres=0.05)
    return images, plain, e2e


def _per_image(backend, images, batch):
    return torch.cat([backend(images[i:i + batch]) for i in range(0, len(images), batch)])


# ONNX Runtime with one thread: with more, its float convolutions split the work by batch size, a
# last-bit difference flips an INT8 rounding downstream and one anchor moves (measured on the demo
# model: 2 threads, image 7 alone vs in a batch of 8: score 0.076, box 24 px). OpenVINO is exact
# across batch sizes with 2 threads too.
@pytest.mark.parametrize("runtime,threads", [("onnxruntime", 1), ("openvino", 2)])
def test_dynamic_batch_gives_the_same_per_image_results(demo, runtime, threads):
    from qat.deploy import load_backend

    images, plain, _ = demo
    backend = load_backend(runtime, plain, threads=threads)
    assert backend.batch is None  # dynamic
    ref = _per_image(backend, images, 1)
    dets_ref = non_max_suppression(ref, 0.25, 0.45)
    assert sum(len(d) for d in dets_ref) >= 8  # the demo model detects objects
    for batch in (3, 8):
        y = _per_image(backend, images, batch)
        assert y.shape == ref.shape
        assert torch.equal(y, ref), f"batch {batch} differs from batch 1"
        tk.assert_same_detections(non_max_suppression(y, 0.25, 0.45), dets_ref, min_iou=0.999, conf_tol=1e-6)


def test_end2end_onnx_nms_equals_plain_export_and_our_nms(demo):
    from qat.deploy import load_backend

    images, plain, e2e = demo
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = 1  # batch-independent numbers (see above)
    session = ort.InferenceSession(str(e2e), so, providers=["CPUExecutionProvider"])
    ref = non_max_suppression(load_backend("onnxruntime", plain, threads=1)(images), 0.05, 0.45, max_det=300)
    for batch in (1, 3, 8):
        det = []
        for i in range(0, len(images), batch):
            out = torch.from_numpy(session.run(None, {"images": images[i:i + batch].numpy()})[0])
            det += [out[out[:, 0] == j][:, 1:] for j in range(len(images[i:i + batch]))]
        assert sum(len(d) for d in det) >= 8
        tk.assert_same_detections(det, ref, min_iou=0.99, conf_tol=1e-4)


def test_end2end_tensorrt_nms_graph_structure(tmp_path):
    """EfficientNMS_TRT cannot run here: check that it reads the plain export's boxes and scores."""
    from qat.compat import attempt_load
    from qat.export import export_qat_onnx

    model = attempt_load(WEIGHTS, fuse=True)
    path = export_qat_onnx(model, tmp_path / "e2e_trt.onnx", IMGSZ, batch_size=2, end2end=True, nms="tensorrt",
                           max_det=100)
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    nms = [n for n in m.graph.node if n.op_type == "EfficientNMS_TRT"]
    assert len(nms) == 1
    anchors = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
    assert shapes[nms[0].input[0]] == [2, anchors, 4]  # boxes x1y1x2y2 (box_coding 0)
    assert shapes[nms[0].input[1]] == [2, anchors, len(model.names)]  # class scores, sigmoid already applied
    assert list(nms[0].output) == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    # boxes come from output0's xywh through x1y1 = xy - wh/2, x2y2 = xy + wh/2: same numbers as the plain export
    import onnxruntime as ort

    plain = export_qat_onnx(model, tmp_path / "plain.onnx", IMGSZ, batch_size=2)
    g = onnx.load(str(path))
    g.graph.output.extend([onnx.helper.make_tensor_value_info(nms[0].input[0], onnx.TensorProto.FLOAT, None)])
    g.graph.node.remove(next(n for n in g.graph.node if n.op_type == "EfficientNMS_TRT"))
    del g.graph.output[:4]
    x = np.random.default_rng(0).random((2, 3, IMGSZ, IMGSZ), dtype=np.float32)
    boxes = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    y = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    xy, wh = y[:, :2].transpose(0, 2, 1), y[:, 2:4].transpose(0, 2, 1)
    assert np.allclose(boxes, np.concatenate([xy - wh / 2, xy + wh / 2], 2), atol=1e-3)
