"""Export a YOLOv9 checkpoint to a plain FP32 ONNX model (the baseline the INT8 engines are compared with).

    python export.py --weights gelan-c.pt --imgsz 640                  # -> gelan-c.onnx beside the weights
    python export.py --weights yolov9-c-converted.pt --dynamic --simplify

The model is loaded through the safe loader, fused (BatchNorm folded, RepConvN reparameterized) and
exported with its head in export mode: one output `output0` of shape (B, 4+nc, anchors), decoded xywh
boxes in input pixels and class scores, as upstream's export. A dual-head (training) model exports its
main head only. `export_onnx()` is model-agnostic and reused by the QAT exporter.
"""
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.experimental import attempt_load  # noqa: E402
from models.yolo import HEADS, DualDDetect  # noqa: E402
from utils.cli import ArgumentParser, imgsz_int, opset_int, positive_int  # noqa: E402
from utils.general import LOGGER, UserError, check_img_size, colorstr, file_size, print_args, run_cli  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402

INPUT_NAME, OUTPUT_NAME = "images", "output0"


def _main_head_only(module, inputs, output):
    """Forward hook on a DualDDetect in export mode: keep the main head's decoded output (y2)."""
    return output[1]


def _heads(model):
    return [m for m in model.modules() if isinstance(m, HEADS)]


def _simplify(path):
    try:
        import onnxslim
    except ImportError:
        LOGGER.warning("WARNING: --simplify needs onnxslim (pip install onnxslim); exported without simplifying")
        return
    import onnx

    LOGGER.info(f"{colorstr('ONNX:')} simplifying with onnxslim {getattr(onnxslim, '__version__', '')}...")
    onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))


def export_onnx(model, path, imgsz, batch_size=1, dynamic=False, opset=17, simplify=False, **onnx_kwargs):
    """Export `model` (an eval-ready nn.Module whose last layer is a DDetect / DualDDetect head) to ONNX.

    `imgsz`: int or (h, w). Input `images` (B, 3, h, w) float 0-1, output `output0` (B, 4+nc, anchors).
    `dynamic`: batch, height and width become dynamic axes (anchors are then computed in the graph).
    `onnx_kwargs` go to torch.onnx.export (e.g. do_constant_folding=False), for exporters built on this.
    The head's export/dynamic flags are set only for the export and restored afterwards, so the caller's
    model (fused FP32 or quantized) is left as it was. Returns the Path written."""
    import onnx

    path = Path(path)
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    heads = _heads(model)
    if not heads:
        raise UserError("the model has no DDetect/DualDDetect head; export_onnx exports detection models only")
    try:
        p = next(model.parameters())
        device, dtype = p.device, p.dtype if p.dtype.is_floating_point else torch.float32
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    im = torch.zeros(batch_size, 3, h, w, device=device, dtype=dtype)

    saved = [(m, m.export, m.dynamic) for m in heads]
    was_training = model.training
    hooks = []
    try:
        model.eval()
        for m in heads:
            m.export, m.dynamic = True, dynamic
            if isinstance(m, DualDDetect):
                hooks.append(m.register_forward_hook(_main_head_only))
        with torch.no_grad():
            y = model(im)  # dry run: builds anchors, checks the output
        if not isinstance(y, torch.Tensor) or y.ndim != 3:
            raise UserError(f"the model's export-mode output is {type(y).__name__}, not one (B, 4+nc, anchors) tensor")
        axes = None
        if dynamic:
            axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 2: "anchors"}}
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shape checks traced as constants
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # TorchScript exporter: chosen on purpose
            kwargs = dict(opset_version=opset, do_constant_folding=True, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, dynamo=False)
            torch.onnx.export(model, im, str(path), **{**kwargs, **onnx_kwargs})
    finally:
        for hk in hooks:
            hk.remove()
        for m, export, dyn in saved:
            m.export, m.dynamic = export, dyn
        model.train(was_training)

    if simplify:
        _simplify(path)
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model)
    # upstream's metadata (str() of int and dict: upstream reads it back with eval): stride and class names
    names = getattr(model, "names", None)
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else names
    stride = getattr(model, "stride", None)
    meta = {"stride": int(max(stride)) if stride is not None else 32, "names": names or {}}
    for k, v in meta.items():
        onnx_model.metadata_props.add(key=k, value=str(v))
    onnx.save(onnx_model, str(path))
    return path


def run(weights, imgsz=(640,), batch_size=1, dynamic=False, opset=17, simplify=False, device="cpu", trusted=False):
    """Load `weights`, fuse, export `<weights stem>.onnx` beside them. Returns the ONNX path."""
    imgsz = list(imgsz) if isinstance(imgsz, (list, tuple)) else [imgsz]
    if len(imgsz) not in (1, 2):
        raise UserError(f"--imgsz takes one size or two (h w), got {len(imgsz)}")
    imgsz = imgsz * 2 if len(imgsz) == 1 else imgsz
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    weights = Path(weights)
    if weights.suffix.lower() == ".onnx":
        raise UserError(f"--weights {weights} is already ONNX; pass the PyTorch checkpoint (.pt)")
    dev = select_device(device)
    model = attempt_load(weights, device=dev, fuse=True, trusted=trusted)
    imgsz = check_img_size(imgsz, s=int(max(model.stride)))
    out = weights.with_suffix(".onnx")
    LOGGER.info(f"{colorstr('ONNX:')} exporting {weights} with torch {torch.__version__}, opset {opset}, "
                f"input {batch_size}x3x{imgsz[0]}x{imgsz[1]}{' (dynamic)' if dynamic else ''}...")
    export_onnx(model, out, imgsz, batch_size=batch_size, dynamic=dynamic, opset=opset, simplify=simplify)
    LOGGER.info(f"{colorstr('ONNX:')} saved {out} ({file_size(out):.1f} MB)")
    return out


def parse_opt(argv=None):
    parser = ArgumentParser(description="Export a YOLOv9 checkpoint to FP32 ONNX (written beside the weights)")
    parser.add_argument("--weights", type=str, required=True, help="model checkpoint (.pt)")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=imgsz_int, default=[640], help="image (h, w)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="batch size")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width axes")
    parser.add_argument("--opset", type=opset_int, default=17, help="ONNX opset version")
    parser.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim")
    parser.add_argument("--device", default="cpu", help="cuda device, i.e. 0 or cpu")
    parser.add_argument("--trusted", action="store_true",
                        help="load a checkpoint that needs globals outside the safe-load allow-list (runs its code)")
    return parser.parse_args(argv)


def main(argv=None):
    def _main():
        opt = parse_opt(argv)
        print_args(vars(opt))
        return run(**vars(opt))

    return run_cli(_main)


if __name__ == "__main__":
    main()
