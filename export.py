"""Export a YOLOv9 checkpoint to a plain FP32 ONNX model (the baseline the INT8 engines are compared with).

    python export.py --weights gelan-c.pt --imgsz 640                  # -> gelan-c.onnx beside the weights
    python export.py --weights yolov9-c-converted.pt --dynamic --simplify

The model is loaded through the safe loader, fused (BatchNorm folded, RepConvN reparameterized) and
exported with its head in export mode: one output `output0` of shape (B, 4+nc, anchors), decoded xywh
boxes in input pixels and class scores, as upstream's export. A dual-head (training) model exports its
main head only. The exporter is qat.export's (one exporter for float and Q/DQ models); the file is
written under a temporary name and moved into place when complete.
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.experimental import attempt_load  # noqa: E402
from utils.cli import ArgumentParser, add_export_args, add_trusted_flag, cli_main  # noqa: E402
from utils.general import LOGGER, check_img_size, colorstr, file_size, run_cli  # noqa: E402
from utils.torch_utils import atomic_output, select_device  # noqa: E402

def export_onnx(model, path, imgsz, batch_size=1, dynamic=False, opset=17, simplify=False):
    """Export `model` (an eval-ready nn.Module whose last layer is a DDetect / DualDDetect head) to ONNX.

    The project's one ONNX exporter, qat.export.export_qat_onnx, used for a float model: input
    `images` (B, 3, h, w) float 0-1, output `output0` (B, 4+nc, anchors); `imgsz` int or (h, w);
    `dynamic`: batch, height and width axes. Metadata as JSON (names as a list, which upstream's
    eval() of the value reads too). The caller's model is left as it was. Returns the Path written."""
    from qat.export import export_qat_onnx

    return export_qat_onnx(model, path, imgsz, batch_size=batch_size, dynamic=dynamic, opset=opset, simplify=simplify,
                           postprocess=False)


def run(weights, imgsz=(640,), batch_size=1, dynamic=False, opset=17, simplify=False, device="cpu", trusted=False):
    """Load `weights`, fuse, export `<weights stem>.onnx` beside them. Returns the ONNX path."""
    from qat.export import check_export_request

    weights, imgsz = check_export_request(weights, imgsz, batch_size)
    dev = select_device(device)
    model = attempt_load(weights, device=dev, fuse=True, trusted=trusted)
    imgsz = check_img_size(imgsz, s=int(max(model.stride)))
    out = weights.with_suffix(".onnx")
    LOGGER.info(f"{colorstr('ONNX:')} exporting {weights} with torch {torch.__version__}, opset {opset}, "
                f"input {batch_size}x3x{imgsz[0]}x{imgsz[1]}{' (dynamic)' if dynamic else ''}...")
    with atomic_output(out) as tmp:  # the previous file stays until the new one is complete
        export_onnx(model, tmp, imgsz, batch_size=batch_size, dynamic=dynamic, opset=opset, simplify=simplify)
    LOGGER.info(f"{colorstr('ONNX:')} saved {out} ({file_size(out):.1f} MB)")
    return out


def parse_opt(argv=None):
    parser = ArgumentParser(description="Export a YOLOv9 checkpoint to FP32 ONNX (written beside the weights)")
    add_export_args(parser, weights_help="model checkpoint (.pt)")
    add_trusted_flag(parser)
    return parser.parse_args(argv)


main = cli_main(parse_opt, run, run_cli)  # main(argv=None)


if __name__ == "__main__":
    main()
